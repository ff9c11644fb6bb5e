package sim

import (
	"fmt"
	"strconv"
	"time"

	"github.com/mayfly-ci/mayfly/fleet"
	"github.com/mayfly-ci/mayfly/schedule"
)

// Backoff bounds of the runtime fleet's creation breaker (fleet.Config
// defaults).
const (
	createBackoff    = 5 * time.Second
	createBackoffMax = 5 * time.Minute
)

// mayfly drives fleet.Decide the way fleet.Fleet's scaler pass does: a
// pass after every event that kicks the runtime scaler (acquisition,
// release, instance ready or failed, deletion confirmed) and at the plan's
// Wake and the next policy change. The manager side follows
// manager.tryRequest: each CheckInterval it asks for jobs while
// fleet.Reservable promises an instance (idle, or on demand one expected
// within OnDemandWithin), and again at once after a job arrived. Jobs taken
// on demand wait in order for the next instance that becomes idle.
type mayfly struct {
	w       *world
	limits  fleet.Limits
	sched   *policyCache
	breaker fleet.Breaker
	byID    map[string]*vm
	vms     []*vm // the books, in creation order
	idleQ   []*vm // longest idle first
	views   []fleet.InstanceView
	dirty   bool
	// released are VMs whose lease ended with their uses spent: deleted by
	// Lease.Release, dispatched in the next pass's Delete batch.
	released  []*vm
	wakeAt    time.Time
	pred      *fleet.DemandMeter // nil: plain mayfly
	maxTarget int                // the highest idle target of any pass
	boots     fleet.BootTimes
	waitQ     []int // jobs taken on demand, waiting for an instance, oldest first
	onDemand  int   // jobs taken on demand
}

func newMayfly(w *world, predictive bool) *mayfly {
	m := &mayfly{
		w:      w,
		limits: w.o.Limits,
		sched:  newPolicyCache(w.o.Schedule),
		byID:   map[string]*vm{},
		dirty:  true,
	}
	if predictive {
		m.pred = new(fleet.DemandMeter)
	}
	return m
}

func (m *mayfly) polls() bool { return true }

func (m *mayfly) assumptions() []string {
	a := []string{
		"scaler passes run fleet.Decide (production code) on every kick, at Plan.Wake and at policy changes",
		"a VM is ready when its boot time is over (the runtime fleet notices at its next list, up to PollInterval 2s later: not modelled)",
		"Create(n) and each pass's Delete batch are one provider call; List is counted every 2s while instances are being created, else every 1m",
		fmt.Sprintf("the manager asks for a job only when fleet.Reservable (production code) promises an instance: an idle one, or one expected within %s (the median of the last 16 boots); IdleCount 0 always takes jobs on demand", m.w.o.OnDemandWithin),
	}
	if m.pred != nil {
		a = append(a, m.w.o.Predictive.describe(m.w.o.CheckInterval))
	}
	return a
}

func (m *mayfly) tick(now time.Time) {
	w := m.w
	got := false
	for w.canRun() && w.hasPending() {
		if len(m.waitQ) == 0 {
			if v := m.popIdle(); v != nil {
				m.start(v, w.takeJob(), now)
				got = true
				continue
			}
		}
		if _, ok := fleet.Reservable(m.snapshot(now, false), m.policy(now), m.limits, m.boots.Median()); !ok {
			if m.pred != nil && got {
				// The runner got a job and asks again at once, but nothing
				// can be promised: demand outran supply (Fleet.Reserve).
				m.pred.Missed(now, m.w.o.CheckInterval)
			}
			return // nothing promised: no job request
		}
		got = true
		// Taken on demand: Acquire blocks, which is demand the next pass
		// creates an instance for.
		m.waitQ = append(m.waitQ, w.takeJob())
		m.onDemand++
		m.dirty = true
	}
}

// start runs job j on v, an instance that has just been acquired.
func (m *mayfly) start(v *vm, j int, now time.Time) {
	m.w.startJob(v, j)
	if m.pred != nil {
		m.pred.Acquired(now)
	}
	m.dirty = true
}

// serveWaiting gives v, which just became idle, to the oldest job waiting
// for an instance; it reports whether there was one.
func (m *mayfly) serveWaiting(v *vm, now time.Time) bool {
	if len(m.waitQ) == 0 {
		return false
	}
	j := m.waitQ[0]
	m.waitQ = m.waitQ[1:]
	m.start(v, j, now)
	return true
}

func (m *mayfly) popIdle() *vm {
	for len(m.idleQ) > 0 {
		v := m.idleQ[0]
		m.idleQ[0] = nil
		m.idleQ = m.idleQ[1:]
		if v.state == vmIdle {
			return v
		}
	}
	return nil
}

func (m *mayfly) booted(v *vm, now time.Time) {
	m.dirty = true
	if v.state == vmFailed {
		m.breaker.Fail(now, false, createBackoff, createBackoffMax)
		return
	}
	m.breaker.Succeed(v.createdAt)
	m.boots.Observe(now.Sub(v.createdAt))
	if m.pred != nil {
		m.pred.Booted(now.Sub(v.createdAt))
	}
	if !m.serveWaiting(v, now) {
		m.idleQ = append(m.idleQ, v)
	}
}

func (m *mayfly) jobEnded(v *vm, now time.Time) {
	m.dirty = true
	if v.uses >= m.w.o.MaxUses {
		v.released = true
		m.released = append(m.released, v)
		return
	}
	m.w.backToIdle(v)
	if !m.serveWaiting(v, now) {
		m.idleQ = append(m.idleQ, v)
	}
}

func (m *mayfly) remove(vs []*vm) {
	for _, v := range vs {
		delete(m.byID, v.name)
	}
	m.w.remove(vs, true)
}

func (m *mayfly) wake(now time.Time) {
	if !m.wakeAt.IsZero() && !now.Before(m.wakeAt) {
		m.dirty = true
	}
}

func (m *mayfly) settle(now time.Time) {
	if m.dirty {
		m.dirty = false
		m.pass(now)
	}
}

var stateOf = [numVMStates]fleet.State{
	vmRequested: fleet.StateRequested,
	vmCreating:  fleet.StateCreating,
	vmIdle:      fleet.StateIdle,
	vmBusy:      fleet.StateAcquired,
	vmFailed:    fleet.StateFailed,
	vmDeleting:  fleet.StateDeleting,
	vmGone:      fleet.StateGone,
}

// policy returns the policy of the pass at now.
func (m *mayfly) policy(now time.Time) schedule.Policy {
	p := m.sched.at(now)
	if m.pred != nil {
		p = m.w.o.Predictive.apply(p)
	}
	return p
}

// snapshot is fleet.Fleet.snapshotLocked: the books for Decide and
// Reservable.
func (m *mayfly) snapshot(now time.Time, withDemand bool) fleet.Snapshot {
	views := m.views[:0]
	requested := 0
	live := m.vms[:0]
	for _, v := range m.vms {
		if v.state == vmGone {
			continue
		}
		live = append(live, v)
	}
	clear(m.vms[len(live):])
	m.vms = live
	for _, v := range m.vms {
		if v.state == vmRequested {
			requested++
			continue
		}
		st := stateOf[v.state]
		if v.released {
			st = fleet.StateDeleting
		}
		views = append(views, fleet.InstanceView{ID: v.name, State: st, CreatedAt: v.createdAt, IdleSince: v.idleSince, Uses: v.uses})
	}
	m.views = views
	snap := fleet.Snapshot{Now: now, Instances: views, Requested: requested, Reserved: len(m.waitQ), Waiting: len(m.waitQ), Breaker: m.breaker}
	if withDemand && m.pred != nil {
		snap.Demand = m.pred.Demand(now, m.w.o.CheckInterval, m.policy(now).Quantile())
	}
	return snap
}

// pass is fleet.Fleet.pass without the provider: snapshot, Decide, apply.
func (m *mayfly) pass(now time.Time) {
	w := m.w
	plan := fleet.Decide(m.snapshot(now, true), m.policy(now), m.limits)
	m.maxTarget = max(m.maxTarget, plan.IdleTarget)
	if len(plan.Delete)+len(m.released) > 0 {
		doomed := append(make([]*vm, 0, len(plan.Delete)+len(m.released)), m.released...)
		clear(m.released)
		m.released = m.released[:0]
		for _, d := range plan.Delete {
			v := m.byID[d.ID]
			if v == nil {
				continue
			}
			if d.Reason == fleet.ReasonBootTimeout {
				m.breaker.Fail(now, false, createBackoff, createBackoffMax)
			}
			doomed = append(doomed, v)
		}
		m.remove(doomed)
	}
	if plan.Create > 0 {
		for _, v := range w.create(plan.Create, true) {
			v.name = "i" + strconv.Itoa(v.id)
			m.byID[v.name] = v
			m.vms = append(m.vms, v)
		}
	}
	wake := plan.Wake
	if m.sched.valid && (wake.IsZero() || m.sched.until.Before(wake)) {
		wake = m.sched.until
	}
	m.wakeAt = wake
	w.wakeAt(wake)
}
