package fleet

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
)

// Available returns how many ready instances are not promised to a job:
// how many Acquire calls could be served now without waiting.
func (f *Fleet) Available() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.stopped {
		return 0
	}
	return max(f.counts[StateIdle]-f.reserved, 0)
}

// Reservation is an instance promised to one job by Reserve: ready now or
// expected soon. Exactly one of Acquire and Cancel ends it.
type Reservation struct {
	f    *Fleet
	done atomic.Bool
}

// Reserve promises an instance to one job, if one is idle and not promised
// to another or, on demand, expected within Config.OnDemandWithin (see
// Reservable). wait is the expected wait, 0 for an idle instance. The
// manager reserves before it asks GitLab for a job, and cancels the
// reservation when GitLab has none.
func (f *Fleet) Reserve() (r *Reservation, wait time.Duration, ok bool) {
	now := f.clock.Now()
	f.mu.Lock()
	if f.stopped {
		f.mu.Unlock()
		return nil, 0, false
	}
	snap := f.snapshotLocked(now, false)
	wait, ok = Reservable(snap, f.policy, f.limits, f.demand.BootMedian())
	if !ok {
		f.mu.Unlock()
		return nil, 0, false
	}
	f.reserved++
	f.mu.Unlock()
	// No kick: a promise beyond the idle instances becomes demand only
	// when its job comes and Acquire waits. Most promises end in an empty
	// poll, and creating an instance for each would churn.
	return &Reservation{f: f}, wait, true
}

// Acquire takes the promised instance, waiting for it until ctx ends.
func (r *Reservation) Acquire(ctx context.Context) (*Lease, error) {
	if r.done.Swap(true) {
		return nil, errors.New("acquire: reservation already ended")
	}
	return r.f.acquire(ctx)
}

// Cancel gives the promise back: the job it was for did not come.
func (r *Reservation) Cancel() {
	if r.done.Swap(true) {
		return
	}
	r.f.mu.Lock()
	r.f.reserved--
	r.f.mu.Unlock()
	r.f.kick()
}

// Outcome is how the job on a leased instance ended.
type Outcome int

// Lease is one instance handed out by Acquire. Exactly one of Release and
// Unused ends it; later calls do nothing.
type Lease struct {
	f    *Fleet
	in   *instance
	inst providers.Instance
	ci   providers.ConnectInfo
	done atomic.Bool
}

// ID returns the instance id.
func (l *Lease) ID() string { return l.inst.ID }

// Instance describes the instance.
func (l *Lease) Instance() providers.Instance { return l.inst.Clone() }

// ConnectInfo tells how to reach the instance.
func (l *Lease) ConnectInfo() providers.ConnectInfo { return l.ci }

// Lost is closed when the provider reports the instance gone or failed
// (preempted, deleted behind the fleet's back) while it is leased; the job
// on it should fail with runner_system_failure.
func (l *Lease) Lost() <-chan struct{} { return l.in.lost }

// Release ends the lease after a job ran on the instance. Its use count
// goes up by one; when it reaches MaxUses (or the outcome is
// SystemFailure) the instance is deleted, otherwise it is idle again.
func (l *Lease) Release(o Outcome) { l.end(true, o) }

// Unused ends a lease on which no job ran (the job request returned none):
// the instance is idle again and its use count is unchanged.
func (l *Lease) Unused() { l.end(false, JobSucceeded) }

func (l *Lease) end(used bool, o Outcome) {
	if l.done.Swap(true) {
		return
	}
	f := l.f
	f.mu.Lock()
	in := l.in
	if used {
		in.uses++
		f.jobsDone++
	}
	if in.state == StateAcquired {
		switch {
		case !used && !f.stopped:
			f.becomeIdleLocked(in, true)
		case !used:
			f.deleteLocked(in, ReasonShutdown)
		case o == SystemFailure:
			f.deleteLocked(in, ReasonSystemFailure)
		case in.uses >= f.cfg.MaxUses:
			f.deleteLocked(in, ReasonMaxUses)
		default:
			in.idleSince = f.clock.Now()
			f.becomeIdleLocked(in, false)
		}
	}
	f.mu.Unlock()
	f.closeAttachments() // also after Run ended, when no pass will
	f.kick()
}

// Acquire hands out the longest idle ready instance, waiting for one until
// ctx ends. The instance is recorded as acquired in the journal, on disk,
// before Acquire returns, and no other Acquire gets it while leased. A
// blocked Acquire is demand: the scaler creates an instance for it.
func (f *Fleet) Acquire(ctx context.Context) (*Lease, error) {
	f.mu.Lock()
	f.reserved++
	f.mu.Unlock()
	return f.acquire(ctx)
}

// waiter is an Acquire call blocked until an instance becomes idle.
// Waiters are served in the order they began to wait: an instance that
// becomes idle is handed to the first of them at once (handLocked), so
// no later caller can take it first.
type waiter struct {
	ch    chan struct{} // closed when in is set
	in    *instance     // the instance handed over
	since time.Time     // when it began to wait
}

// acquire serves one promise counted in f.reserved, which it gives back
// whatever happens.
func (f *Fleet) acquire(ctx context.Context) (*Lease, error) {
	f.mu.Lock()
	if err := f.acquireErrLocked(ctx); err != nil {
		f.reserved--
		f.mu.Unlock()
		return nil, err
	}
	// A job came for an instance: demand, whether one is idle or not
	// (counted when handed out, a wait would make demand look late).
	f.demand.Acquired(f.clock.Now())
	if len(f.waiters) == 0 {
		if in := f.popIdleLocked(); in != nil {
			f.reserved--
			f.demand.Served(true, f.policy.Quantile())
			l := f.takeLocked(in)
			j := f.journal
			f.mu.Unlock()
			return f.commit(ctx, l, j, false, time.Time{})
		}
	}
	waitStart := f.clock.Now()
	w := &waiter{ch: make(chan struct{}), since: waitStart}
	f.waiters = append(f.waiters, w)
	f.m.waits.WithLabelValues(f.cfg.Name).Inc()
	f.mu.Unlock()
	f.kick() // the scaler counts promises beyond the idle instances as demand
	f.signalChanged()

	select {
	case <-w.ch:
	case <-f.stopCh:
	case <-ctx.Done():
	}
	f.mu.Lock()
	if w.in != nil { // handed over, perhaps just as ctx ended: commit decides
		defer f.unbusy() // counted busy by handLocked
		l := &Lease{f: f, in: w.in, inst: f.instanceOf(w.in), ci: w.in.ci}
		j := f.journal
		f.mu.Unlock()
		return f.commit(ctx, l, j, true, waitStart)
	}
	f.waiters = slices.DeleteFunc(f.waiters, func(x *waiter) bool { return x == w })
	f.reserved--
	err := f.acquireErrLocked(ctx)
	f.mu.Unlock()
	if err == nil {
		err = ErrStopped // woken by nothing else
	}
	return nil, err
}

// inTimeLocked is how long a job may wait for its instance and still count
// as served in time by the predictive policy: its PredictiveWithin less
// one check interval (the job may have waited that long for the runner's
// poll), and at least half a check interval (a job served in the moment
// after it came is as good as one served at once).
func (f *Fleet) inTimeLocked() time.Duration {
	return max(f.policy.PredictiveWithin-f.limits.CheckInterval, f.limits.CheckInterval/2)
}

// acquireErrLocked says why no instance can be handed out now, if so.
func (f *Fleet) acquireErrLocked(ctx context.Context) error {
	if f.stopped {
		return ErrStopped
	}
	return ctx.Err()
}

// takeLocked marks an idle instance acquired and makes its lease.
func (f *Fleet) takeLocked(in *instance) *Lease {
	f.setStateLocked(in, StateAcquired)
	in.lost = make(chan struct{})
	in.lostClosed = false
	in.journaled = true
	return &Lease{f: f, in: in, inst: f.instanceOf(in), ci: in.ci}
}

// handLocked gives an instance that just became idle to the first waiter,
// if any, and reports whether it did. The promise it served is no longer
// counted, so the scaler does not create an instance for it.
func (f *Fleet) handLocked(in *instance) bool {
	if len(f.waiters) == 0 || f.stopped {
		return false
	}
	w := f.waiters[0]
	f.waiters = f.waiters[1:]
	f.reserved--
	f.demand.Served(f.clock.Now().Sub(w.since) <= f.inTimeLocked(), f.policy.Quantile())
	f.takeLocked(in)
	w.in = in
	f.busy.Add(1) // until the waiter's Acquire returns (Settled)
	close(w.ch)
	return true
}

// commit makes an acquisition durable and hands it out.
func (f *Fleet) commit(ctx context.Context, l *Lease, j *journal, waited bool, waitStart time.Time) (*Lease, error) {
	if err := j.Acquired(l.in.id); err != nil {
		f.mu.Lock()
		f.deleteLocked(l.in, ReasonJournal)
		f.mu.Unlock()
		l.done.Store(true)
		f.kick()
		return nil, fmt.Errorf("acquire %s: %w", l.in.id, err)
	}
	if err := ctx.Err(); err != nil {
		l.Unused() // nobody will use it; recorded anyway, so deleted after a crash
		return nil, err
	}
	f.m.acquisitions.WithLabelValues(f.cfg.Name).Inc()
	f.kick() // one idle fewer: the scaler replaces it
	if waited {
		f.m.waitSeconds.WithLabelValues(f.cfg.Name).Observe(f.clock.Now().Sub(waitStart).Seconds())
	}
	f.log.Debug("instance acquired", "instance", l.in.id)
	return l, nil
}
