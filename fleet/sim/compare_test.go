package sim_test

import (
	"flag"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/fleet"
	"github.com/mayfly-ci/mayfly/fleet/sim"
	"github.com/mayfly-ci/mayfly/fleet/sim/traces"
	"github.com/mayfly-ci/mayfly/schedule"
)

var (
	compareShapes = flag.String("compare.shapes", "", "BenchmarkCompare: comma-separated trace shapes (default: the evaluation shapes; \"all\": every shape)")
	compareSeeds  = flag.Int("compare.seeds", 3, "BenchmarkCompare: realisations (trace and provider seeds 1..N)")
	compareQA     = flag.Float64("compare.qa", predictiveQA, "BenchmarkCompare: the predictive quantile at bar (a)")
	compareQB     = flag.Float64("compare.qb", predictiveQB, "BenchmarkCompare: the predictive quantile at bar (b)")
	compareBase   = flag.Bool("compare.baselines", true, "BenchmarkCompare: tune the baselines (false: predictive and oracle only)")
)

// The predictive policy's settings at each bar, chosen on the tuning
// shapes only (weekly, weekly-windows, nightly, monorepo; one seed): at bar
// (a) it is told the SLO itself (jobs to start within 120 s), at bar (b)
// that they should start at once. The share of jobs to serve so is 0.92
// at both: at 0.90 the nightly trace missed bar (b) (p90 above 4 s), and
// the Windows trace met bar (a) with only 91.7 % within 120 s at 0.92.
const (
	predictiveQA = 0.92
	predictiveQB = 0.92
)

// compareOptions are the settings of the comparison for a shape and seed:
// IdleTime 10 min, MaxGrowthRate 100, check_interval 3 s, single-use VMs,
// the default on-demand window, boots of about 45 s (Linux) or 300 s
// (Windows) drawn with the seed.
func compareOptions(sh traces.Shape, seed uint64) sim.Options {
	p := sim.DefaultProvider(sh.OS)
	p.Seed = seed
	return sim.Options{
		Trace:    sh.Name,
		Jobs:     sh.Generate(seed),
		Limits:   fleet.Limits{MaxUses: 1, MaxGrowthRate: 100, CheckInterval: 3 * time.Second, OnDemandWithin: 90 * time.Second},
		Provider: p,
	}
}

// BenchmarkCompare judges the predictive policy against every baseline
// tuned over its real knobs (sim.BaselineSettings), at both bars of issue 15,
// on several realisations of each trace shape (trace and provider seeds),
// and prints for each bar the oracle, predictive, each baseline's best
// setting and the baseline at predictive's idle budget, with means and
// spreads, then the verdict. By default it runs the evaluation shapes,
// which the predictive policy was not tuned on. It asserts nothing.
//
//	go test -run '^$' -bench Compare -benchtime 1x -timeout 2h ./fleet/sim/ [-args -compare.shapes=all]
func BenchmarkCompare(b *testing.B) {
	var shapes []traces.Shape
	switch *compareShapes {
	case "":
		for _, sh := range traces.Shapes {
			if sh.Evaluation {
				shapes = append(shapes, sh)
			}
		}
	case "all":
		shapes = traces.Shapes
	default:
		for name := range strings.SplitSeq(*compareShapes, ",") {
			sh, err := traces.Lookup(name)
			if err != nil {
				b.Fatal(err)
			}
			shapes = append(shapes, sh)
		}
	}
	for b.Loop() {
		for _, sh := range shapes {
			start := time.Now()
			var reals []sim.Realisation
			for seed := range uint64(*compareSeeds) {
				reals = append(reals, sim.Realisation{Seed: seed + 1, Options: compareOptions(sh, seed+1)})
			}
			var settings []sim.Setting
			if *compareBase {
				settings = sim.BaselineSettings(10 * time.Minute)
			}
			cands := []sim.Candidate{
				{fmt.Sprintf("predictive q=%g within 120s", *compareQA), func(o *sim.Options) {
					o.Policy = sim.PolicyPredictive
					o.Schedule = schedule.Schedule{Default: schedule.Policy{IdleCount: 1000, IdleTime: 10 * time.Minute}}
					o.Predictive = sim.Predictive{Quantile: *compareQA, Within: 120 * time.Second}
				}},
				{fmt.Sprintf("predictive q=%g at once", *compareQB), func(o *sim.Options) {
					o.Policy = sim.PolicyPredictive
					o.Schedule = schedule.Schedule{Default: schedule.Policy{IdleCount: 1000, IdleTime: 10 * time.Minute}}
					o.Predictive = sim.Predictive{Quantile: *compareQB}
				}},
			}
			res, err := sim.Compare(sh.Name, reals, settings, cands, 0)
			if err != nil {
				b.Fatal(err)
			}
			if err := sim.WriteCompare(os.Stdout, res); err != nil {
				b.Fatal(err)
			}
			fmt.Printf("  (%s: %d jobs in the first realisation, %s)\n\n", sh.Doc, len(reals[0].Options.Jobs), time.Since(start).Round(time.Second))
		}
	}
}
