package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/fleet/sim"
	"github.com/mayfly-ci/mayfly/fleet/simplot"
	"github.com/mayfly-ci/mayfly/manager/config"
)

func runSimulate(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("simulate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "config.toml", "config whose first runner's fleet is simulated")
	runner := fs.Int("runner", 0, "which [[runners]] entry to simulate (0 = the first)")
	trace := fs.String("trace", "", "job-arrival trace (CSV: arrival unix seconds, duration seconds[, os]); see testdata/traces")
	policy := fs.String("policy", "all", "policy: "+strings.Join(sim.Policies, ", ")+", or all")
	boot := fs.Duration("boot", 0, "median boot time of the simulated provider (default 45s, 300s for windows)")
	failure := fs.Float64("failure-rate", 0, "share of creations that fail")
	apiRate := fs.Float64("api-rate", 0, "provider API calls per second (0 = unlimited)")
	seed := fs.Uint64("seed", 1, "random seed")
	connect := fs.String("connect", sim.ConnectOnCreate, "how the simulated provider gives connect info to the mayfly policies: create (with Create), list (in its list) or call (a ConnectInfo call per VM, as the plugins over the wire today)")
	asJSON := fs.Bool("json", false, "print the reports as JSON")
	plotPath := fs.String("plot", "", "draw instances by state and queue wait over time into this PNG (one per policy: NAME-POLICY.png when several)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: mayfly simulate --config FILE --trace FILE [flags]\n\nReplays a job-arrival trace through a fleet policy with a simulated provider\nand reports queue-to-start latency, the share of jobs started within 120 s,\nidle and total VM-hours, API calls per job and peak instances. The mayfly\npolicy runs the fleet's own decision code.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *trace == "" {
		fmt.Fprintln(stderr, "mayfly simulate: --trace is required")
		return 2
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	jobs, err := sim.LoadTrace(*trace)
	if err != nil {
		fmt.Fprintf(stderr, "mayfly simulate: %v\n", err)
		return 1
	}
	policies := sim.Policies
	if *policy != "all" {
		policies = []string{*policy}
	}
	var reports []sim.Report
	for _, p := range policies {
		opts := sim.Options{Policy: p, Trace: filepath.Base(*trace), Jobs: jobs}
		if len(jobs) > 0 {
			opts.Provider = sim.DefaultProvider(jobs[0].OS)
		}
		if err := simOptions(cfg, *runner, &opts); err != nil {
			fmt.Fprintf(stderr, "mayfly simulate: %v\n", err)
			return 1
		}
		if *boot > 0 {
			opts.Provider.Boot.Median = *boot
		}
		opts.Provider.FailureRate = *failure
		opts.Provider.APIRate = *apiRate
		opts.Provider.Seed = *seed
		opts.Provider.Connect = *connect
		if *plotPath != "" && len(jobs) > 0 {
			span := jobs[len(jobs)-1].Arrival.Sub(jobs[0].Arrival)
			opts.SeriesStep = max(10*time.Second, span/2000)
		}
		start := time.Now()
		r, err := sim.Run(opts)
		if err != nil {
			fmt.Fprintf(stderr, "mayfly simulate: policy %s: %v\n", p, err)
			return 1
		}
		if !*asJSON {
			fmt.Fprintf(stderr, "simulated %s with %s in %s\n", opts.Trace, p, time.Since(start).Round(time.Millisecond))
		}
		if *plotPath != "" && len(r.Series) == 0 {
			fmt.Fprintf(stderr, "policy %s records no series over time; not drawn\n", p)
		} else if *plotPath != "" {
			out := *plotPath
			if len(policies) > 1 {
				out = strings.TrimSuffix(out, ".png") + "-" + p + ".png"
			}
			if err := simplot.WritePNG(out, r); err != nil {
				fmt.Fprintf(stderr, "mayfly simulate: %v\n", err)
				return 1
			}
			fmt.Fprintf(stderr, "drew %s\n", out)
		}
		reports = append(reports, r)
	}
	if *asJSON {
		err = sim.WriteJSON(stdout, reports...)
	} else {
		err = sim.WriteTable(stdout, reports...)
	}
	if err != nil {
		fmt.Fprintf(stderr, "mayfly simulate: %v\n", err)
		return 1
	}
	return 0
}

// simOptions fills the fleet settings of opts from runner i of a loaded
// config: its schedule and limits, and MaxJobs (the smaller positive of
// concurrent and the runner's limit). A Windows runner gets the simulated
// provider's Windows boot times unless opts has some already.
func simOptions(cfg *config.Config, i int, opts *sim.Options) error {
	if i < 0 || i >= len(cfg.Runners) {
		return fmt.Errorf("config %s: no runner %d (it has %d)", cfg.Path, i, len(cfg.Runners))
	}
	r := &cfg.Runners[i]
	opts.Schedule = r.Fleet.Schedule
	opts.Limits = r.Fleet.Limits
	opts.MaxJobs = cfg.Concurrent
	if r.Limit > 0 && (opts.MaxJobs <= 0 || r.Limit < opts.MaxJobs) {
		opts.MaxJobs = r.Limit
	}
	opts.MaxJobs = max(opts.MaxJobs, 0)
	if r.Fleet.Connector.OS == "windows" && opts.Provider.Boot.Median == 0 {
		opts.Provider = sim.DefaultProvider("windows")
	}
	return nil
}
