package sim

import (
	"slices"
	"time"

	"github.com/mayfly-ci/mayfly/schedule"
)

// taskscaler models gitlab-runner's taskscaler + fleeting with
// capacity_per_instance = 1. Its capacity formula is inferred (see
// assumptions); the source was not available.
type taskscaler struct {
	w       *world
	sched   *policyCache
	vms     []*vm // live instances
	waiting []int // jobs accepted (non-preemptive) waiting for an instance
	dirty   bool
}

func newTaskscaler(w *world) *taskscaler {
	return &taskscaler{w: w, sched: newPolicyCache(w.o.Schedule)}
}

func (t *taskscaler) polls() bool { return true }

func (t *taskscaler) assumptions() []string {
	return []string{
		"INFERRED capacity formula: required = min(max_instances, in_use + waiting + idle target); idle target = policy.IdleTarget(in_use) (taskscaler style: max(idle_count, min(ceil(in_use*scale_factor), scale_factor_limit)))",
		"INFERRED cadence: a scaling pass on every job-request attempt (CheckInterval) and after every reserve/acquire/release/instance event",
		"instances over idle_time and beyond the required count are removed longest-idle first, in one Decrease call per pass",
		"Increase(n) and Decrease(ids) are one provider call each; the plugin's Update list is counted every 2s while instances are being created, else every 1m",
		"preemptive mode as configured (for a [runners.machine] schedule: on when IdleCount > 0); scale_throttle, failure backoff and MaxGrowthRate are not modelled",
	}
}

func preemptive(p schedule.Policy) bool {
	if p.Style == schedule.Taskscaler {
		return p.PreemptiveMode
	}
	return p.IdleCount > 0
}

func (t *taskscaler) tick(now time.Time) {
	w := t.w
	p := t.sched.at(now)
	t.scale(p, now)
	for w.canRun() && w.hasPending() {
		if v := t.freeInstance(); v != nil && len(t.waiting) == 0 {
			w.startJob(v, w.takeJob())
			t.dirty = true
			continue
		}
		if preemptive(p) {
			return // Reserve fails: ErrNoCapacity, no job request
		}
		if w.o.MaxInstances > 0 && w.running >= w.o.MaxInstances {
			return
		}
		t.waiting = append(t.waiting, w.takeJob())
		t.dirty = true
	}
}

// freeInstance returns the longest idle ready instance.
func (t *taskscaler) freeInstance() *vm {
	var best *vm
	for _, v := range t.vms {
		if v.state == vmIdle && (best == nil || v.idleSince.Before(best.idleSince)) {
			best = v
		}
	}
	return best
}

func (t *taskscaler) scale(p schedule.Policy, now time.Time) {
	w := t.w
	live := t.vms[:0]
	var failed, idle []*vm
	inUse, count := 0, 0
	for _, v := range t.vms {
		switch v.state {
		case vmGone, vmDeleting:
			if v.state == vmDeleting {
				live = append(live, v)
			}
			continue
		case vmFailed:
			failed = append(failed, v)
			live = append(live, v)
			continue
		case vmBusy:
			inUse++
		case vmIdle:
			idle = append(idle, v)
		}
		count++
		live = append(live, v)
	}
	clear(t.vms[len(live):])
	t.vms = live
	if len(failed) > 0 {
		w.remove(failed, true)
	}
	required := inUse + len(t.waiting) + max(p.IdleTarget(inUse), 0)
	if w.o.MaxInstances > 0 {
		required = min(required, w.o.MaxInstances-(len(t.vms)-count-len(failed)))
		required = min(required, w.o.MaxInstances)
	}
	switch {
	case required > count:
		t.vms = append(t.vms, w.create(required-count, true)...)
	case required < count:
		slices.SortFunc(idle, func(a, b *vm) int { return a.idleSince.Compare(b.idleSince) })
		var doomed []*vm
		for _, v := range idle {
			if len(doomed) == count-required {
				break
			}
			if now.Sub(v.idleSince) > p.IdleTime {
				doomed = append(doomed, v)
			}
		}
		if len(doomed) > 0 {
			w.remove(doomed, true)
		}
	}
}

func (t *taskscaler) booted(v *vm, now time.Time) {
	t.dirty = true
	if v.state == vmIdle && len(t.waiting) > 0 {
		j := t.waiting[0]
		t.waiting = t.waiting[1:]
		t.w.startJob(v, j)
	}
}

func (t *taskscaler) jobEnded(v *vm, now time.Time) {
	t.dirty = true
	if v.uses >= t.w.o.MaxUses {
		t.w.remove([]*vm{v}, true)
		return
	}
	t.w.backToIdle(v)
	if len(t.waiting) > 0 {
		j := t.waiting[0]
		t.waiting = t.waiting[1:]
		t.w.startJob(v, j)
	}
}

func (t *taskscaler) wake(time.Time) {}

func (t *taskscaler) settle(now time.Time) {
	if t.dirty {
		t.dirty = false
		t.scale(t.sched.at(now), now)
	}
}
