package fleet

import (
	"math"
	"slices"
	"time"

	"github.com/mayfly-ci/mayfly/schedule"
)

// Tuning of the predictive idle policy (schedule.Policy.Predictive).
const (
	// PredictiveReevaluate is how often the predictive target is
	// recomputed when nothing else happens, as arrivals age out of the
	// rate windows.
	PredictiveReevaluate = 30 * time.Second
)

// rateWindows are the sliding windows over which the acquisition rate is
// measured; the highest rate wins, so the short window reacts to a burst and
// the long one remembers it.
var rateWindows = [...]time.Duration{5 * time.Minute, 30 * time.Minute}

// Demand is what the predictive policy needs to know about recent traffic,
// measured by a DemandMeter.
type Demand struct {
	// Rate is the acquisition rate, per second.
	Rate float64
	// BootMean is the mean of the recent boot times (0 before the first).
	BootMean time.Duration
	// Boost is the catch-up target while demand outruns supply (0: none).
	Boost int
	// Peak measures bursts, such as a pipeline of 50 parallel jobs, that
	// a Poisson rate understates: of the acquisitions of the last 30
	// minutes, each saw some number of acquisitions within one lead time
	// (BootMean plus the check interval) before it, itself included; Peak
	// is the quantile (1+q)/2 of those numbers, q the policy's quantile.
	// An idle pool that large would have served that share of the jobs at
	// once. The quantile is closer to 1 than q because when a burst finds
	// the pool short, many jobs miss together.
	Peak int
}

// PredictiveTarget is the predictive idle target: the Poisson quantile
// p.Quantile() of the acquisitions expected in one lead time, rate ×
// (bootMean + check), at least 1 and at most p.IdleCount.
func PredictiveTarget(p schedule.Policy, rate float64, bootMean, check time.Duration) int {
	n := PoissonQuantile(rate*(bootMean+check).Seconds(), p.Quantile())
	return max(min(n, p.IdleCount), min(1, p.IdleCount), 0)
}

// PoissonQuantile returns the smallest n with P(X ≤ n) ≥ q for X Poisson
// with mean mu.
func PoissonQuantile(mu, q float64) int {
	if mu <= 0 || q <= 0 {
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

// DemandMeter measures acquisitions and boot times for the predictive
// policy. Times come from the caller (the fleet's clock). The zero value is
// ready to use; it is not safe for concurrent use.
type DemandMeter struct {
	acq   []time.Time // acquisition times within the longest window, ascending
	head  int
	hist  []int // peak's scratch
	boots BootTimes
	// boost is the target while demand outruns supply: doubled at most
	// once per lead time while the pool keeps running dry.
	boost      int
	boostAt    time.Time
	boostUntil time.Time
}

// Acquired records an acquisition at now.
func (d *DemandMeter) Acquired(now time.Time) {
	d.forget(now)
	d.acq = append(d.acq, now)
}

// forget drops the acquisitions older than the longest window.
func (d *DemandMeter) forget(now time.Time) {
	cut := now.Add(-rateWindows[len(rateWindows)-1])
	for d.head < len(d.acq) && !d.acq[d.head].After(cut) {
		d.head++
	}
	if d.head == len(d.acq) || d.head > 4096 && d.head*2 > len(d.acq) {
		d.acq = append(d.acq[:0], d.acq[d.head:]...)
		d.head = 0
	}
}

// Booted records an instance that took b from creation to running.
func (d *DemandMeter) Booted(b time.Duration) { d.boots.Observe(b) }

// BootMean returns the mean of the recent boot times (0 before the first).
func (d *DemandMeter) BootMean() time.Duration { return d.boots.Mean() }

// BootMedian returns the median of the recent boot times (0 before the
// first): the expected boot time of the next instance.
func (d *DemandMeter) BootMedian() time.Duration { return d.boots.Median() }

// BootShortest returns the shortest of the recent boot times (0 before the
// first).
func (d *DemandMeter) BootShortest() time.Duration { return d.boots.Shortest() }

// Missed records that a job found the pool empty at now. Acquisitions then
// measure supply, not demand, so the target is raised to twice the
// acquisitions of the last lead time (boot mean + check), held for one lead
// time, and doubled at most once per lead time while the pool keeps running
// dry (like TCP slow start).
func (d *DemandMeter) Missed(now time.Time, check time.Duration) {
	lead := d.BootMean() + check
	if !d.boostAt.IsZero() && now.Sub(d.boostAt) < lead {
		return
	}
	d.boost = max(2*d.countSince(now.Add(-lead)), 2)
	d.boostAt = now
	d.boostUntil = now.Add(lead)
}

// countSince returns the acquisitions after from.
func (d *DemandMeter) countSince(from time.Time) int {
	live := d.acq[d.head:]
	i, _ := slices.BinarySearchFunc(live, from, func(a, t time.Time) int {
		if a.After(t) {
			return 1
		}
		return -1
	})
	return len(live) - i
}

// Rate returns the highest acquisition rate over the windows, per second,
// and forgets acquisitions older than the longest window.
func (d *DemandMeter) Rate(now time.Time) float64 {
	d.forget(now)
	best := 0.0
	for _, w := range rateWindows {
		best = max(best, float64(d.countSince(now.Add(-w)))/w.Seconds())
	}
	return best
}

// Demand returns the measurements at now for a Snapshot; check is the
// runner's check interval, part of the lead time, and q the policy's
// quantile.
func (d *DemandMeter) Demand(now time.Time, check time.Duration, q float64) Demand {
	dm := Demand{Rate: d.Rate(now), BootMean: d.BootMean()}
	if now.Before(d.boostUntil) {
		dm.Boost = d.boost
	}
	dm.Peak = d.peak(dm.BootMean+check, (1+q)/2)
	return dm
}

// peak returns the q-quantile, over the acquisitions remembered (the
// longest rate window), of how many acquisitions each saw within lead
// before it, itself included (see Demand.Peak).
func (d *DemandMeter) peak(lead time.Duration, q float64) int {
	live := d.acq[d.head:]
	if len(live) == 0 {
		return 0
	}
	// Each count is at most len(live): count them by value (O(n)).
	if cap(d.hist) < len(live)+1 {
		d.hist = make([]int, len(live)+1)
	}
	hist := d.hist[:len(live)+1]
	clear(hist)
	lo := 0
	for hi, t := range live {
		for t.Sub(live[lo]) >= lead {
			lo++
		}
		hist[hi-lo+1]++
	}
	rank := min(int(q*float64(len(live))), len(live)-1) // 0-based rank in ascending order
	for v, n := range hist {
		if rank < n {
			return v
		}
		rank -= n
	}
	return len(live)
}

// idleTarget is the idle target of policy p for a pass on snapshot s.
func idleTarget(s *Snapshot, p schedule.Policy, l Limits, inUse int) int {
	if !p.Predictive {
		return max(p.IdleTarget(inUse), 0)
	}
	check := l.CheckInterval
	if check <= 0 {
		check = DefaultCheckInterval
	}
	t := PredictiveTarget(p, s.Demand.Rate, s.Demand.BootMean, check)
	t = max(t, min(s.Demand.Peak, p.IdleCount), min(s.Demand.Boost, p.IdleCount))
	return t
}
