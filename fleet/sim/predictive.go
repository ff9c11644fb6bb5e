package sim

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/mayfly-ci/mayfly/schedule"
)

// Predictive tunes the predictive idle-pool policy.
type Predictive struct {
	// Quantile is the probability that the idle pool covers the
	// acquisitions expected within one boot time (default 0.95).
	Quantile float64
	// Windows are the sliding windows over which the acquisition rate is
	// measured; the highest rate wins, so a short window reacts to a burst
	// and a long one remembers it (default 5m and 30m).
	Windows []time.Duration
	// Min is the floor of the target (default 1: the manager asks for a
	// job only when an instance is idle).
	Min int
	// Reevaluate is how often the target is recomputed when nothing
	// else happens (default 30s).
	Reevaluate time.Duration
}

func (p *Predictive) defaults() error {
	if p.Quantile == 0 {
		p.Quantile = 0.95
	}
	if p.Quantile <= 0 || p.Quantile >= 1 {
		return fmt.Errorf("predictive: quantile must be in (0,1), got %g", p.Quantile)
	}
	if len(p.Windows) == 0 {
		p.Windows = []time.Duration{5 * time.Minute, 30 * time.Minute}
	}
	for _, w := range p.Windows {
		if w <= 0 {
			return errors.New("predictive: windows must be positive")
		}
	}
	if p.Min < 0 {
		return fmt.Errorf("predictive: min must not be negative, got %d", p.Min)
	}
	if p.Min == 0 {
		p.Min = 1
	}
	if p.Reevaluate <= 0 {
		p.Reevaluate = 30 * time.Second
	}
	return nil
}

// PredictiveTarget is the predictive idle target: the Poisson quantile q
// of the acquisitions expected in one lead time (rate × (boot + check
// interval)), at least floor and at most ceiling (the policy's IdleCount).
func PredictiveTarget(ratePerSec float64, lead time.Duration, q float64, floor, ceiling int) int {
	n := PoissonQuantile(ratePerSec*lead.Seconds(), q)
	return max(min(n, ceiling), min(floor, ceiling))
}

// PoissonQuantile returns the smallest n with P(X ≤ n) ≥ q for X Poisson
// with mean mu.
func PoissonQuantile(mu, q float64) int {
	if mu <= 0 {
		return 0
	}
	if mu > 500 {
		// Normal approximation with continuity correction.
		z := math.Sqrt2 * math.Erfinv(2*q-1)
		return int(math.Ceil(mu + z*math.Sqrt(mu) - 0.5))
	}
	p := math.Exp(-mu)
	cdf := p
	n := 0
	for cdf < q && n < 100000 {
		n++
		p *= mu / float64(n)
		cdf += p
	}
	return n
}

// predictor measures what the runtime fleet can see: when instances are
// acquired and how long they take to boot.
type predictor struct {
	o     Predictive
	check time.Duration
	acq   []time.Time // acquisition times within the longest window
	head  int
	long  time.Duration
	boots [16]time.Duration
	bootN int
	// boost is the target while demand outruns supply: doubled at most
	// once per boot time while the pool keeps running dry.
	boost      int
	boostAt    time.Time
	boostUntil time.Time
	last       int // the last target
}

func newPredictor(o Predictive, check time.Duration) *predictor {
	p := &predictor{o: o, check: check}
	for _, w := range o.Windows {
		p.long = max(p.long, w)
	}
	return p
}

func (p *predictor) describe() string {
	return fmt.Sprintf("predictive: idle target = min(IdleCount, max(%d, PoissonQuantile(%.2f, rate × (mean of last 16 boots + check interval)))), rate = the highest acquisition rate over windows %v, recomputed every %s; when the pool runs dry right after a job was received, the target is raised to twice the acquisitions of the last lead time, at most once per lead time, held for one lead time",
		p.o.Min, p.o.Quantile, p.o.Windows, p.o.Reevaluate)
}

func (p *predictor) acquired(now time.Time) { p.acq = append(p.acq, now) }

// missed records that the manager found the pool empty right after it
// received a job. Acquisitions then measure supply, not demand, so the
// target is raised to twice the acquisitions of the last lead time (like
// TCP slow start: it doubles per lead time while the pool keeps running
// dry), held for one lead time (boot time + check interval).
func (p *predictor) missed(now time.Time) {
	lead := p.bootTime() + p.check
	if !p.boostAt.IsZero() && now.Sub(p.boostAt) < lead {
		return
	}
	p.boost = max(2*p.countSince(now.Add(-lead)), 2)
	p.boostAt = now
	p.boostUntil = now.Add(lead)
}

// countSince returns the acquisitions after from.
func (p *predictor) countSince(from time.Time) int {
	live := p.acq[p.head:]
	i, _ := slices.BinarySearchFunc(live, from, func(a, t time.Time) int {
		if a.After(t) {
			return 1
		}
		return -1
	})
	return len(live) - i
}

func (p *predictor) booted(d time.Duration) {
	p.boots[p.bootN%len(p.boots)] = d
	p.bootN++
}

// bootTime is the mean of the recent boots (0 before the first).
func (p *predictor) bootTime() time.Duration {
	n := min(p.bootN, len(p.boots))
	if n == 0 {
		return 0
	}
	var sum time.Duration
	for _, d := range p.boots[:n] {
		sum += d
	}
	return sum / time.Duration(n)
}

// rate returns the highest acquisition rate over the windows, per second.
func (p *predictor) rate(now time.Time) float64 {
	cut := now.Add(-p.long)
	for p.head < len(p.acq) && !p.acq[p.head].After(cut) {
		p.head++
	}
	if p.head > 4096 && p.head*2 > len(p.acq) {
		p.acq = append(p.acq[:0], p.acq[p.head:]...)
		p.head = 0
	}
	best := 0.0
	for _, w := range p.o.Windows {
		best = max(best, float64(p.countSince(now.Add(-w)))/w.Seconds())
	}
	return best
}

// target is the idle count for the pass at now under policy pol.
func (p *predictor) target(now time.Time, pol schedule.Policy) int {
	t := PredictiveTarget(p.rate(now), p.bootTime()+p.check, p.o.Quantile, p.o.Min, pol.IdleCount)
	if now.Before(p.boostUntil) {
		t = max(t, min(p.boost, pol.IdleCount))
	}
	p.last = t
	return t
}
