package sim

import (
	"time"

	"github.com/mayfly-ci/mayfly/schedule"
)

// dockerMachine follows gitlab-runner's docker+machine autoscaler: every
// job-request attempt is one scaling tick (sweep, create, pick), run each
// CheckInterval and again at once after a job was received.
type dockerMachine struct {
	w        *world
	sched    *policyCache
	machines []*vm // creation order, oldest first; gone ones dropped lazily
	onDemand int   // jobs requested with no free machine (IdleCount 0)
}

func newDockerMachine(w *world) *dockerMachine {
	return &dockerMachine{w: w, sched: newPolicyCache(w.o.Schedule)}
}

func (d *dockerMachine) polls() bool { return false }

func (d *dockerMachine) assumptions() []string {
	return []string{
		"HEAD gitlab-runner: no Acquire (so no scaling) while the runner is at MaxJobs",
		"create and remove are one provider call per machine; listing is a local directory read (no call)",
		"an on-demand job (IdleCount 0) whose VM fails goes back to the head of the queue",
	}
}

// dmCounts are machinesData over a prefix of the machine list.
type dmCounts struct{ avail, inUse, creating, total int }

func (c *dmCounts) add(v *vm) {
	c.total++
	switch v.state {
	case vmIdle:
		c.avail++
	case vmRequested, vmCreating:
		c.avail++
		c.creating++
	case vmBusy:
		c.inUse++
	}
}

// exceeded is gitlab-runner's composed idle limit test.
func exceeded(p schedule.Policy, c dmCounts) bool {
	if c.avail >= p.IdleCount {
		return true
	}
	if p.ScaleFactor <= 0 {
		return false
	}
	minIdle := max(p.IdleCountMin, 1)
	return c.avail >= minIdle && c.avail >= int(float64(c.inUse)*p.ScaleFactor)
}

func (d *dockerMachine) tick(now time.Time) {
	w := d.w
	for w.canRun() {
		p := d.sched.at(now)
		all := d.scale(p, now)
		if !w.hasPending() {
			return // the request returns no job; the acquired VM goes back untouched
		}
		if v := d.newestIdle(); v != nil {
			w.startJob(v, w.takeJob())
			continue // a job was received: the runner asks again at once
		}
		// No free machine.
		if p.IdleCount > 0 {
			return // NoFreeExecutorError: no job request this tick
		}
		if (w.o.MaxGrowthRate > 0 && all.creating >= w.o.MaxGrowthRate) || (w.o.MaxInstances > 0 && all.total >= w.o.MaxInstances) {
			return
		}
		// On demand: request the job and create its machine in Use.
		j := w.takeJob()
		d.onDemand++
		v := w.create(1, false)[0]
		v.job = j
		d.machines = append(d.machines, v)
	}
}

// scale is the sweep and create steps of one Acquire; it returns the
// counts over all machines afterwards.
func (d *dockerMachine) scale(p schedule.Policy, now time.Time) dmCounts {
	w := d.w
	var c dmCounts
	live := d.machines[:0]
	var doomed []*vm
	for _, v := range d.machines {
		if v.state == vmGone {
			continue
		}
		live = append(live, v)
		if v.state == vmIdle {
			remove := (w.o.MaxUses > 0 && v.uses >= w.o.MaxUses) ||
				(w.o.MaxInstances > 0 && c.total >= w.o.MaxInstances) ||
				(now.Sub(v.idleSince) > p.IdleTime && exceeded(p, c))
			if remove {
				doomed = append(doomed, v)
				c.total++ // Removing: in Total only
				continue
			}
		}
		c.add(v)
	}
	clear(d.machines[len(live):])
	d.machines = live
	for _, v := range doomed {
		w.remove([]*vm{v}, false)
	}
	for !(w.o.MaxGrowthRate > 0 && c.creating >= w.o.MaxGrowthRate) &&
		!(w.o.MaxInstances > 0 && c.total >= w.o.MaxInstances) &&
		!exceeded(p, c) {
		v := w.create(1, false)[0]
		d.machines = append(d.machines, v)
		c.add(v)
	}
	return c
}

func (d *dockerMachine) newestIdle() *vm {
	for i := len(d.machines) - 1; i >= 0; i-- {
		if v := d.machines[i]; v.state == vmIdle {
			return v
		}
	}
	return nil
}

func (d *dockerMachine) booted(v *vm, now time.Time) {
	w := d.w
	if v.state == vmFailed {
		// "Failed to create": removed at once, no backoff.
		w.remove([]*vm{v}, false)
		if v.job >= 0 {
			w.requeue(v.job)
			v.job = -1
		}
		return
	}
	if v.job >= 0 {
		w.startJob(v, v.job) // takeJob counted it as running already
	}
}

func (d *dockerMachine) jobEnded(v *vm, now time.Time) {
	w := d.w
	if w.o.MaxUses > 0 && v.uses >= w.o.MaxUses {
		w.remove([]*vm{v}, false) // "Too many builds"
		return
	}
	w.backToIdle(v)
}

func (d *dockerMachine) wake(time.Time)   {}
func (d *dockerMachine) settle(time.Time) {}

// policyCache returns the schedule's policy at a time, evaluating the
// schedule again only when it may have changed.
type policyCache struct {
	s     schedule.Schedule
	p     schedule.Policy
	until time.Time
	valid bool
}

func newPolicyCache(s schedule.Schedule) *policyCache { return &policyCache{s: s} }

func (c *policyCache) at(now time.Time) schedule.Policy {
	if c.valid && now.Before(c.until) {
		return c.p
	}
	c.p, _ = c.s.At(now)
	c.valid = true
	if next, ok := c.s.NextChange(now); ok {
		c.until = next
	} else {
		c.until = now.Add(24 * time.Hour)
	}
	return c.p
}
