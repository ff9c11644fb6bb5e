// Package fleet keeps the instances (VMs) of one [[runners]] entry: it
// creates them through a providers.Provider so that the idle pool follows
// the schedule's policy, hands each ready instance to one job at a time,
// deletes it when its uses are spent (with MaxUses 1: after every job), and
// reconciles its books with the provider's list so that nothing leaks.
//
// The decision of each scaler pass is the pure function Decide; the Fleet
// type applies it, calls the provider through one rate-limited budget, and
// takes all time from an injected Clock, so the simulator runs this same
// code on a fake clock.
//
// Single use survives crashes: Acquire records the instance in a small
// append-only journal, synced to disk, before handing it out. A restarted
// fleet deletes every instance with its labels that the journal names (all
// of them when the journal is missing or damaged) and adopts the others,
// which never ran a job, after checking their connect info again.
package fleet

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/schedule"
)

// Provisioner turns a running instance into a ready one: it waits for SSH
// or WinRM and runs the instance-ready command. An error makes the fleet
// delete the instance and count a provider failure. It must return when ctx
// ends (the boot watchdog cancels it).
type Provisioner interface {
	Provision(ctx context.Context, inst providers.Instance, ci providers.ConnectInfo) error
}

// ProvisionerFunc adapts a function to Provisioner.
type ProvisionerFunc func(ctx context.Context, inst providers.Instance, ci providers.ConnectInfo) error

// Provision implements Provisioner.
func (f ProvisionerFunc) Provision(ctx context.Context, inst providers.Instance, ci providers.ConnectInfo) error {
	return f(ctx, inst, ci)
}

// ErrStopped is returned by Acquire once Run has ended.
var ErrStopped = errors.New("fleet: stopped")

// Fleet keeps the instances of one runner. Create it with New, start it
// with Run, take instances with Acquire.
type Fleet struct {
	cfg    Config
	clock  Clock
	log    *slog.Logger
	m      *metrics
	api    *api
	labels map[string]string
	limits Limits

	running atomic.Bool
	busy    atomic.Int64  // work in progress or queued, for Settled
	stopCh  chan struct{} // closed when Run ends
	wg      sync.WaitGroup
	runCtx  context.Context
	journal *journal

	wakeMu      sync.Mutex
	parked      bool          // the loop waits for a kick
	kickPending bool          // a pass was asked for
	wakeCh      chan struct{} // wakes the parked loop
	changed     chan struct{} // see Changed

	mu                 sync.Mutex
	books              map[string]*instance
	counts             [NumStates]int // by state, requested included
	idleQ              deque
	waiters            []*waiter // blocked Acquire calls, first come first served
	wastedWhileWaiting int       // instances deleted unused by choice while jobs were promised one
	reserved           int       // promises not yet handed an instance: Reservations and blocked Acquires
	jobsDone           int       // leases released after a job ran: the denominator of calls per job
	requested          int
	breaker            Breaker
	seq                uint64
	listGen            uint64
	suspects           map[string]time.Time
	createCalls        uint64 // Create calls started
	creating           int    // Create calls in flight
	deleting           bool   // a Delete call is in flight
	stopped            bool
	recovered          bool
	lastList           time.Time
	policy             schedule.Policy
	policyEntry        int
	policyUntil        time.Time
	lastPlan           Plan
	createWanted       time.Time    // when the scaler first wanted to create since the last Create call
	goneIDs            []string     // to record in the journal, outside mu
	toClose            []Attachment // of instances gone away, to close outside mu
	snapBuf            []InstanceView
	firstCreating      time.Time   // earliest createdAt of a creating instance, as of the last pass
	lastCreating       time.Time   // latest createdAt of a creating instance, as of the last pass
	seenRunning        BootTimes   // creation to seen running in a list, for the list cadence
	demand             DemandMeter // acquisitions and boot times (creation to ready)
}

// New checks cfg and returns a fleet. Nothing happens until Run.
func New(cfg Config) (*Fleet, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cfg.defaults()
	cfg.MaxInstances = minPositive(cfg.MaxInstances, cfg.ProviderMaxSize)
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	f := &Fleet{
		cfg:      cfg,
		clock:    cfg.Clock,
		log:      cfg.Logger.With("runner", cfg.Name),
		m:        m,
		labels:   map[string]string{providers.LabelManager: cfg.ManagerID, providers.LabelRunner: cfg.Name},
		limits:   cfg.Limits,
		wakeCh:   make(chan struct{}, 1),
		changed:  make(chan struct{}, 1),
		stopCh:   make(chan struct{}),
		books:    map[string]*instance{},
		suspects: map[string]time.Time{},
	}
	f.api = &api{
		prov:    cfg.Provider,
		runner:  cfg.Name,
		clock:   cfg.Clock,
		sleep:   f.sleep,
		timeout: cfg.CallTimeout,
		m:       m,
		log:     f.log,
		lim:     rate.NewLimiter(rate.Limit(cfg.APIRate), cfg.APIBurst),
		calls:   map[string]int{},
	}
	f.policy, f.policyEntry = cfg.Schedule.At(cfg.Clock.Now())
	f.busy.Store(1) // the scaler loop, until it first parks
	return f, nil
}

// Labels returns the labels every instance of this fleet carries.
func (f *Fleet) Labels() map[string]string { return maps.Clone(f.labels) }

// Run recovers from a previous run (see the package documentation), then
// runs the scaler and the reconciler until ctx ends. Then it stops handing
// out instances, waits for its calls in flight and, with DeleteOnShutdown,
// deletes the instances not handed out. Leases still outstanding are the
// caller's to release. Run returns nil when ctx ends, or an error that
// makes running unsafe (a journal that cannot be written). It may be
// called once.
func (f *Fleet) Run(ctx context.Context) error {
	if !f.running.CompareAndSwap(false, true) {
		return errors.New("fleet: Run called twice")
	}
	f.runCtx = ctx
	err := f.run(ctx)
	f.shutdown()
	return err
}

func (f *Fleet) run(ctx context.Context) error {
	for attempt := 1; ; attempt++ {
		err := f.recover(ctx)
		if err == nil {
			break
		}
		var fatal *journalError
		if errors.As(err, &fatal) {
			return err
		}
		f.log.Error("start-up reconciliation failed; retrying", "attempt", attempt, "error", err)
		if f.sleep(ctx, Backoff(time.Second, time.Minute, attempt)) != nil {
			return nil
		}
	}
	for {
		wake := f.pass(ctx)
		if ctx.Err() != nil {
			return nil
		}
		// Arm the timer before parking: once parked the loop no longer
		// counts as busy, and a fake clock may then be advanced at once.
		stop := f.clock.AfterFunc(max(wake.Sub(f.clock.Now()), time.Millisecond), f.kick)
		f.wakeMu.Lock()
		if f.kickPending { // kicked during the pass (or the timer fired): go again
			f.kickPending = false
			f.wakeMu.Unlock()
			stop()
			continue
		}
		f.parked = true
		f.unbusy()
		f.wakeMu.Unlock()
		select {
		case <-f.wakeCh: // the kicker counted us busy again
			stop()
			f.wakeMu.Lock()
			f.kickPending = false
			f.wakeMu.Unlock()
		case <-ctx.Done():
			stop()
			f.wakeMu.Lock()
			if f.parked {
				f.parked = false
				f.busy.Add(1)
			} else {
				<-f.wakeCh
			}
			f.wakeMu.Unlock()
			return nil
		}
	}
}

// kick asks the scaler loop for a pass soon. A parked loop is woken and
// counted busy at once, so that Settled never sees a gap.
func (f *Fleet) kick() {
	f.wakeMu.Lock()
	defer f.wakeMu.Unlock()
	f.kickPending = true
	if f.parked {
		f.parked = false
		f.busy.Add(1)
		f.wakeCh <- struct{}{}
	}
}

// unbusy ends one piece of work in progress; the last one signals Changed.
func (f *Fleet) unbusy() {
	if f.busy.Add(-1) == 0 {
		f.signalChanged()
	}
}

// signalChanged tells a receiver of Changed, if any, to look again.
func (f *Fleet) signalChanged() {
	select {
	case f.changed <- struct{}{}:
	default:
	}
}

// Changed returns a channel that receives when the fleet may have
// settled (its work in progress dropped to none) or an Acquire began to
// wait, so that a driver on a fake clock (the simulator) need not poll
// Settled in a loop. Several signals may arrive as one.
func (f *Fleet) Changed() <-chan struct{} { return f.changed }

// Settled reports whether the fleet has no work in progress or queued:
// the scaler loop is parked, no provider call or provisioning is running,
// and none waits for anything but the clock. With a fake clock this is
// the moment to advance it.
func (f *Fleet) Settled() bool { return f.busy.Load() == 0 }

// spawn runs fn in a goroutine owned by Run.
func (f *Fleet) spawn(fn func()) {
	f.wg.Add(1)
	f.busy.Add(1)
	go func() {
		defer f.wg.Done()
		defer f.unbusy()
		fn()
	}()
}

// sleep waits d on the fleet's clock or until ctx ends. It must be called
// from a goroutine counted in busy (the loop or a spawned one): while it
// waits on the clock the goroutine does not count as busy.
func (f *Fleet) sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	ch := make(chan struct{})
	stop := f.clock.AfterFunc(d, func() {
		f.busy.Add(1)
		close(ch)
	})
	f.unbusy() // after arming, so that the clock cannot pass d unseen
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		if stop() {
			f.busy.Add(1)
		} else {
			<-ch
		}
		return ctx.Err()
	}
}

// Outcomes.
const (
	// JobSucceeded: the job ran and passed.
	JobSucceeded Outcome = iota
	// JobFailed: the job ran and failed (its script's fault).
	JobFailed
	// SystemFailure: the job could not run properly on the instance
	// (runner_system_failure); the instance is deleted whatever MaxUses says.
	SystemFailure
)

// shutdown ends Run: no more acquisitions, calls in flight finish, and
// with DeleteOnShutdown the instances not handed out are deleted.
func (f *Fleet) shutdown() {
	f.mu.Lock()
	f.stopped = true
	close(f.stopCh)
	for _, in := range f.books {
		if in.cancel != nil {
			in.cancel()
			in.cancel = nil
		}
	}
	f.mu.Unlock()
	f.wg.Wait()
	f.flushGone()
	if f.cfg.DeleteOnShutdown {
		f.deleteOnShutdown()
	}
	f.flushGone()
	f.mu.Lock()
	for _, in := range f.books {
		if in.state != StateAcquired {
			f.dropAttachLocked(in) // a lease holder may still use its own
		}
	}
	f.mu.Unlock()
	f.closeAttachments()
	if f.journal != nil {
		if err := f.journal.Close(); err != nil {
			f.log.Error("close journal", "error", err)
		}
	}
	f.unbusy()
}

// shutdownAttempts bounds the Delete calls of a shutdown.
const shutdownAttempts = 3

// deleteOnShutdown deletes every instance not leased, in a few batched
// attempts bounded by ShutdownTimeout.
func (f *Fleet) deleteOnShutdown() {
	ctx, cancel := context.WithTimeout(context.Background(), f.cfg.ShutdownTimeout)
	defer cancel()
	for attempt := 1; attempt <= shutdownAttempts && ctx.Err() == nil; attempt++ {
		f.mu.Lock()
		var ids []string
		for _, in := range f.books {
			switch in.state {
			case StateCreating, StateProvisioning, StateIdle, StateFailed:
				f.deleteLocked(in, ReasonShutdown)
				ids = append(ids, in.id)
			case StateDeleting:
				ids = append(ids, in.id)
			}
		}
		f.mu.Unlock()
		if len(ids) == 0 {
			return
		}
		slices.Sort(ids)
		for chunk := range slices.Chunk(ids, maxDeleteBatch) {
			done, err := f.api.Delete(ctx, chunk)
			if err != nil {
				f.log.Warn("delete on shutdown", "attempt", attempt, "error", err)
			}
			f.mu.Lock()
			for _, id := range done {
				if in := f.books[id]; in != nil && in.state == StateDeleting {
					f.goneLocked(in)
				}
			}
			f.mu.Unlock()
		}
	}
	f.mu.Lock()
	left := 0
	for _, in := range f.books {
		if in.state == StateDeleting {
			left++
		}
	}
	f.mu.Unlock()
	if left > 0 {
		f.log.Error("instances left undeleted at shutdown; the next start deletes them", "count", left)
	}
}
