// Command gentraces writes the simulator's synthetic job-arrival traces
// (package fleet/sim/traces) as CSV files. The output is a pure function of
// -seed.
//
//	go run ./fleet/sim/cmd/gentraces -out testdata/traces
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/mayfly-ci/mayfly/fleet/sim"
	"github.com/mayfly-ci/mayfly/fleet/sim/traces"
)

// DefaultSeed is the seed of the traces in testdata/traces.
const DefaultSeed = 20261102

func main() {
	out := flag.String("out", "testdata/traces", "output directory")
	seed := flag.Uint64("seed", DefaultSeed, "random seed")
	flag.Parse()
	if err := run(*out, *seed); err != nil {
		slog.Error("gentraces", "err", err)
		os.Exit(1)
	}
}

func run(dir string, seed uint64) error {
	for _, s := range traces.Shapes {
		jobs := s.Generate(seed)
		path := filepath.Join(dir, s.Name+".csv")
		f, err := os.Create(path)
		if err != nil {
			return fmt.Errorf("create %s: %w", path, err)
		}
		err = sim.WriteTrace(f, jobs)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("write %s: %w", path, err)
		}
		slog.Info("trace written", "path", path, "jobs", len(jobs))
	}
	return nil
}
