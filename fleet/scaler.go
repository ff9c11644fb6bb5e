package fleet

import (
	"context"
	"time"

	"github.com/mayfly-ci/mayfly/schedule"
)

// SetSchedule replaces the schedule of idle policies, for a configuration
// reload. It is safe for concurrent use and takes effect at the next
// scaler pass, which it asks for. s must not be modified afterwards.
func (f *Fleet) SetSchedule(s schedule.Schedule) {
	f.mu.Lock()
	f.cfg.Schedule = s
	f.policyUntil = time.Time{} // look the policy up again
	f.mu.Unlock()
	f.log.Info("schedule replaced", "entries", len(s.Entries))
	f.kick()
}

// pass runs one scaler pass and returns when the next one is due.
func (f *Fleet) pass(ctx context.Context) time.Time {
	now := f.clock.Now()
	f.mu.Lock()
	if !now.Before(f.policyUntil) {
		f.policy, f.policyEntry = f.cfg.Schedule.At(now)
		if next, ok := f.cfg.Schedule.NextChange(now); ok {
			f.policyUntil = next
		} else {
			f.policyUntil = now.Add(24 * time.Hour)
		}
		f.log.Debug("policy in force", "entry", f.policyEntry, "idle_count", f.policy.IdleCount, "until", f.policyUntil)
	}
	listDue := f.nextListLocked()
	f.mu.Unlock()
	if !now.Before(listDue) {
		f.reconcile(ctx)
		now = f.clock.Now()
	}

	f.mu.Lock()
	snap := f.snapshotLocked(now, true)
	plan := Decide(snap, f.policy, f.limits)
	for _, d := range plan.Delete {
		in := f.books[d.ID]
		if in == nil {
			continue
		}
		if d.Reason == ReasonBootTimeout {
			f.providerFailureLocked("boot", "boot_timeout", false)
			f.log.Warn("instance not ready within the boot timeout", "instance", in.id, "state", in.state, "boot_timeout", f.cfg.BootTimeout)
		}
		f.deleteLocked(in, d.Reason)
	}
	wake := plan.Wake
	at := func(t time.Time) {
		if wake.IsZero() || t.Before(wake) {
			wake = t
		}
	}
	window := f.createWindowLocked()
	switch {
	case plan.Create <= 0 || ctx.Err() != nil:
		f.createWanted = time.Time{}
	case f.createWanted.IsZero() && window > 0:
		// Wait a moment for more: the runner takes a burst of jobs one
		// request at a time, and one Create call can serve them all.
		f.createWanted = now
		at(now.Add(window))
	case now.Before(f.createWanted.Add(window)):
		at(f.createWanted.Add(window))
	default:
		f.createWanted = time.Time{}
		n := plan.Create
		f.requested += n
		f.counts[StateRequested] += n
		f.createCalls++
		f.creating++
		f.spawn(func() { f.create(ctx, n) })
	}
	f.dispatchDeletesLocked(ctx, now, at, plan.Held == HeldMaxInstances)
	f.compactIdleLocked()
	f.lastPlan = plan
	at(f.nextListLocked())
	at(f.policyUntil)
	f.updateGaugesLocked(plan)
	f.mu.Unlock()
	f.flushGone()
	return wake
}

// waitingCreateWindow bounds CreateBatchWindow while a job in hand waits
// for an instance: long enough for the requests of one poll that follow
// each other at once, short against a job's start. With the full window
// (1s by default) a job on an empty fleet started up to a second late,
// and with the list cadence that broke issue 20's bound of one boot plus
// check_interval from pick-up to start.
const waitingCreateWindow = 100 * time.Millisecond

// createWindowLocked is how long the scaler gathers demand for one Create
// call: CreateBatchWindow for the idle pool, at most waitingCreateWindow
// while a job waits in Acquire (a reservation alone is not a job: most end
// in an empty poll). f.mu is held.
func (f *Fleet) createWindowLocked() time.Duration {
	w := f.cfg.CreateBatchWindow
	if len(f.waiters) > 0 {
		w = min(w, waitingCreateWindow)
	}
	return w
}

// nextListLocked returns when the provider's list should be read next:
// every ListInterval, so that a preempted or vanished instance is noticed
// within one interval; and while instances wait in state creating for a
// list to show them running, every ListIntervalBooting, but not before
// the first of them can be expected to run (its creation plus the
// shortest boot seen lately, less one ListIntervalBooting since a boot is
// seen up to that late), then every half ListIntervalBooting for one
// ListIntervalBooting, then every ListIntervalBooting.
// When boots are shorter than ListIntervalBooting (a provider whose
// instances run within a second), that cadence, not the boot, is what a
// new instance waits for: then, and before any boot was seen, the list is
// also read 1/16, 1/8, 1/4 and 1/2 of ListIntervalBooting after the
// latest creation, at most four more lists per Create call (bootRamp).
// One list serves every instance booting.
// Instances the provider gave connect info for are not waited for with
// lists: their provisioner waits for SSH or WinRM. f.mu is held.
func (f *Fleet) nextListLocked() time.Time {
	if !f.recovered {
		return f.lastList.Add(f.cfg.ListIntervalBooting)
	}
	next := f.lastList.Add(f.cfg.ListInterval)
	if f.counts[StateCreating] == 0 || f.firstCreating.IsZero() {
		return next
	}
	due := f.lastList.Add(f.cfg.ListIntervalBooting)
	shortest := f.seenRunning.Shortest()
	lead := max(shortest-f.cfg.ListIntervalBooting, 0)
	switch expect := f.firstCreating.Add(lead); {
	case expect.After(due):
		due = expect
	case shortest > 0 && !f.lastList.Before(expect) && f.lastList.Before(expect.Add(f.cfg.ListIntervalBooting)):
		// A boot as short as the shortest seen may be over: for one
		// interval, list every half interval, so that one that just
		// missed a list waits half as long (boots of one image take the
		// same time to the second, and lists spaced from the creation
		// kept missing them by a hair). After it, the usual cadence: a
		// slow boot must not cost twice the lists.
		due = f.lastList.Add(f.cfg.ListIntervalBooting / 2)
	}
	if shortest < f.cfg.ListIntervalBooting { // boots as short, or none seen yet
		if r, ok := bootRamp(f.lastCreating, f.lastList, f.cfg.ListIntervalBooting); ok && r.Before(due) {
			due = r
		}
	}
	if due.Before(next) {
		return due
	}
	return next
}

// bootRampSteps is how many lists bootRamp adds after a creation.
const bootRampSteps = 4

// BootRampOffsets returns when, after a creation, the fleet also lists
// while boots are shorter than every (its ListIntervalBooting): every/16,
// every/8, every/4 and every/2; none when every is too short to divide.
func BootRampOffsets(every time.Duration) []time.Duration {
	o, ok := bootRampOffsets(every)
	if !ok {
		return nil
	}
	return o[:]
}

func bootRampOffsets(every time.Duration) (o [bootRampSteps]time.Duration, ok bool) {
	step := every >> bootRampSteps
	for k := range o {
		o[k] = step << k
	}
	return o, step > 0
}

// bootRamp returns the first list time after last of the ramp that follows
// a creation at created (BootRampOffsets), but never sooner than the first
// offset after last, so that lists come at most that often. ok is false
// once the ramp is over.
func bootRamp(created, last time.Time, every time.Duration) (t time.Time, ok bool) {
	offsets, ok := bootRampOffsets(every)
	if created.IsZero() || !ok {
		return time.Time{}, false
	}
	for _, d := range offsets {
		if p := created.Add(d); p.After(last) {
			return later(p, last.Add(offsets[0])), true
		}
	}
	return time.Time{}, false
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// snapshotLocked copies the books for Decide (with the measured demand)
// or Reservable (without). f.mu is held.
func (f *Fleet) snapshotLocked(now time.Time, withDemand bool) Snapshot {
	views := f.snapBuf[:0] // reused: Decide keeps nothing of it
	f.firstCreating, f.lastCreating = time.Time{}, time.Time{}
	for _, in := range f.books {
		if in.state == StateCreating {
			if f.firstCreating.IsZero() || in.createdAt.Before(f.firstCreating) {
				f.firstCreating = in.createdAt
			}
			if in.createdAt.After(f.lastCreating) {
				f.lastCreating = in.createdAt
			}
		}
		views = append(views, InstanceView{ID: in.id, State: in.state, CreatedAt: in.createdAt, IdleSince: in.idleSince, Uses: in.uses})
	}
	f.snapBuf = views
	if cap(views) > 4*len(views)+64 {
		f.snapBuf = nil // the fleet shrank a lot: let the big buffer go
	}
	snap := Snapshot{Now: now, Instances: views, Requested: f.requested, Reserved: f.reserved, Waiting: len(f.waiters), Breaker: f.breaker}
	if withDemand && f.policy.Predictive {
		lead := predictiveLead(f.demand.BootMean(), f.limits.CheckInterval, f.cfg.CreateBatchWindow, f.policy)
		snap.Demand = f.demand.Demand(now, lead)
	}
	return snap
}

func (f *Fleet) updateGaugesLocked(plan Plan) {
	for s := range NumStates {
		if State(s) == StateGone {
			continue
		}
		f.m.states.WithLabelValues(f.cfg.Name, State(s).String()).Set(float64(f.counts[s]))
	}
	f.m.idleTarget.WithLabelValues(f.cfg.Name).Set(float64(plan.IdleTarget))
	f.m.idleActual.WithLabelValues(f.cfg.Name).Set(float64(f.counts[StateIdle]))
}
