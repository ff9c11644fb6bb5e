package fleet

import (
	"context"
	"maps"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
)

// instance is one entry of the books. Fields are guarded by Fleet.mu.
type instance struct {
	id          string
	state       State
	since       time.Time // entered state
	requestedAt time.Time // the Create call started (zero when adopted)
	createdAt   time.Time // the id became known
	idleSince   time.Time
	uses        int
	reason      Reason // why it is being deleted
	ci          providers.ConnectInfo
	addedSeq    uint64 // Fleet.seq when added to the books
	listGen     uint64 // last list that showed it
	journaled   bool   // recorded as acquired in the journal
	queued      bool   // in the idle queue

	cancel context.CancelFunc // ends provisioning
	attach Attachment         // left open by the provisioner; see Attachment

	deleteStart time.Time
	delFailures int
	delNext     time.Time
	delInFlight bool

	lost       chan struct{} // made at acquisition; closed when lost
	lostClosed bool
}

// setStateLocked moves in to state to, enforcing the state machine.
func (f *Fleet) setStateLocked(in *instance, to State) bool {
	if !CanTransition(in.state, to) {
		f.log.Error("illegal instance state transition refused", "instance", in.id, "from", in.state, "to", to)
		return false
	}
	f.counts[in.state]--
	f.counts[to]++
	in.state = to
	in.since = f.clock.Now()
	return true
}

// addLocked puts a new entry in the books.
func (f *Fleet) addLocked(id string, state State, now time.Time) *instance {
	f.seq++
	in := &instance{id: id, state: state, since: now, createdAt: now, addedSeq: f.seq}
	f.books[id] = in
	f.counts[state]++
	delete(f.suspects, id)
	return in
}

// deleteLocked starts the deletion of in.
func (f *Fleet) deleteLocked(in *instance, reason Reason) {
	if in.state == StateDeleting || in.state == StateGone {
		return
	}
	wasIdle := in.state == StateIdle
	if !f.setStateLocked(in, StateDeleting) {
		return
	}
	if wasIdle && in.uses == 0 && f.counts[StateIdle] < f.reserved && (reason == ReasonIdleTime || reason == ReasonOverLimit) {
		// An unused instance deleted although a promised job needs it:
		// Decide never does this (it keeps Reserved idle instances);
		// count it so that a regression shows. Deleting a surplus idle
		// instance while the promises have others is no waste.
		f.wastedWhileWaiting++
		f.m.wasted.WithLabelValues(f.cfg.Name).Inc()
		f.log.Error("invariant broken: deleting an unused instance while jobs wait for one", "instance", in.id, "reason", reason, "reserved", f.reserved)
	}
	f.dropAttachLocked(in)
	now := f.clock.Now()
	in.reason = reason
	in.deleteStart = now
	in.delNext = now.Add(f.cfg.DeleteBatchWindow) // others may join its Delete call
	if wasIdle && in.uses == 0 {
		// An unused instance goes at once: held for the batch, it could
		// serve no job that came meanwhile, and one may come and wait a
		// whole boot beside it (the simulator saw it on a Windows day).
		in.delNext = now
	}
	if in.cancel != nil {
		in.cancel()
		in.cancel = nil
	}
	f.m.deletions.WithLabelValues(f.cfg.Name, string(reason)).Inc()
	f.log.Info("deleting instance", "instance", in.id, "reason", reason, "uses", in.uses)
}

// failLocked records a failed instance as a provider failure; Decide
// deletes it.
func (f *Fleet) failLocked(in *instance, op, kind string, err error) {
	if !f.setStateLocked(in, StateFailed) {
		return
	}
	f.dropAttachLocked(in)
	if in.cancel != nil {
		in.cancel()
		in.cancel = nil
	}
	f.providerFailureLocked(op, kind, false)
	f.log.Warn("instance failed", "instance", in.id, "op", op, "kind", kind, "error", err)
}

// providerFailureLocked counts a failure of the provider to deliver a
// ready instance and backs creation off.
func (f *Fleet) providerFailureLocked(op, kind string, open bool) {
	f.m.errors.WithLabelValues(f.cfg.Name, op, kind).Inc()
	f.breaker.Fail(f.clock.Now(), open, f.cfg.CreateBackoff, f.cfg.CreateBackoffMax)
}

// goneLocked takes in out of the books.
func (f *Fleet) goneLocked(in *instance) {
	if in.state == StateAcquired {
		f.loseLocked(in)
	}
	if !f.setStateLocked(in, StateGone) {
		return
	}
	f.dropAttachLocked(in)
	if in.cancel != nil {
		in.cancel()
		in.cancel = nil
	}
	if !in.deleteStart.IsZero() {
		f.m.removal.WithLabelValues(f.cfg.Name).Observe(f.clock.Now().Sub(in.deleteStart).Seconds())
	}
	delete(f.books, in.id)
	f.counts[StateGone]-- // gone instances are not kept
	if in.journaled {
		f.goneIDs = append(f.goneIDs, in.id)
	}
}

// loseLocked tells the holder of in's lease that the instance is lost.
func (f *Fleet) loseLocked(in *instance) {
	if in.lost != nil && !in.lostClosed {
		in.lostClosed = true
		close(in.lost)
		f.log.Warn("acquired instance lost", "instance", in.id)
	}
}

// flushGone records the instances that went gone in the journal.
func (f *Fleet) flushGone() {
	f.closeAttachments()
	f.mu.Lock()
	ids := f.goneIDs
	f.goneIDs = nil
	f.mu.Unlock()
	if f.journal == nil {
		return
	}
	for _, id := range ids {
		if err := f.journal.Gone(id); err != nil {
			f.log.Error("journal", "error", err)
		}
	}
}

// becomeIdleLocked makes in available to Acquire, at the back of the queue
// (front: it keeps its place after an acquisition that got no job).
func (f *Fleet) becomeIdleLocked(in *instance, front bool) {
	if !f.setStateLocked(in, StateIdle) {
		return
	}
	if f.handLocked(in) {
		return
	}
	if !in.queued {
		in.queued = true
		if front {
			f.idleQ.pushFront(in)
		} else {
			f.idleQ.pushBack(in)
		}
	}
}

// popIdleLocked returns the longest idle instance, or nil.
func (f *Fleet) popIdleLocked() *instance {
	for f.idleQ.len() > 0 {
		in := f.idleQ.popFront()
		in.queued = false
		if in.state == StateIdle {
			return in
		}
	}
	return nil
}

// compactIdleLocked drops queue entries that are no longer idle, so that
// a queue nobody pops does not grow without bound.
func (f *Fleet) compactIdleLocked() {
	if f.idleQ.len() <= 2*f.counts[StateIdle]+64 {
		return
	}
	f.idleQ.filter(func(in *instance) bool {
		keep := in.state == StateIdle
		in.queued = keep
		return keep
	})
}

// instanceOf describes in as a providers.Instance.
func (f *Fleet) instanceOf(in *instance) providers.Instance {
	return providers.Instance{ID: in.id, State: providers.StateRunning, Labels: maps.Clone(f.labels), CreatedAt: in.createdAt}
}

// ours reports whether a listed instance carries this fleet's labels.
func (f *Fleet) ours(pi *providers.Instance) bool { return pi.HasLabels(f.labels) }
