// Package traces generates the simulator's synthetic job-arrival traces:
// a pure function of the shape's name and a seed, so that a policy can be
// judged on several realisations of each shape.
//
// The shapes are split in two sets. Tuning shapes are the ones the
// predictive policy's fixed settings were chosen on; evaluation shapes,
// which a user would recognise and which the policy was not designed
// around, are used only to judge it (fleet/sim's BenchmarkCompare).
//
// Rates are scaled down about tenfold from GitLab.com's hosted Linux
// fleet; compare shapes and ratios, not absolute fleet sizes. Durations
// are clamped to 10 s .. 3 h (the hosted job timeout). All times are UTC
// from Monday 2026-11-02 00:00.
package traces

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/fleet/sim"
)

// Epoch is when every trace starts: a Monday.
var Epoch = time.Date(2026, 11, 2, 0, 0, 0, 0, time.UTC)

// Shape is one kind of trace.
type Shape struct {
	// Name names the shape; its CSV is Name + ".csv".
	Name string
	// OS is the jobs' OS: "linux" or "windows" (boots of about 300 s).
	OS string
	// Evaluation is set for the shapes the predictive policy is judged on
	// and was not tuned on.
	Evaluation bool
	// Doc says what the trace holds.
	Doc string
	gen func(r *rand.Rand) []sim.Job
}

// Shapes lists every shape, tuning ones first.
var Shapes = []Shape{
	{Name: "weekly", OS: "linux", Doc: "one week: weekdays 2 + 10·s(h) jobs/min, weekends 1 + 2·s(h), s a sin² bump 06–22 UTC peaking at 14:00; durations lognormal, median 4 min",
		gen: func(r *rand.Rand) []sim.Job { return diurnal(r, 7, 1, "linux", 4*time.Minute) }},
	{Name: "weekly-windows", OS: "windows", Doc: "the weekly shape at a fifth of the rate, Windows jobs, median 8 min",
		gen: func(r *rand.Rand) []sim.Job { return diurnal(r, 7, 0.2, "windows", 8*time.Minute) }},
	{Name: "nightly", OS: "linux", Doc: "one weekday of the diurnal load plus 1 500 scheduled-pipeline jobs from 03:30 (exponential, 10 min time constant, all within 03:30–04:30), median 6 min",
		gen: nightly},
	{Name: "monorepo", OS: "linux", Doc: "one weekday of monorepo pipelines (Poisson, 1 + 11·s(h) per hour): 50 parallel jobs, 50 more when the slowest of those would end, then one deploy job; median 5 min",
		gen: monorepo},

	{Name: "bursts", OS: "linux", Evaluation: true, Doc: "three weekdays of self-exciting pipelines: pushes (2 + 20·s(h) per hour) start pipelines of 1–4 stages of 1–20 parallel jobs; each pipeline triggers on average 0.6 more (downstream pipelines, merge trains) after about 4 min",
		gen: bursts},
	{Name: "twotz", OS: "linux", Evaluation: true, Doc: "three weekdays with two time-zone peaks: Europe 08–16 UTC (8 jobs/min at its top) and US Pacific 16–24 UTC (6 jobs/min), 1 job/min at night; median 4 min",
		gen: func(r *rand.Rand) []sim.Job { return twoZones(r, 3, 1, "linux", 4*time.Minute) }},
	{Name: "heavytail", OS: "linux", Evaluation: true, Doc: "two weekdays of the diurnal load with heavy-tailed durations: Pareto, alpha 1.2, from 30 s (half the jobs under a minute, 1 in 50 over 30 min)",
		gen: heavyTail},
	{Name: "surge", OS: "linux", Evaluation: true, Doc: "two weekdays of the diurnal load; on the second an unscheduled surge at 8× the rate for 2 hours, starting at a random time between 09:00 and 16:00",
		gen: surge},
	{Name: "storms", OS: "linux", Evaluation: true, Doc: "three days of a quiet fleet (0.3 + 0.5·s(h) jobs/min) hit by rare storms: about 1.5 a day at random times, each of 150–300 jobs within 2–5 minutes",
		gen: storms},
	{Name: "windows-twotz", OS: "windows", Evaluation: true, Doc: "the two-time-zone shape at a fifth of the rate, Windows jobs, median 8 min",
		gen: func(r *rand.Rand) []sim.Job { return twoZones(r, 3, 0.2, "windows", 8*time.Minute) }},
}

// Lookup returns the shape named name.
func Lookup(name string) (Shape, error) {
	for _, s := range Shapes {
		if s.Name == name {
			return s, nil
		}
	}
	names := make([]string, len(Shapes))
	for i, s := range Shapes {
		names[i] = s.Name
	}
	return Shape{}, fmt.Errorf("trace shape %q: want one of %s", name, strings.Join(names, ", "))
}

// Generate returns the shape's jobs for seed, sorted by arrival. Each
// shape draws its own stream of the seed (its place in Shapes).
func (s Shape) Generate(seed uint64) []sim.Job {
	stream := uint64(slices.IndexFunc(Shapes, func(x Shape) bool { return x.Name == s.Name }))
	r := rand.New(rand.NewPCG(seed, stream))
	jobs := s.gen(r)
	slices.SortStableFunc(jobs, func(a, b sim.Job) int { return a.Arrival.Compare(b.Arrival) })
	return jobs
}

// duration draws a job duration: lognormal around median, 10 s to 3 h.
func duration(r *rand.Rand, median time.Duration) time.Duration {
	d := time.Duration(float64(median) * math.Exp(0.9*r.NormFloat64()))
	return clampDuration(d)
}

func clampDuration(d time.Duration) time.Duration {
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

// bump is a sin² bump over [from, to) hours, 1 at its middle.
func bump(h, from, to float64) float64 {
	if h < from || h >= to {
		return 0
	}
	return math.Pow(math.Sin(math.Pi*(h-from)/(to-from)), 2)
}

func hourOf(t time.Time) float64 { return float64(t.Hour()) + float64(t.Minute())/60 }

// poisson draws a non-homogeneous Poisson process with rate(t) events per
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
	poisson(r, Epoch, Epoch.AddDate(0, 0, days), scale*12, func(t time.Time) float64 { return scale * weekRate(t) }, func(t time.Time) {
		jobs = append(jobs, sim.Job{Arrival: t, Duration: duration(r, median), OS: osName})
	})
	return jobs
}

// weekRate is the weekly shape's rate in jobs per minute at t.
func weekRate(t time.Time) float64 {
	h := hourOf(t)
	if wd := t.Weekday(); wd == time.Saturday || wd == time.Sunday {
		return 1 + 2*workday(h)
	}
	return 2 + 10*workday(h)
}

// nightly is one weekday plus scheduled pipelines at 03:30-04:30 UTC:
// 1500 jobs, most of them in the first minutes (cron schedules cluster on
// the half hour), decaying with a 10-minute time constant.
func nightly(r *rand.Rand) []sim.Job {
	jobs := diurnal(r, 1, 1, "linux", 4*time.Minute)
	start := Epoch.Add(3*time.Hour + 30*time.Minute)
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
	rate := func(t time.Time) float64 { return (1 + 11*workday(hourOf(t))) / 60 }
	poisson(r, Epoch, Epoch.AddDate(0, 0, 1), 12.0/60, rate, func(t time.Time) {
		jobs = append(jobs, pipeline(r, t, []int{50, 50, 1}, 5*time.Minute, 5*time.Second)...)
	})
	return jobs
}

// pipeline is one pipeline starting at t: stages of the given widths, each
// starting when the previous one's slowest job ends plus 10 s, its jobs
// spread over jitter.
func pipeline(r *rand.Rand, t time.Time, stages []int, median, jitter time.Duration) []sim.Job {
	var jobs []sim.Job
	at := t
	for _, n := range stages {
		var longest time.Duration
		for range n {
			d := duration(r, median)
			longest = max(longest, d)
			j := time.Duration(0)
			if jitter >= time.Second {
				j = time.Duration(r.IntN(int(jitter/time.Second))) * time.Second
			}
			jobs = append(jobs, sim.Job{Arrival: at.Add(j).Truncate(time.Second), Duration: d, OS: "linux"})
		}
		at = at.Add(longest + 10*time.Second)
	}
	return jobs
}

// bursts is a self-exciting (Hawkes) process of pipelines over three
// weekdays: pushes arrive at 2 + 20·shape per hour; each pipeline has 1–4
// stages of 1–20 parallel jobs (most small, a few wide) and triggers a
// Poisson(0.6) number of further pipelines, each after an exponential
// delay of mean 4 min.
func bursts(r *rand.Rand) []sim.Job {
	var jobs []sim.Job
	var queue []time.Time
	rate := func(t time.Time) float64 { return (2 + 20*workday(hourOf(t))) / 60 }
	poisson(r, Epoch, Epoch.AddDate(0, 0, 3), 22.0/60, rate, func(t time.Time) { queue = append(queue, t) })
	end := Epoch.AddDate(0, 0, 3)
	for len(queue) > 0 && len(jobs) < 200000 {
		t := queue[0]
		queue = queue[1:]
		stages := make([]int, 1+r.IntN(4))
		for i := range stages {
			stages[i] = min(1+int(r.ExpFloat64()*4), 20)
		}
		jobs = append(jobs, pipeline(r, t, stages, 3*time.Minute, 3*time.Second)...)
		for range poissonCount(r, 0.6) {
			next := t.Add(time.Duration(r.ExpFloat64() * float64(4*time.Minute)))
			if next.Before(end) {
				queue = append(queue, next)
			}
		}
	}
	return jobs
}

// poissonCount draws a Poisson count with mean mu (small mu).
func poissonCount(r *rand.Rand, mu float64) int {
	l, k, p := math.Exp(-mu), 0, 1.0
	for {
		p *= r.Float64()
		if p <= l {
			return k
		}
		k++
	}
}

// twoZones is days of weekdays with a European peak 08–16 UTC (8 jobs/min
// at its top) and a US Pacific one 16–24 UTC (6 jobs/min), 1 job/min
// under them, times scale.
func twoZones(r *rand.Rand, days int, scale float64, osName string, median time.Duration) []sim.Job {
	var jobs []sim.Job
	rate := func(t time.Time) float64 {
		h := hourOf(t)
		return scale * (1 + 7*bump(h, 8, 16) + 5*bump(h, 16, 24))
	}
	poisson(r, Epoch, Epoch.AddDate(0, 0, days), scale*8, rate, func(t time.Time) {
		jobs = append(jobs, sim.Job{Arrival: t, Duration: duration(r, median), OS: osName})
	})
	return jobs
}

// heavyTail is two weekdays of the diurnal load with Pareto durations
// (alpha 1.2, from 30 s).
func heavyTail(r *rand.Rand) []sim.Job {
	var jobs []sim.Job
	poisson(r, Epoch, Epoch.AddDate(0, 0, 2), 12, weekRate, func(t time.Time) {
		d := time.Duration(float64(30*time.Second) / math.Pow(1-r.Float64(), 1/1.2))
		jobs = append(jobs, sim.Job{Arrival: t, Duration: clampDuration(d), OS: "linux"})
	})
	return jobs
}

// surge is two weekdays of the diurnal load with, on the second, an
// unscheduled surge at 8× the rate for 2 hours from a random time between
// 09:00 and 16:00.
func surge(r *rand.Rand) []sim.Job {
	from := Epoch.AddDate(0, 0, 1).Add(9*time.Hour + time.Duration(r.Int64N(int64(7*time.Hour))))
	to := from.Add(2 * time.Hour)
	rate := func(t time.Time) float64 {
		if !t.Before(from) && t.Before(to) {
			return 8 * weekRate(t)
		}
		return weekRate(t)
	}
	var jobs []sim.Job
	poisson(r, Epoch, Epoch.AddDate(0, 0, 2), 8*12, rate, func(t time.Time) {
		jobs = append(jobs, sim.Job{Arrival: t, Duration: duration(r, 4*time.Minute), OS: "linux"})
	})
	return jobs
}

// storms is three days of a quiet fleet (0.3 + 0.5·shape jobs/min) with
// storms at 1.5 a day: 150–300 jobs each, arriving uniformly within 2–5
// minutes.
func storms(r *rand.Rand) []sim.Job {
	days := 3
	var jobs []sim.Job
	quiet := func(t time.Time) float64 { return 0.3 + 0.5*workday(hourOf(t)) }
	poisson(r, Epoch, Epoch.AddDate(0, 0, days), 0.8, quiet, func(t time.Time) {
		jobs = append(jobs, sim.Job{Arrival: t, Duration: duration(r, 4*time.Minute), OS: "linux"})
	})
	poisson(r, Epoch, Epoch.AddDate(0, 0, days), 1.5/(24*60), func(time.Time) float64 { return 1.5 / (24 * 60) }, func(t time.Time) {
		n := 150 + r.IntN(151)
		spread := 2*time.Minute + time.Duration(r.Int64N(int64(3*time.Minute)))
		for range n {
			at := t.Add(time.Duration(r.Int64N(int64(spread)))).Truncate(time.Second)
			jobs = append(jobs, sim.Job{Arrival: at, Duration: duration(r, 4*time.Minute), OS: "linux"})
		}
	})
	return jobs
}
