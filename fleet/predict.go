package fleet

import (
	"math"
	"slices"
	"time"

	"github.com/mayfly-ci/mayfly/schedule"
)

// The predictive idle policy (schedule.Policy.Predictive) keeps a base
// stock: idle instances plus those on their way, enough that a job finds
// one when it comes. A job that finds none is taken on demand and waits
// about one boot, so the pool only has to cover the jobs of one lead time:
// the Create batch window and the mean boot time, less the wait the policy
// allows beyond the runner's poll (PredictiveWithin less one check
// interval). With lead time 0 it keeps no idle instance at all, and it
// always takes jobs on demand (see Reservable).
//
// How large a stock? Of the jobs of the last half hour, each saw some
// number of jobs come within one lead time before it, itself included: a
// stock of S would have served those that saw at most S (the job-weighted
// distribution), and would have stood idle, on average, by S less the jobs
// of the last lead time (the time-weighted distribution). The policy
// weighs one against the other with a price, in idle instance-seconds per
// job served at once: the stock minimises
//
//	idle(S) + price × rate × (1 − served(S)).
//
// A price keeps a large stock where it serves many jobs (busy hours) and a
// small one, often none, where it would serve few (nights): for the same
// share of jobs served at once, far fewer idle instance-hours than a stock
// sized to one quantile at all times. The price is not configured: it is
// learned, so that the share of jobs the fleet serves within
// PredictiveWithin is the policy's quantile. Each job served in time
// lowers it a little, each one that waits longer raises it, and at the
// quantile the two balance. When the rate over the last 5 minutes runs
// ahead of the half hour's (a surge), a Poisson model at that rate bounds
// the stock from below.

// Tuning of the predictive idle policy.
const (
	// PredictiveReevaluate is how often the predictive target is
	// recomputed when nothing else happens, as jobs age out of the window.
	PredictiveReevaluate = 30 * time.Second
	// demandWindow is how far back the job distributions look.
	demandWindow = 30 * time.Minute
	// surgeWindow is the short window whose rate bounds the stock from
	// below when it runs ahead of demandWindow's.
	surgeWindow = 5 * time.Minute
	// priceStart is the price before anything was learned, in idle
	// instance-seconds per job served in time.
	priceStart = 300.0
	// priceMin and priceMax bound the learned price.
	priceMin, priceMax = 1.0, 1e6
	// priceStep is the learning rate: a job served late raises the price
	// by a factor exp(priceStep × q), one served in time lowers it by
	// exp(priceStep × (1 − q)).
	priceStep = 0.02
	// demandRecompute is the least time between two computations of the
	// stock (they read every job of the window).
	demandRecompute = 2 * time.Second
)

// Demand is what the predictive policy needs to know about recent traffic,
// measured by a DemandMeter.
type Demand struct {
	// Rate is the rate at which jobs came for instances over the window,
	// per second.
	Rate float64
	// Lead is the time the idle pool must cover: the Create batch window
	// and the mean of the recent boot times, less the wait the policy
	// allows beyond the runner's poll, at least 0 (see predictiveLead).
	Lead time.Duration
	// Price is the learned price of a job served in time, in idle
	// instance-seconds.
	Price float64
	// Stock is the base stock the price asks for (idle plus on their way).
	Stock int
}

// PredictiveTarget is the Poisson quantile p.Quantile() of the jobs
// expected within lead at rate (per second), at most p.IdleCount: the
// stock that serves that share of jobs at once under Poisson arrivals. 0
// when lead is 0.
func PredictiveTarget(p schedule.Policy, rate float64, lead time.Duration) int {
	if lead <= 0 {
		return 0
	}
	return max(min(PoissonQuantile(rate*lead.Seconds(), p.Quantile()), p.IdleCount), 0)
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

// DemandMeter measures jobs, boot times and how often jobs were served in
// time, for the predictive policy. Times come from the caller (the fleet's
// clock). The zero value is ready to use; it is not safe for concurrent
// use.
type DemandMeter struct {
	acq   []time.Time // times jobs came, within demandWindow, ascending
	head  int
	boots BootTimes
	price float64 // 0: priceStart

	// The last computation, reused within demandRecompute.
	lastAt    time.Time
	lastLead  time.Duration
	lastPrice float64
	lastStock int
	jobHist   []float64 // scratch: jobs by how many came within a lead before them
	timeHist  []float64 // scratch: seconds by how many came within the lead before
}

// Acquired records that a job came for an instance at now.
func (d *DemandMeter) Acquired(now time.Time) {
	d.forget(now)
	d.acq = append(d.acq, now)
}

// forget drops the jobs older than demandWindow.
func (d *DemandMeter) forget(now time.Time) {
	cut := now.Add(-demandWindow)
	for d.head < len(d.acq) && !d.acq[d.head].After(cut) {
		d.head++
	}
	if d.head == len(d.acq) || d.head > 4096 && d.head*2 > len(d.acq) {
		d.acq = append(d.acq[:0], d.acq[d.head:]...)
		d.head = 0
	}
}

// Served records whether a job got its instance within the wait the
// policy allows, for a policy whose share of such jobs is to be q: the
// price of a job served in time moves towards the one at which that share
// is q.
func (d *DemandMeter) Served(inTime bool, q float64) {
	p := d.Price()
	if inTime {
		p *= math.Exp(-priceStep * (1 - q))
	} else {
		p *= math.Exp(priceStep * q)
	}
	d.price = min(max(p, priceMin), priceMax)
}

// Price returns the learned price of a job served in time, in idle
// instance-seconds.
func (d *DemandMeter) Price() float64 {
	if d.price == 0 {
		return priceStart
	}
	return d.price
}

// Booted records an instance that took b from creation to ready.
func (d *DemandMeter) Booted(b time.Duration) { d.boots.Observe(b) }

// BootMean returns the mean of the recent boot times (0 before the first).
func (d *DemandMeter) BootMean() time.Duration { return d.boots.Mean() }

// BootMedian returns the median of the recent boot times (0 before the
// first): the expected boot time of the next instance.
func (d *DemandMeter) BootMedian() time.Duration { return d.boots.Median() }

// BootShortest returns the shortest of the recent boot times (0 before the
// first).
func (d *DemandMeter) BootShortest() time.Duration { return d.boots.Shortest() }

// countSince returns the jobs after from.
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

// Rate returns the job rate over demandWindow, per second, and forgets
// jobs older than it.
func (d *DemandMeter) Rate(now time.Time) float64 {
	d.forget(now)
	return float64(len(d.acq)-d.head) / demandWindow.Seconds()
}

// Demand returns the measurements at now for a Snapshot: lead is the time
// the pool must cover (Demand.Lead).
func (d *DemandMeter) Demand(now time.Time, lead time.Duration) Demand {
	dm := Demand{Rate: d.Rate(now), Lead: lead, Price: d.Price()}
	if lead <= 0 {
		return dm
	}
	if now.Sub(d.lastAt) < demandRecompute && now.Sub(d.lastAt) >= 0 && lead == d.lastLead && dm.Price == d.lastPrice {
		dm.Stock = d.lastStock
		return dm
	}
	dm.Stock = d.stock(now, lead, dm.Price)
	if short := float64(d.countSince(now.Add(-surgeWindow))) / surgeWindow.Seconds(); short > dm.Rate {
		dm.Stock = max(dm.Stock, poissonStock(short*lead.Seconds(), short, dm.Price))
	}
	d.lastAt, d.lastLead, d.lastPrice, d.lastStock = now, lead, dm.Price, dm.Stock
	return dm
}

// stock is the base stock minimising idle(S) + price × rate × (1 −
// served(S)) over the jobs of the window (see the package comment above).
func (d *DemandMeter) stock(now time.Time, lead time.Duration, price float64) int {
	live := d.acq[d.head:]
	n := len(live)
	if n == 0 {
		return 0
	}
	from := now.Add(-demandWindow)
	// Job-weighted: how many jobs each job saw within one lead before it,
	// itself included.
	jobs := grow(&d.jobHist, n+2)
	lo := 0
	for hi, t := range live {
		for t.Sub(live[lo]) >= lead {
			lo++
		}
		jobs[hi-lo+1]++
	}
	// Time-weighted: over the window, how long the jobs of the last lead
	// numbered k. The level rises at each job and falls one lead later.
	times := grow(&d.timeHist, n+2)
	level, at := 0, from
	i, j := 0, 0 // next rise (live[i]) and next fall (live[j] + lead)
	for at.Before(now) {
		next := now
		if i < n && live[i].Before(next) {
			next = live[i]
		}
		if j < n && live[j].Add(lead).Before(next) {
			next = live[j].Add(lead)
		}
		times[level] += next.Sub(at).Seconds()
		at = next
		for i < n && !live[i].After(at) {
			level++
			i++
		}
		for j < i && !live[j].Add(lead).After(at) {
			level--
			j++
		}
	}
	rate := float64(n) / demandWindow.Seconds()
	span := demandWindow.Seconds()
	// J(S+1) − J(S) = P_time(level ≤ S) − price × rate × P_jobs(N = S+1).
	best, bestJ, cost := 0, 0.0, 0.0
	cumTime := 0.0
	for s := 0; s <= n; s++ {
		cumTime += times[s] / span
		cost += cumTime - price*rate*jobs[s+1]/float64(n)
		if cost < bestJ {
			best, bestJ = s+1, cost
		}
	}
	return best
}

// poissonStock is the base stock minimising the same cost when the jobs
// within one lead are Poisson with mean mu, at rate (per second).
func poissonStock(mu, rate, price float64) int {
	if mu <= 0 {
		return 0
	}
	// J(S+1) − J(S) = P(D ≤ S) − price × rate × P(D = S).
	p := math.Exp(-mu)
	cdf := 0.0
	best, bestJ, cost := 0, 0.0, 0.0
	limit := int(mu + 10*math.Sqrt(mu) + 10)
	for s := 0; s <= limit; s++ {
		if s > 0 {
			p *= mu / float64(s)
		}
		cdf += p
		cost += cdf - price*rate*p
		if cost < bestJ {
			best, bestJ = s+1, cost
		}
	}
	return best
}

// grow returns (*buf)[:n], zeroed, reusing the buffer.
func grow(buf *[]float64, n int) []float64 {
	if cap(*buf) < n {
		*buf = make([]float64, n)
	}
	b := (*buf)[:n]
	clear(b)
	return b
}

// idleTarget is the idle target of policy p for a pass on snapshot s.
func idleTarget(s *Snapshot, p schedule.Policy, inUse int) int {
	if !p.Predictive {
		return max(p.IdleTarget(inUse), 0)
	}
	return max(min(s.Demand.Stock, p.IdleCount), 0)
}

// predictiveLead is the time the predictive pool must cover: from a job
// taking an instance to its replacement being ready (the create batch
// window and the mean boot), less the wait the policy allows beyond the
// runner's poll (PredictiveWithin less one check interval).
func predictiveLead(bootMean, check, batch time.Duration, p schedule.Policy) time.Duration {
	if check <= 0 {
		check = DefaultCheckInterval
	}
	return max(bootMean+batch-max(p.PredictiveWithin-check, 0), 0)
}
