package detach_test

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/vmexec"
	"github.com/mayfly-ci/mayfly/vmexec/detach"
	"github.com/mayfly-ci/mayfly/vmexec/sshexec"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

// BenchmarkChain measures what a trivial job's stages cost on a warm
// connection, on OpenSSH (dash, coreutils) and dropbear (busybox) on this
// host: "session" is the floor, one SSH session that runs `true` in sh;
// "chain" runs four stages like a trivial job's (prepare, get_sources with
// GIT_STRATEGY none, three echo lines, after_script) in a new job
// directory, from the first Run to the end of the last, and "first" to the
// end of the first stage. Figures are medians and minima (less noisy on a
// shared machine).
func BenchmarkChain(b *testing.B) {
	for _, k := range []sshtest.Kind{sshtest.OpenSSH, sshtest.Dropbear} {
		b.Run(string(k), func(b *testing.B) {
			srv := sshtest.Run(b, k)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			c, err := sshexec.Dial(ctx, srv.Target())
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			const rounds = 15
			var session, first, chain []time.Duration
			base := b.TempDir()
			b.ResetTimer()
			for i := range rounds * b.N {
				t0 := time.Now()
				if code, err := c.Run(ctx, vmexec.Command{Script: "true", Shell: "sh"}); err != nil || code != 0 {
					b.Fatalf("true: %d %v", code, err)
				}
				session = append(session, time.Since(t0))

				r, err := detach.New(detach.Options{Dir: filepath.Join(base, fmt.Sprint("job", i)), Exec: c,
					Scripts: trivialStages, Files: []detach.File{{Path: filepath.Join(base, fmt.Sprint("f", i), "VAR"), Content: []byte("x")}}})
				if err != nil {
					b.Fatal(err)
				}
				stages := make([]detach.Stage, len(trivialStages))
				for j, s := range trivialStages {
					stages[j] = detach.Stage{ID: fmt.Sprintf("%02d-s-1", j), Script: s, Env: []string{"CI_JOB_STATUS=running"}}
				}
				s0 := stages[0]
				s0.Then = stages[1:]
				t0 = time.Now()
				for j, s := range append([]detach.Stage{s0}, stages[1:]...) {
					if code, err := r.Run(ctx, s, io.Discard); err != nil || code != 0 {
						b.Fatalf("stage %d: %d %v", j, code, err)
					}
					if j == 0 {
						first = append(first, time.Since(t0))
					}
				}
				chain = append(chain, time.Since(t0))
				r.Close()
			}
			b.StopTimer()
			b.ReportMetric(msMedian(session), "session-ms")
			b.ReportMetric(msMedian(first), "first-ms")
			b.ReportMetric(msMedian(chain), "chain-ms")
			b.ReportMetric(msMin(session), "session-min-ms")
			b.ReportMetric(msMin(first), "first-min-ms")
			b.ReportMetric(msMin(chain), "chain-min-ms")
		})
	}
}

func msMedian(v []time.Duration) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return float64(s[len(s)/2].Microseconds()) / 1000
}

func msMin(v []time.Duration) float64 {
	return float64(slices.Min(v).Microseconds()) / 1000
}

// trivialStages are the stage scripts of a trivial job, much as the
// build script generator writes them.
var trivialStages = []string{
	"set -e\n{\n{ read -r mayfly_host </proc/sys/kernel/hostname; } 2>/dev/null || mayfly_host=$(hostname)\nprintf 'Running on %s...\\n' \"$mayfly_host\"\n} </dev/null\n",
	"set -e\n{\nexport CI=true\nmkdir -p \"$HOME/builds/p\"\necho 'Skipping Git repository setup'\n} </dev/null\n",
	"set -e\n{\nexport CI=true\ncd \"$HOME\"\necho one\necho two\necho three\n} </dev/null\n",
	"set -e\n{\nexport CI=true\ncd \"$HOME\"\necho after\n} </dev/null\n",
}
