package fleet

import (
	"slices"
	"time"

	"github.com/mayfly-ci/mayfly/schedule"
)

// bootSamples is how many recent boot times BootTimes keeps.
const bootSamples = 16

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

// unknownBoot is the wait Reservable reports for a new instance before any
// boot time has been measured.
const unknownBoot = time.Minute

// Reservable decides whether one more job can be promised an instance at
// s.Now, and how long it should expect to wait for it. s.Reserved holds
// the promises already made. boot is the expected boot time, creation to
// ready (0: none measured yet).
//
// An idle instance not promised to another job is given at once. When
// none is free, the job is taken on demand, unless l.OnDemandWithin is 0
// (docker+machine's refusal: only idle instances, unless IdleCount is 0):
//   - for an instance already on its way that no earlier promise claims
//     (they are claimed in creation order), when it is expected within
//     l.OnDemandWithin;
//   - otherwise for a new instance, whatever the boot time, when
//     MaxInstances, MaxGrowthRate and the creation breaker allow one now:
//     the scaler creates it once the job comes. So a job never waits in
//     GitLab's queue for lack of a decision while the fleet could start
//     an instance for it, and the queue cannot run away, also when boots
//     take longer than the window (Windows);
//   - when no new instance may be created, a job is refused unless an
//     instance on its way is expected within the window: GitLab keeps it
//     for another runner, and this one asks again at its next poll.
//
// With IdleCount 0 in force the pool never holds an idle instance, so
// every job is taken on demand whatever the window, as docker+machine
// does with IdleCount 0; only the limits apply. So with the predictive
// policy, which keeps no idle instance where one would serve few jobs.
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
	// IdleCount 0 and the predictive policy may keep no idle instance:
	// they always take jobs on demand.
	always := p.IdleCount == 0 || p.Predictive
	if !always && l.OnDemandWithin <= 0 {
		return 0, false
	}
	expect := boot
	if expect <= 0 {
		expect = unknownBoot
	}
	// The promises beyond the idle instances take the instances on their
	// way first, the earliest created first; Requested ones come last.
	claimed := -free
	slices.SortFunc(onTheWay, func(a, b time.Time) int { return a.Compare(b) })
	for range s.Requested {
		onTheWay = append(onTheWay, now)
	}
	backed := claimed < len(onTheWay)
	var wait time.Duration
	if backed {
		wait = max(onTheWay[claimed].Add(expect).Sub(now), 0)
		if wait <= l.OnDemandWithin {
			return wait, true
		}
	}
	// A new instance. Promises the scaler has not created instances for
	// yet count against the limits as if it had.
	unbacked := max(claimed-len(onTheWay), 0)
	canCreate := !(l.MaxInstances > 0 && total+unbacked >= l.MaxInstances) &&
		!(l.MaxGrowthRate > 0 && inflight+unbacked >= l.MaxGrowthRate) &&
		(always || s.Breaker.Allow(now) != 0)
	switch {
	case canCreate && backed:
		return min(wait, expect), true
	case canCreate:
		return expect, true
	}
	return 0, false
}
