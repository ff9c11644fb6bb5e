package fleet

import (
	"slices"
	"time"

	"github.com/mayfly-ci/mayfly/schedule"
)

// BootTimes keeps the most recent boot times (creation to ready). The zero
// value is empty and ready to use; it is not safe for concurrent use.
type BootTimes struct {
	d [bootSamples]time.Duration
	n int
}

// Observe records one boot time.
func (b *BootTimes) Observe(d time.Duration) {
	b.d[b.n%len(b.d)] = d
	b.n++
}

func (b *BootTimes) recent() []time.Duration { return b.d[:min(b.n, len(b.d))] }

// Mean returns the mean of the recent boot times (0 before the first).
func (b *BootTimes) Mean() time.Duration {
	r := b.recent()
	if len(r) == 0 {
		return 0
	}
	var sum time.Duration
	for _, d := range r {
		sum += d
	}
	return sum / time.Duration(len(r))
}

// Median returns the median of the recent boot times (the upper one of
// the two middle values; 0 before the first).
func (b *BootTimes) Median() time.Duration {
	r := b.recent()
	if len(r) == 0 {
		return 0
	}
	s := slices.Clone(r)
	slices.Sort(s)
	return s[len(s)/2]
}

// Shortest returns the shortest of the recent boot times (0 before the
// first).
func (b *BootTimes) Shortest() time.Duration {
	r := b.recent()
	if len(r) == 0 {
		return 0
	}
	return slices.Min(r)
}

// Reservable decides whether one more job can be promised an instance at
// s.Now, and how long it should expect to wait for it. s.Reserved holds
// the promises already made. boot is the expected boot time, creation to
// ready (0: none measured yet).
//
// An idle instance not promised to another job is given at once. Otherwise
// the job is taken on demand, when l.OnDemandWithin is positive and the
// instance it would get is expected within it: one already on its way
// (they serve earlier promises first, in creation order) or a new one, if
// MaxInstances, MaxGrowthRate and the creation breaker allow one now.
// Nothing is promised on demand before a boot time is known, so a fleet of
// slow-booting instances never takes a job that then waits minutes.
//
// With IdleCount 0 in force the pool never holds an idle instance, so
// every job is taken on demand whatever the window or boot time, as
// docker+machine does with IdleCount 0; only the limits apply.
func Reservable(s Snapshot, p schedule.Policy, l Limits, boot time.Duration) (time.Duration, bool) {
	now := s.Now
	idle, inflight, total := 0, s.Requested, s.Requested
	var onTheWay []time.Time // creation times of the instances not ready yet
	maxUses := max(l.MaxUses, 1)
	for i := range s.Instances {
		in := &s.Instances[i]
		if in.State == StateGone {
			continue
		}
		total++
		switch in.State {
		case StateIdle:
			if in.Uses < maxUses {
				idle++
			}
		case StateCreating, StateProvisioning:
			inflight++
			onTheWay = append(onTheWay, in.CreatedAt)
		}
	}
	free := idle - s.Reserved
	if free > 0 {
		return 0, true
	}
	always := p.IdleCount == 0
	if !always && (l.OnDemandWithin <= 0 || boot <= 0) {
		return 0, false
	}
	// The promises beyond the idle instances take the instances on their
	// way first, the earliest created first; Requested ones come last.
	claimed := -free
	slices.SortFunc(onTheWay, func(a, b time.Time) int { return a.Compare(b) })
	for range s.Requested {
		onTheWay = append(onTheWay, now)
	}
	if claimed < len(onTheWay) {
		wait := max(onTheWay[claimed].Add(boot).Sub(now), 0)
		if always || wait <= l.OnDemandWithin {
			return wait, true
		}
		return 0, false
	}
	// A new instance. Promises the scaler has not created instances for
	// yet count against the limits as if it had.
	unbacked := claimed - len(onTheWay)
	if !always && boot > l.OnDemandWithin {
		return 0, false
	}
	if l.MaxInstances > 0 && total+unbacked >= l.MaxInstances {
		return 0, false
	}
	if l.MaxGrowthRate > 0 && inflight+unbacked >= l.MaxGrowthRate {
		return 0, false
	}
	if !always && s.Breaker.Allow(now) == 0 {
		return 0, false // in a creation backoff: nothing comes soon
	}
	return boot, true
}
