package sim

import (
	"fmt"
	"time"

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
	// Within, when set, replaces every policy's PredictiveWithin: the
	// queue-to-start time the pool aims to keep that share of jobs within.
	Within time.Duration
}

func (p *Predictive) defaults() error {
	if p.Quantile < 0 || p.Quantile >= 1 {
		return fmt.Errorf("predictive: quantile must be in (0,1), got %g", p.Quantile)
	}
	if p.Within < 0 {
		return fmt.Errorf("predictive: within must not be negative, got %s", p.Within)
	}
	return nil
}

// predictive turns pol into the predictive policy the simulation runs.
func (p Predictive) apply(pol schedule.Policy) schedule.Policy {
	pol.Predictive = true
	if p.Quantile > 0 {
		pol.PredictiveQuantile = p.Quantile
	}
	if p.Within > 0 {
		pol.PredictiveWithin = p.Within
	}
	return pol
}

// describe is the assumption line of the predictive policy.
func (p Predictive) describe(check fmt.Stringer) string {
	q := "the policy's quantile (default 0.95)"
	if p.Quantile > 0 {
		q = fmt.Sprintf("%.2f", p.Quantile)
	}
	within := "at once"
	if p.Within > 0 {
		within = "within " + p.Within.String()
	}
	return fmt.Sprintf("predictive (fleet's DemandMeter, production code): a share %s of jobs to start %s (check interval %s); base stock (idle + booting) minimising idle + price × rate × jobs not served in time over the jobs of the last 30m, lead = Create batch + mean boot − the allowed wait; the price learned so that the share served in time is the quantile; recomputed at least every %s",
		q, within, check, fleet.PredictiveReevaluate)
}
