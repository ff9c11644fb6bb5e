package sim

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/fleet"
	"github.com/mayfly-ci/mayfly/schedule"
)

const traceDir = "../../testdata/traces"

func loadTrace(tb testing.TB, name string) []Job {
	tb.Helper()
	jobs, err := LoadTrace(filepath.Join(traceDir, name))
	if err != nil {
		tb.Fatal(err)
	}
	return jobs
}

// hostedOptions is the hosted Linux fleet of testdata/hosted-gcp-linux.toml
// (IdleCount 50, 70 at weekends, 700 for the 03:30-04:30 spike, IdleTime
// 1h, MaxBuilds 1, MaxGrowthRate 100, limit 1000) on the nightly trace
// (one day). cmd/mayfly's tests check that the config maps to these.
func hostedOptions(tb testing.TB, policy string) Options {
	tb.Helper()
	per := func(exprs ...string) []schedule.Period {
		var out []schedule.Period
		for _, e := range exprs {
			p, err := schedule.ParsePeriod(e, time.UTC)
			if err != nil {
				tb.Fatal(err)
			}
			out = append(out, p)
		}
		return out
	}
	return Options{
		Policy: policy, Trace: "nightly.csv", Jobs: loadTrace(tb, "nightly.csv"), Provider: DefaultProvider("linux"),
		Schedule: schedule.Schedule{
			Default: schedule.Policy{IdleCount: 50, IdleTime: time.Hour},
			Entries: []schedule.Entry{
				{Periods: per("* * * * * sat,sun *"), Policy: schedule.Policy{IdleCount: 70, IdleTime: time.Hour}},
				{Periods: per("* 30-59 3 * * * *", "* 0-30 4 * * * *"), Policy: schedule.Policy{IdleCount: 700, IdleTime: time.Hour}},
			},
		},
		Limits:  fleet.Limits{MaxUses: 1, MaxGrowthRate: 100, MaxInstances: 1000, OnDemandWithin: 90 * time.Second, CheckInterval: 3 * time.Second},
		MaxJobs: 1000,
	}
}

// BenchmarkHostedDay replays one simulated day (the nightly trace) with the
// hosted GitLab.com Linux config under each policy.
//
//	go test -run '^$' -bench HostedDay ./fleet/sim/
func BenchmarkHostedDay(b *testing.B) {
	for _, p := range Policies {
		b.Run(p, func(b *testing.B) {
			o := hostedOptions(b, p)
			var r Report
			for b.Loop() {
				var err error
				if r, err = Run(o); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(o.Jobs)), "jobs")
			b.ReportMetric(r.IdleVMHours, "idle-VM-h")
			b.ReportMetric(r.LatencyP90, "p90-s")
		})
	}
}

// TestHostedConfigRuns runs the hosted schedule over 02:00-06:00 of the
// nightly trace (the 03:30-04:30 spike with its 700-VM period) under every
// policy: every job starts, and the 700-VM period shows in the peak.
func TestHostedConfigRuns(t *testing.T) {
	for _, p := range Policies {
		o := hostedOptions(t, p)
		day := o.Jobs[0].Arrival.Truncate(24 * time.Hour)
		o.Jobs = window(o.Jobs, day.Add(2*time.Hour), day.Add(6*time.Hour))
		r, err := Run(o)
		if err != nil {
			t.Fatal(err)
		}
		if r.Started != r.Jobs {
			t.Errorf("%s: started %d of %d", p, r.Started, r.Jobs)
		}
		if r.DeletedUnusedWhileWaiting != 0 {
			t.Errorf("%s: %d VMs deleted unused while jobs waited", p, r.DeletedUnusedWhileWaiting)
		}
		if p == PolicyDockerMachine || p == PolicyMayfly {
			// The 700-VM nightly period must show up in the peak.
			if r.PeakInstances < 700 {
				t.Errorf("%s: peak %d instances, want ≥ 700 for the nightly period", p, r.PeakInstances)
			}
		}
	}
}

// window returns the jobs arriving in [from, to).
func window(jobs []Job, from, to time.Time) []Job {
	var out []Job
	for _, j := range jobs {
		if !j.Arrival.Before(from) && j.Arrival.Before(to) {
			out = append(out, j)
		}
	}
	return out
}
