package sim

import (
	"fmt"

	"github.com/mayfly-ci/mayfly/fleet"
	"github.com/mayfly-ci/mayfly/schedule"
)

// Predictive tunes the predictive idle-pool policy, which runs the
// runtime fleet's code: schedule.Policy.Predictive, fleet.PredictiveTarget
// and fleet.DemandMeter.
type Predictive struct {
	// Quantile, when set, replaces every policy's PredictiveQuantile: the
	// probability that the idle pool covers the acquisitions expected
	// within one lead time (0: the policy's own, by default 0.95).
	Quantile float64
}

func (p *Predictive) defaults() error {
	if p.Quantile < 0 || p.Quantile >= 1 {
		return fmt.Errorf("predictive: quantile must be in (0,1), got %g", p.Quantile)
	}
	return nil
}

// predictive turns pol into the predictive policy the simulation runs.
func (p Predictive) apply(pol schedule.Policy) schedule.Policy {
	pol.Predictive = true
	if p.Quantile > 0 {
		pol.PredictiveQuantile = p.Quantile
	}
	return pol
}

// describe is the assumption line of the predictive policy.
func (p Predictive) describe(check fmt.Stringer) string {
	q := "the policy's quantile (default 0.95)"
	if p.Quantile > 0 {
		q = fmt.Sprintf("%.2f", p.Quantile)
	}
	return fmt.Sprintf("predictive (fleet.PredictiveTarget, production code): idle target = min(IdleCount, max(1, PoissonQuantile(%s, rate × (mean of last 16 boots + check interval %s)))), rate = the highest acquisition rate over 5m and 30m windows, recomputed every %s; at least the (1+q)/2 quantile, over the acquisitions of the last 30m, of the acquisitions each saw within one lead time before it (bursts); when the pool runs dry right after a job was received, the target is raised to twice the acquisitions of the last lead time, at most once per lead time, held for one lead time",
		q, check, fleet.PredictiveReevaluate)
}
