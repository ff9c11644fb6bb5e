package sim

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/fleet"
	"github.com/mayfly-ci/mayfly/schedule"
)

// TestNoVMDeletedUnusedWhileJobsWaitOnEveryTrace is issue 20's invariant on
// every trace in testdata/traces: the runtime fleet's policies never
// delete a VM that was never used while a job waits for one. Each trace's
// first 400 jobs run with an empty idle pool (every job waits for a boot,
// the repro's setting) and with a small pool whose VMs expire after a
// minute (idle deletions happen while jobs come).
func TestNoVMDeletedUnusedWhileJobsWaitOnEveryTrace(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(traceDir, "*.csv"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no traces in %s: %v", traceDir, err)
	}
	pools := []schedule.Policy{{IdleCount: 0}, {IdleCount: 3, IdleTime: time.Minute}}
	for _, file := range files {
		name := filepath.Base(file)
		jobs := loadTrace(t, name)
		if len(jobs) > 400 {
			jobs = jobs[:400]
		}
		osName := "linux"
		if jobs[0].OS == "windows" {
			osName = "windows"
		}
		for _, p := range []string{PolicyMayfly, PolicyPredictive} {
			for _, pool := range pools {
				r, err := Run(Options{
					Policy:   p,
					Trace:    name,
					Jobs:     jobs,
					Schedule: schedule.Schedule{Default: pool},
					Limits:   fleet.Limits{MaxUses: 1, MaxGrowthRate: 100},
					Provider: DefaultProvider(osName),
				})
				if err != nil {
					t.Fatalf("%s %s idle %d: %v", strings.TrimSuffix(name, ".csv"), p, pool.IdleCount, err)
				}
				if r.DeletedUnusedWhileWaiting != 0 || r.Started != r.Jobs {
					t.Errorf("%s %s idle %d: %d VMs deleted unused while jobs waited (want 0); %d of %d jobs started",
						name, p, pool.IdleCount, r.DeletedUnusedWhileWaiting, r.Started, r.Jobs)
				}
			}
		}
	}
}
