package schedule

import (
	"math"
	"time"
)

// Style says how a policy's idle values combine, following the autoscaler
// whose configuration block they were read from.
type Style int

const (
	// DockerMachine combines values as gitlab-runner's [runners.machine] does:
	// IdleCount is the ceiling and IdleCountMin the floor of the scaled target.
	DockerMachine Style = iota
	// Taskscaler combines values as [[runners.autoscaler.policy]] does:
	// idle_count is the floor and scale_factor_limit the ceiling.
	Taskscaler
)

// String returns the configuration block the style comes from.
func (s Style) String() string {
	if s == Taskscaler {
		return "taskscaler"
	}
	return "docker+machine"
}

// Policy is the idle-pool policy in force for one period.
type Policy struct {
	Style            Style
	IdleCount        int           // idle instances to keep (ceiling with DockerMachine, floor with Taskscaler)
	IdleCountMin     int           // DockerMachine: floor of the scaled target when ScaleFactor > 0
	ScaleFactor      float64       // idle instances per instance in use; 0 = off
	ScaleFactorLimit int           // Taskscaler: ceiling of the scaled target; 0 = none
	IdleTime         time.Duration // how long a surplus idle instance may live
	PreemptiveMode   bool          // Taskscaler: ask for jobs only when an instance is free
	// Predictive sizes the idle pool from the measured acquisition rate
	// and boot time instead of IdleTarget: the PredictiveQuantile quantile
	// of the acquisitions expected within one boot time plus one check
	// interval, at least 1 and at most IdleCount (the ceiling with either
	// Style). ScaleFactor, IdleCountMin and ScaleFactorLimit are ignored.
	Predictive bool
	// PredictiveQuantile is the probability that the predicted pool covers
	// the acquisitions of one lead time, in (0,1); 0 means
	// DefaultPredictiveQuantile.
	PredictiveQuantile float64
	// PredictiveWithin is the queue-to-start time the predictive pool
	// aims to keep that share of jobs within (0: at once). A job that
	// finds no idle instance is taken on demand and waits about one
	// boot, so the pool only covers the jobs of one boot time plus the
	// check interval less PredictiveWithin; when boots are quicker than
	// that, it keeps no idle instance at all.
	PredictiveWithin time.Duration
}

// DefaultPredictiveQuantile is the PredictiveQuantile used when it is 0.
const DefaultPredictiveQuantile = 0.95

// Quantile returns PredictiveQuantile, or DefaultPredictiveQuantile when
// it is 0.
func (p Policy) Quantile() float64 {
	if p.PredictiveQuantile == 0 {
		return DefaultPredictiveQuantile
	}
	return p.PredictiveQuantile
}

// IdleTarget returns how many idle instances the policy asks for while
// inUse instances run jobs.
func (p Policy) IdleTarget(inUse int) int {
	if p.ScaleFactor <= 0 {
		return p.IdleCount
	}
	scaled := float64(inUse) * p.ScaleFactor
	if p.Style == Taskscaler {
		want := int(math.Ceil(scaled))
		if p.ScaleFactorLimit > 0 && want > p.ScaleFactorLimit {
			want = p.ScaleFactorLimit
		}
		return max(p.IdleCount, want)
	}
	// gitlab-runner truncates and forces the floor to at least 1.
	return min(p.IdleCount, max(p.IdleCountMin, 1, int(scaled)))
}
