package sim

import (
	"fmt"
	"io"
	"math"
	"runtime"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/mayfly-ci/mayfly/schedule"
)

// A Bar is a latency bar a policy's setting must meet on a trace.
type Bar struct {
	Name string
	// Met reports whether r meets the bar; oracle is the oracle's report
	// on the same trace.
	Met func(r, oracle Report) bool
}

// Bars are the two bars of issue 15: (a) the hosted SLO, 90 % of jobs
// within 120 s; (b) a p90 within twice the oracle's (which waits only for
// the runner's next poll).
var Bars = []Bar{
	{Name: "(a) 90% ≤ 120 s", Met: func(r, _ Report) bool { return r.Started == r.Jobs && r.WithinSLO >= 0.9 }},
	{Name: "(b) p90 ≤ 2×oracle", Met: func(r, o Report) bool {
		return r.Started == r.Jobs && r.LatencyP90 >= 0 && r.LatencyP90 <= 2*o.LatencyP90
	}},
}

// Setting is one baseline configuration of a knob grid.
type Setting struct {
	// Family names the baseline and the knobs tuned.
	Family string
	// Label says the knobs' values.
	Label string
	// Policy is PolicyDockerMachine or PolicyTaskscaler.
	Policy string
	// Idle is the idle policy in force all the time.
	Idle schedule.Policy
}

// Baseline families.
const (
	FamilyFlat  = "docker+machine IdleCount"
	FamilyScale = "docker+machine IdleScaleFactor×IdleCountMin"
	FamilyTask  = "taskscaler scale_factor×limit"
)

// BaselineSettings is every baseline's grid over its real knobs, each with
// idleTime: docker+machine's flat IdleCount; its IdleScaleFactor with
// IdleCountMin (IdleCount 1000, no ceiling in effect); taskscaler's
// idle_count floor with scale_factor and scale_factor_limit (preemptive
// mode as gitlab-runner defaults it: on when idle_count > 0).
func BaselineSettings(idleTime time.Duration) []Setting {
	var out []Setting
	for _, n := range []int{0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 18, 22, 27, 33, 40, 50, 60, 75, 90, 110, 130, 160, 200, 250, 320, 400, 500, 640} {
		out = append(out, Setting{FamilyFlat, fmt.Sprintf("IdleCount=%d", n), PolicyDockerMachine,
			schedule.Policy{Style: schedule.DockerMachine, IdleCount: n, IdleTime: idleTime}})
	}
	for _, sf := range []float64{0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0} {
		for _, m := range []int{1, 2, 3, 5, 8, 12, 20} {
			out = append(out, Setting{FamilyScale, fmt.Sprintf("IdleScaleFactor=%g IdleCountMin=%d", sf, m), PolicyDockerMachine,
				schedule.Policy{Style: schedule.DockerMachine, IdleCount: 1000, IdleCountMin: m, ScaleFactor: sf, IdleTime: idleTime}})
		}
	}
	for _, n := range []int{1, 2, 3, 5, 8, 12, 20, 30, 50, 80, 130, 200, 320} {
		out = append(out, Setting{FamilyTask, fmt.Sprintf("idle_count=%d", n), PolicyTaskscaler,
			schedule.Policy{Style: schedule.Taskscaler, IdleCount: n, IdleTime: idleTime, PreemptiveMode: true}})
	}
	for _, n := range []int{0, 2, 5} {
		for _, sf := range []float64{0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0} {
			for _, lim := range []int{25, 100, 0} {
				out = append(out, Setting{FamilyTask, fmt.Sprintf("idle_count=%d scale_factor=%g limit=%d", n, sf, lim), PolicyTaskscaler,
					schedule.Policy{Style: schedule.Taskscaler, IdleCount: n, ScaleFactor: sf, ScaleFactorLimit: lim, IdleTime: idleTime, PreemptiveMode: n > 0}})
			}
		}
	}
	return out
}

// Families lists the baseline families in table order.
var Families = []string{FamilyFlat, FamilyScale, FamilyTask}

// Candidate is a policy judged against the baselines at one bar.
type Candidate struct {
	// Label names it in the table.
	Label string
	// Configure sets its policy on a copy of the trace's options.
	Configure func(o *Options)
}

// Realisation is one trace realisation (a seed) to compare on.
type Realisation struct {
	Seed uint64
	// Options holds the trace, the provider (seeded) and the limits; its
	// Policy and Schedule are set per run.
	Options Options
}

// Outcome is one policy's report at one bar on one realisation.
type Outcome struct {
	Label  string
	Report Report
	Met    bool
}

// BarResult is the comparison at one bar over every realisation.
type BarResult struct {
	Bar Bar
	// Oracle, Candidate and each family's best setting, one per seed.
	Oracle    []Outcome
	Candidate []Outcome
	Best      map[string][]Outcome // by family; Label "none" when no setting met the bar
	// EqualBudget is, per seed, the baseline setting (any family) with
	// the lowest p99 among those whose idle VM-hours do not exceed the
	// candidate's.
	EqualBudget []Outcome
}

// CompareResult is the comparison on one trace shape.
type CompareResult struct {
	Trace string
	Bars  []BarResult
}

// Compare runs the oracle, every baseline setting and, per bar, the
// candidate on each realisation, workers at a time, and keeps for each
// family the setting meeting the bar with the fewest idle VM-hours.
func Compare(trace string, reals []Realisation, settings []Setting, cands []Candidate, workers int) (CompareResult, error) {
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	type job struct {
		real int
		run  func(o Options) Options
		out  *Report
	}
	oracles := make([]Report, len(reals))
	base := make([][]Report, len(reals))
	cand := make([][]Report, len(reals))
	var jobs []job
	for i := range reals {
		jobs = append(jobs, job{i, func(o Options) Options { o.Policy = PolicyOracle; return o }, &oracles[i]})
		base[i] = make([]Report, len(settings))
		for k, s := range settings {
			jobs = append(jobs, job{i, func(o Options) Options {
				o.Policy = s.Policy
				o.Schedule = schedule.Schedule{Default: s.Idle}
				return o
			}, &base[i][k]})
		}
		cand[i] = make([]Report, len(cands))
		for k, c := range cands {
			jobs = append(jobs, job{i, func(o Options) Options { c.Configure(&o); return o }, &cand[i][k]})
		}
	}
	errs := make([]error, len(jobs))
	var wg sync.WaitGroup
	next := make(chan int)
	for range workers {
		wg.Go(func() {
			for k := range next {
				j := jobs[k]
				r, err := Run(j.run(reals[j.real].Options))
				r.Assumptions, r.Series = nil, nil
				*j.out, errs[k] = r, err
			}
		})
	}
	for k := range jobs {
		next <- k
	}
	close(next)
	wg.Wait()
	for k, err := range errs {
		if err != nil {
			return CompareResult{}, fmt.Errorf("trace %s seed %d: %w", trace, reals[jobs[k].real].Seed, err)
		}
	}

	res := CompareResult{Trace: trace}
	for b, bar := range Bars {
		br := BarResult{Bar: bar, Best: map[string][]Outcome{}}
		for i := range reals {
			o := oracles[i]
			br.Oracle = append(br.Oracle, Outcome{"oracle", o, true})
			c := cand[i][min(b, len(cands)-1)]
			br.Candidate = append(br.Candidate, Outcome{cands[min(b, len(cands)-1)].Label, c, bar.Met(c, o)})
			for _, fam := range Families {
				best := Outcome{Label: "none"}
				for k, s := range settings {
					r := base[i][k]
					if s.Family != fam || !bar.Met(r, o) {
						continue
					}
					if !best.Met || r.IdleVMHours < best.Report.IdleVMHours {
						best = Outcome{s.Label, r, true}
					}
				}
				br.Best[fam] = append(br.Best[fam], best)
			}
			eq := Outcome{Label: "none"}
			for k, s := range settings {
				r := base[i][k]
				if r.IdleVMHours > c.IdleVMHours || r.Started != r.Jobs {
					continue
				}
				if !eq.Met || r.LatencyP99 < eq.Report.LatencyP99 {
					eq = Outcome{s.Family + " " + s.Label, r, true}
				}
			}
			br.EqualBudget = append(br.EqualBudget, eq)
		}
		res.Bars = append(res.Bars, br)
	}
	return res, nil
}

// stat is a mean with its spread (min and max) over realisations.
type stat struct{ mean, lo, hi float64 }

func statOf(v []float64) stat {
	if len(v) == 0 {
		return stat{math.NaN(), math.NaN(), math.NaN()}
	}
	s := stat{lo: v[0], hi: v[0]}
	for _, x := range v {
		s.mean += x
		s.lo, s.hi = min(s.lo, x), max(s.hi, x)
	}
	s.mean /= float64(len(v))
	return s
}

func (s stat) String() string {
	if math.IsNaN(s.mean) {
		return "-"
	}
	if s.lo == s.hi {
		return trimFloat(s.mean)
	}
	return fmt.Sprintf("%s [%s–%s]", trimFloat(s.mean), trimFloat(s.lo), trimFloat(s.hi))
}

func trimFloat(v float64) string {
	switch {
	case v < 0:
		return "inf"
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

func over(os []Outcome, f func(Report) float64) stat {
	var v []float64
	for _, o := range os {
		if o.Met {
			v = append(v, f(o.Report))
		}
	}
	return statOf(v)
}

// Verdict is how the candidate fares at one bar on one trace, on means
// over the realisations.
type Verdict struct {
	// IdleRatio is the candidate's idle VM-hours over the best baseline's
	// (NaN when no baseline met the bar).
	IdleRatio float64
	// BestFamily is the family of that best baseline.
	BestFamily string
	// Met is whether the candidate met the bar on every realisation.
	Met bool
	// P99Ratio is the candidate's p99 over the equal-budget baseline's.
	P99Ratio float64
}

// Verdict judges the candidate at this bar.
func (br BarResult) Verdict() Verdict {
	v := Verdict{IdleRatio: math.NaN(), P99Ratio: math.NaN(), Met: true}
	for _, c := range br.Candidate {
		v.Met = v.Met && c.Met
	}
	bestIdle := math.Inf(1)
	for _, fam := range Families {
		all := true
		for _, o := range br.Best[fam] {
			all = all && o.Met
		}
		if !all {
			continue // some realisation had no setting meeting the bar
		}
		if m := over(br.Best[fam], func(r Report) float64 { return r.IdleVMHours }).mean; m < bestIdle {
			bestIdle, v.BestFamily = m, fam
		}
	}
	cIdle := statOf(collect(br.Candidate, func(r Report) float64 { return r.IdleVMHours })).mean
	if !math.IsInf(bestIdle, 1) {
		v.IdleRatio = ratio(cIdle, bestIdle)
	}
	var eqP99 []float64
	for _, o := range br.EqualBudget {
		if o.Met {
			eqP99 = append(eqP99, o.Report.LatencyP99)
		}
	}
	if len(eqP99) == len(br.EqualBudget) && len(eqP99) > 0 {
		v.P99Ratio = ratio(statOf(collect(br.Candidate, func(r Report) float64 { return r.LatencyP99 })).mean, statOf(eqP99).mean)
	}
	return v
}

func collect(os []Outcome, f func(Report) float64) []float64 {
	v := make([]float64, len(os))
	for i, o := range os {
		v[i] = f(o.Report)
	}
	return v
}

// ratio is a/b, with 0/0 = 1 (both use nothing).
func ratio(a, b float64) float64 {
	if b == 0 {
		if a == 0 {
			return 1
		}
		return math.Inf(1)
	}
	return a / b
}

// WriteCompare writes the comparison as a table per bar: the oracle, the
// candidate and each family's best setting, with means and spreads over
// the realisations, then the verdict against the goals.
func WriteCompare(w io.Writer, res CompareResult) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "trace %s\n", res.Trace)
	for _, br := range res.Bars {
		fmt.Fprintf(tw, "  bar %s\tsetting per seed\tidle VM-h\tp90 s\tp99 s\t≤120 s %%\tcalls/job\tmet\n", br.Bar.Name)
		row := func(name string, os []Outcome) {
			labels := make([]string, len(os))
			met := 0
			for i, o := range os {
				labels[i] = o.Label
				if o.Met {
					met++
				}
			}
			setting := strings.Join(slices.Compact(slices.Clone(labels)), " | ")
			pct := over(os, func(r Report) float64 { return 100 * r.WithinSLO })
			fmt.Fprintf(tw, "    %s\t%s\t%s\t%s\t%s\t%s\t%s\t%d/%d\n", name, setting,
				over(os, func(r Report) float64 { return r.IdleVMHours }), over(os, func(r Report) float64 { return r.LatencyP90 }),
				over(os, func(r Report) float64 { return r.LatencyP99 }), pct,
				over(os, func(r Report) float64 { return r.APICallsPerJob }), met, len(os))
		}
		row("oracle", br.Oracle)
		row("predictive", br.Candidate)
		for _, fam := range Families {
			row(fam, br.Best[fam])
		}
		row("baseline at predictive's idle budget", br.EqualBudget)
		v := br.Verdict()
		fmt.Fprintf(tw, "    verdict\tpredictive met the bar: %v; idle VM-h vs best baseline (%s): %s; p99 vs the baseline at equal idle budget: %s\n",
			v.Met, v.BestFamily, pctText(v.IdleRatio), ratioText(v.P99Ratio))
	}
	fmt.Fprintln(tw)
	return tw.Flush()
}

func pctText(r float64) string {
	switch {
	case math.IsNaN(r):
		return "no baseline met the bar"
	case math.IsInf(r, 1):
		return "more (baseline 0)"
	}
	return fmt.Sprintf("%+.0f%%", 100*(r-1))
}

func ratioText(r float64) string {
	if math.IsNaN(r) {
		return "-"
	}
	return fmt.Sprintf("%.2f×", r)
}
