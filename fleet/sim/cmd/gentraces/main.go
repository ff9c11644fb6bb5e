// Command gentraces writes the simulator's synthetic job-arrival traces to
// testdata/traces. The output is a pure function of -seed.
//
//	go run ./fleet/sim/cmd/gentraces -out testdata/traces
//
// Traces (all times UTC, starting Monday 2026-11-02 00:00):
//
//	weekly.csv          one week, weekday/weekend diurnal Linux load
//	weekly-windows.csv  the same shape for Windows at a fifth of the rate
//	nightly.csv         one weekday plus the 03:30-04:30 scheduled-pipeline spike
//	monorepo.csv        one weekday of monorepo pipelines: stages of 50 parallel jobs
//
// Rates are scaled down about tenfold from GitLab.com's hosted fleet so that
// each file stays under 2 MB.
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/mayfly-ci/mayfly/fleet/sim"
)

var epoch = time.Date(2026, 11, 2, 0, 0, 0, 0, time.UTC) // a Monday

func main() {
	out := flag.String("out", "testdata/traces", "output directory")
	seed := flag.Uint64("seed", 20261102, "random seed")
	flag.Parse()
	if err := run(*out, *seed); err != nil {
		slog.Error("gentraces", "err", err)
		os.Exit(1)
	}
}

func run(dir string, seed uint64) error {
	traces := []struct {
		name string
		gen  func(*rand.Rand) []sim.Job
	}{
		{"weekly.csv", func(r *rand.Rand) []sim.Job { return diurnal(r, 7, 1, "linux", 4*time.Minute) }},
		{"weekly-windows.csv", func(r *rand.Rand) []sim.Job { return diurnal(r, 7, 0.2, "windows", 8*time.Minute) }},
		{"nightly.csv", nightly},
		{"monorepo.csv", monorepo},
	}
	for i, t := range traces {
		r := rand.New(rand.NewPCG(seed, uint64(i)))
		jobs := t.gen(r)
		slices.SortStableFunc(jobs, func(a, b sim.Job) int { return a.Arrival.Compare(b.Arrival) })
		path := filepath.Join(dir, t.name)
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

// duration draws a job duration: lognormal around median, 10 s to 3 h.
func duration(r *rand.Rand, median time.Duration) time.Duration {
	d := time.Duration(float64(median) * math.Exp(0.9*r.NormFloat64()))
	return min(max(d, 10*time.Second), 3*time.Hour).Round(time.Second)
}

// workday is the weekday rate shape at hour h (0..24): 0 at night, 1 at
// the 14:00 UTC peak (Europe afternoon, US morning).
func workday(h float64) float64 {
	if h < 6 || h > 22 {
		return 0
	}
	return math.Pow(math.Sin(math.Pi*(h-6)/16), 2)
}

// poisson draws a non-homogeneous Poisson process with rate(t) jobs per
// minute over [from, to) by thinning against maxRate.
func poisson(r *rand.Rand, from, to time.Time, maxRate float64, rate func(time.Time) float64, emit func(time.Time)) {
	t := from
	for {
		t = t.Add(time.Duration(r.ExpFloat64() / maxRate * float64(time.Minute)))
		if !t.Before(to) {
			return
		}
		if r.Float64()*maxRate < rate(t) {
			emit(t.Truncate(time.Second))
		}
	}
}

// diurnal is a week-shaped load: weekdays 2 + 10·shape jobs/min, weekends
// 1 + 2·shape, times scale.
func diurnal(r *rand.Rand, days int, scale float64, osName string, median time.Duration) []sim.Job {
	var jobs []sim.Job
	rate := func(t time.Time) float64 {
		h := float64(t.Hour()) + float64(t.Minute())/60
		if wd := t.Weekday(); wd == time.Saturday || wd == time.Sunday {
			return scale * (1 + 2*workday(h))
		}
		return scale * (2 + 10*workday(h))
	}
	poisson(r, epoch, epoch.AddDate(0, 0, days), scale*12, rate, func(t time.Time) {
		jobs = append(jobs, sim.Job{Arrival: t, Duration: duration(r, median), OS: osName})
	})
	return jobs
}

// nightly is one weekday plus scheduled pipelines at 03:30-04:30 UTC:
// 1500 jobs, most of them in the first minutes (cron schedules cluster on
// the half hour), decaying with a 10-minute time constant.
func nightly(r *rand.Rand) []sim.Job {
	jobs := diurnal(r, 1, 1, "linux", 4*time.Minute)
	start := epoch.Add(3*time.Hour + 30*time.Minute)
	for range 1500 {
		off := time.Duration(r.ExpFloat64() * float64(10*time.Minute))
		if off >= time.Hour {
			off = time.Duration(r.Float64() * float64(time.Hour))
		}
		jobs = append(jobs, sim.Job{Arrival: start.Add(off).Truncate(time.Second), Duration: duration(r, 6*time.Minute), OS: "linux"})
	}
	return jobs
}

// monorepo is one weekday of monorepo pipelines (Poisson, 1 + 11·shape per
// hour): a first stage of 50 parallel jobs, a second stage of 50 when the
// first one's slowest job would end, then one deploy job.
func monorepo(r *rand.Rand) []sim.Job {
	var jobs []sim.Job
	rate := func(t time.Time) float64 {
		h := float64(t.Hour()) + float64(t.Minute())/60
		return (1 + 11*workday(h)) / 60
	}
	poisson(r, epoch, epoch.AddDate(0, 0, 1), 12.0/60, rate, func(t time.Time) {
		at := t
		for _, n := range []int{50, 50, 1} {
			var longest time.Duration
			for range n {
				d := duration(r, 5*time.Minute)
				longest = max(longest, d)
				jobs = append(jobs, sim.Job{Arrival: at.Add(time.Duration(r.IntN(5)) * time.Second), Duration: d, OS: "linux"})
			}
			at = at.Add(longest + 10*time.Second)
		}
	})
	return jobs
}
