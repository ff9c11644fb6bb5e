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
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
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

// Config configures a Fleet. Zero durations take the defaults named.
type Config struct {
	// Name is the runner's name: the providers.LabelRunner label and the
	// runner label of the metrics. Required.
	Name string
	// ManagerID identifies this manager: the providers.LabelManager label.
	// It must be unique among managers sharing a provider. Required.
	ManagerID string
	// Provider creates, lists and deletes the instances. Required. The
	// caller has already called Init and calls Shutdown after Run returns.
	Provider providers.Provider
	// ProviderMaxSize is providers.Info.MaxSize (0: none); it caps the
	// fleet like MaxInstances.
	ProviderMaxSize int
	// Schedule gives the idle policy in force at each time; SetSchedule
	// replaces it while the fleet runs.
	Schedule schedule.Schedule
	// CheckInterval is how often the runner asks for jobs (check_interval):
	// part of the lead time of the predictive policy (default 3s).
	CheckInterval time.Duration
	// MaxUses is how many jobs an instance runs before it is deleted
	// (MaxBuilds, max_use_count). 0 means 1.
	MaxUses int
	// MaxGrowthRate caps instances being created at once; 0 = no cap.
	MaxGrowthRate int
	// MaxInstances caps instances in every state (limit, max_instances);
	// 0 = no cap.
	MaxInstances int
	// OnDemandWithin lets Reserve promise a job an instance that is not
	// idle yet but expected within this time (see Reservable); 0 = only
	// idle ones, unless IdleCount is 0.
	OnDemandWithin time.Duration
	// BootTimeout bounds creation to ready; a slower instance is deleted and
	// counted as a provider failure (default 10m).
	BootTimeout time.Duration
	// ReconcileInterval is how often the provider's list is compared with
	// the books when nothing is expected to change (default 1m).
	ReconcileInterval time.Duration
	// PollInterval is how often the list is read while instances are being
	// created (default 2s).
	PollInterval time.Duration
	// OrphanGrace is how long an unknown instance with our labels is
	// spared while Create calls are in flight, since it may be one of
	// theirs (default 10m).
	OrphanGrace time.Duration
	// DeleteOnShutdown deletes the instances not handed out when Run ends.
	DeleteOnShutdown bool
	// ShutdownTimeout bounds that deletion, in wall time (default 30s).
	ShutdownTimeout time.Duration
	// Provisioner makes running instances ready. nil: ready as soon as the
	// provider reports it running and its ConnectInfo validates.
	Provisioner Provisioner
	// JournalPath is the crash-safe record of acquired instances. Empty
	// keeps it in memory: then a restarted fleet deletes every instance
	// carrying its labels.
	JournalPath string
	// APIRate is the provider call budget in calls per second (default 10)
	// and APIBurst its bucket size (default 20).
	APIRate  float64
	APIBurst int
	// CallTimeout bounds every provider call, in wall time (default 5m).
	CallTimeout time.Duration
	// CreateBackoff and CreateBackoffMax bound the creation backoff
	// after failures (defaults 5s and 5m).
	CreateBackoff    time.Duration
	CreateBackoffMax time.Duration
	// DeleteBackoff and DeleteBackoffMax bound the wait before a failed
	// deletion is retried (defaults 1s and 1m).
	DeleteBackoff    time.Duration
	DeleteBackoffMax time.Duration
	// Clock is the source of time (default the system clock).
	Clock Clock
	// Logger receives the fleet's logs (default slog.Default()).
	Logger *slog.Logger
	// Registerer receives the metrics; nil: none.
	Registerer prometheus.Registerer
}

func (c *Config) validate() error {
	switch {
	case c.Name == "":
		return errors.New("fleet config: Name is empty")
	case c.ManagerID == "":
		return errors.New("fleet config: ManagerID is empty")
	case c.Provider == nil:
		return errors.New("fleet config: Provider is nil")
	}
	ints := []struct {
		name string
		v    int
	}{{"MaxUses", c.MaxUses}, {"MaxGrowthRate", c.MaxGrowthRate}, {"MaxInstances", c.MaxInstances}, {"ProviderMaxSize", c.ProviderMaxSize}, {"APIBurst", c.APIBurst}}
	for _, f := range ints {
		if f.v < 0 {
			return fmt.Errorf("fleet config: %s must not be negative, got %d", f.name, f.v)
		}
	}
	durs := []struct {
		name string
		v    time.Duration
	}{
		{"BootTimeout", c.BootTimeout}, {"CheckInterval", c.CheckInterval}, {"OnDemandWithin", c.OnDemandWithin}, {"ReconcileInterval", c.ReconcileInterval}, {"PollInterval", c.PollInterval},
		{"OrphanGrace", c.OrphanGrace}, {"ShutdownTimeout", c.ShutdownTimeout}, {"CallTimeout", c.CallTimeout},
		{"CreateBackoff", c.CreateBackoff}, {"CreateBackoffMax", c.CreateBackoffMax},
		{"DeleteBackoff", c.DeleteBackoff}, {"DeleteBackoffMax", c.DeleteBackoffMax},
	}
	for _, f := range durs {
		if f.v < 0 {
			return fmt.Errorf("fleet config: %s must not be negative, got %s", f.name, f.v)
		}
	}
	if c.APIRate < 0 {
		return fmt.Errorf("fleet config: APIRate must not be negative, got %g", c.APIRate)
	}
	return nil
}

func (c *Config) defaults() {
	setDur := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	setDur(&c.BootTimeout, 10*time.Minute)
	setDur(&c.CheckInterval, DefaultCheckInterval)
	setDur(&c.ReconcileInterval, time.Minute)
	setDur(&c.PollInterval, 2*time.Second)
	setDur(&c.OrphanGrace, 10*time.Minute)
	setDur(&c.ShutdownTimeout, 30*time.Second)
	setDur(&c.CallTimeout, 5*time.Minute)
	setDur(&c.CreateBackoff, 5*time.Second)
	setDur(&c.CreateBackoffMax, 5*time.Minute)
	setDur(&c.DeleteBackoff, time.Second)
	setDur(&c.DeleteBackoffMax, time.Minute)
	c.CreateBackoffMax = max(c.CreateBackoffMax, c.CreateBackoff)
	c.DeleteBackoffMax = max(c.DeleteBackoffMax, c.DeleteBackoff)
	if c.MaxUses == 0 {
		c.MaxUses = 1
	}
	if c.APIRate == 0 {
		c.APIRate = 10
	}
	if c.APIBurst == 0 {
		c.APIBurst = 20
	}
	if c.Clock == nil {
		c.Clock = SystemClock{}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// ErrStopped is returned by Acquire once Run has ended.
var ErrStopped = errors.New("fleet: stopped")

// maxDeleteBatch caps the ids of one Delete call.
const maxDeleteBatch = 500

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

	deleteStart time.Time
	delFailures int
	delNext     time.Time
	delInFlight bool

	lost       chan struct{} // made at acquisition; closed when lost
	lostClosed bool
}

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

	mu            sync.Mutex
	books         map[string]*instance
	counts        [NumStates]int // by state, requested included
	idleQ         deque
	avail         chan struct{} // closed and replaced when an instance becomes idle
	reserved      int           // promises not yet handed an instance: Reservations and blocked Acquires
	lastPromise   time.Time     // the last Reserve that succeeded and was not canceled
	requested     int
	breaker       Breaker
	seq           uint64
	listGen       uint64
	suspects      map[string]time.Time
	createCalls   uint64 // Create calls started
	creating      int    // Create calls in flight
	deleting      bool   // a Delete call is in flight
	stopped       bool
	recovered     bool
	lastList      time.Time
	policy        schedule.Policy
	policyEntry   int
	policyUntil   time.Time
	lastPlan      Plan
	goneIDs       []string // to record in the journal, outside mu
	snapBuf       []InstanceView
	firstCreating time.Time   // earliest createdAt of a creating instance, as of the last pass
	demand        DemandMeter // acquisitions and boot times
}

// New checks cfg and returns a fleet. Nothing happens until Run.
func New(cfg Config) (*Fleet, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cfg.defaults()
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	f := &Fleet{
		cfg:    cfg,
		clock:  cfg.Clock,
		log:    cfg.Logger.With("runner", cfg.Name),
		m:      m,
		labels: map[string]string{providers.LabelManager: cfg.ManagerID, providers.LabelRunner: cfg.Name},
		limits: Limits{
			MaxUses:        cfg.MaxUses,
			MaxGrowthRate:  cfg.MaxGrowthRate,
			MaxInstances:   minPositive(cfg.MaxInstances, cfg.ProviderMaxSize),
			BootTimeout:    cfg.BootTimeout,
			CheckInterval:  cfg.CheckInterval,
			OnDemandWithin: cfg.OnDemandWithin,
		},
		wakeCh:   make(chan struct{}, 1),
		stopCh:   make(chan struct{}),
		books:    map[string]*instance{},
		avail:    make(chan struct{}),
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

func minPositive(a, b int) int {
	switch {
	case a <= 0:
		return b
	case b <= 0:
		return a
	}
	return min(a, b)
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
		f.busy.Add(-1)
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
		defer f.busy.Add(-1)
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
	f.busy.Add(-1) // after arming, so that the clock cannot pass d unseen
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
	if !f.setStateLocked(in, StateDeleting) {
		return
	}
	now := f.clock.Now()
	in.reason = reason
	in.deleteStart = now
	in.delNext = now
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
	if !in.queued {
		in.queued = true
		if front {
			f.idleQ.pushFront(in)
		} else {
			f.idleQ.pushBack(in)
		}
	}
	close(f.avail)
	f.avail = make(chan struct{})
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
	f        *Fleet
	onDemand bool // promised an instance not idle yet: a wait is expected
	done     atomic.Bool
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
		if now.Sub(f.lastPromise) < f.limits.CheckInterval {
			// The runner got a job and asks again at once, but nothing
			// can be promised: demand outran supply.
			f.demand.Missed(now, f.limits.CheckInterval)
		}
		f.mu.Unlock()
		return nil, 0, false
	}
	f.lastPromise = now
	beyondIdle := f.reserved >= f.counts[StateIdle]
	f.reserved++
	f.mu.Unlock()
	if beyondIdle {
		f.kick() // demand the scaler creates an instance for
	}
	return &Reservation{f: f, onDemand: wait > 0}, wait, true
}

// Acquire takes the promised instance, waiting for it until ctx ends.
func (r *Reservation) Acquire(ctx context.Context) (*Lease, error) {
	if r.done.Swap(true) {
		return nil, errors.New("acquire: reservation already ended")
	}
	return r.f.acquire(ctx, r.onDemand)
}

// Cancel gives the promise back: the job it was for did not come.
func (r *Reservation) Cancel() {
	if r.done.Swap(true) {
		return
	}
	r.f.mu.Lock()
	r.f.reserved--
	r.f.lastPromise = time.Time{} // no job came: a refusal next is no sign of demand
	r.f.mu.Unlock()
	r.f.kick()
}

// Outcome is how the job on a leased instance ended.
type Outcome int

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
	return f.acquire(ctx, false)
}

// acquire serves one promise counted in f.reserved, which it gives back
// whatever happens. planned says the promise was made on demand, so a
// wait is no sign that demand outran supply.
func (f *Fleet) acquire(ctx context.Context, planned bool) (*Lease, error) {
	var waitStart time.Time
	waited := false
	served := false
	defer func() {
		if !served {
			f.mu.Lock()
			f.reserved--
			f.mu.Unlock()
		}
	}()
	for {
		f.mu.Lock()
		if f.stopped {
			f.mu.Unlock()
			return nil, ErrStopped
		}
		if err := ctx.Err(); err != nil {
			f.mu.Unlock()
			return nil, err
		}
		if in := f.popIdleLocked(); in != nil {
			served = true
			f.reserved--
			f.demand.Acquired(f.clock.Now())
			f.setStateLocked(in, StateAcquired)
			in.lost = make(chan struct{})
			in.lostClosed = false
			in.journaled = true
			j := f.journal
			l := &Lease{f: f, in: in, inst: f.instanceOf(in), ci: in.ci}
			f.mu.Unlock()
			return f.commit(ctx, l, j, waited, waitStart)
		}
		if !waited {
			waited = true
			waitStart = f.clock.Now()
			if !planned {
				// A job found the pool empty: demand outran supply.
				f.demand.Missed(waitStart, f.limits.CheckInterval)
			}
			f.m.waits.WithLabelValues(f.cfg.Name).Inc()
			f.kick() // the scaler counts promises beyond the idle instances as demand
		}
		ch := f.avail
		f.mu.Unlock()
		select {
		case <-ch:
		case <-f.stopCh:
		case <-ctx.Done():
		}
	}
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
	if f.journal != nil {
		if err := f.journal.Close(); err != nil {
			f.log.Error("close journal", "error", err)
		}
	}
	f.busy.Add(-1)
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
	if plan.Create > 0 && ctx.Err() == nil {
		n := plan.Create
		f.requested += n
		f.counts[StateRequested] += n
		f.createCalls++
		f.creating++
		f.spawn(func() { f.create(ctx, n) })
	}
	wake := plan.Wake
	at := func(t time.Time) {
		if wake.IsZero() || t.Before(wake) {
			wake = t
		}
	}
	f.dispatchDeletesLocked(ctx, now, at)
	f.compactIdleLocked()
	f.lastPlan = plan
	at(f.nextListLocked())
	at(f.policyUntil)
	f.updateGaugesLocked(plan)
	f.mu.Unlock()
	f.flushGone()
	return wake
}

// nextListLocked returns when the provider's list should be read next.
// While instances are creating it is read every PollInterval, but not
// before the first of them can be expected to run: its creation time plus
// the shortest boot seen lately, less one PollInterval. Otherwise it is
// read every ReconcileInterval. f.mu is held.
func (f *Fleet) nextListLocked() time.Time {
	if !f.recovered {
		return f.lastList.Add(f.cfg.PollInterval)
	}
	if f.counts[StateCreating] == 0 {
		return f.lastList.Add(f.cfg.ReconcileInterval)
	}
	next := f.lastList.Add(f.cfg.PollInterval)
	if lead := f.bootLead(); lead > 0 && !f.firstCreating.IsZero() {
		if expect := f.firstCreating.Add(lead); expect.After(next) {
			next = expect
		}
	}
	if limit := f.lastList.Add(f.cfg.ReconcileInterval); limit.Before(next) {
		return limit
	}
	return next
}

// bootSamples is how many recent boot times BootTimes keeps.
const bootSamples = 16

// bootLead is how long after creation a list is first worth reading: the
// shortest of the recent boot times (creation to seen running), less one
// PollInterval since a boot is seen up to that late. f.mu is held.
func (f *Fleet) bootLead() time.Duration {
	shortest := f.demand.BootShortest()
	if shortest == 0 {
		return 0
	}
	return max(shortest-f.cfg.PollInterval, 0)
}

// observeBootLocked records how long an instance took to run. f.mu is held.
func (f *Fleet) observeBootLocked(d time.Duration) {
	f.demand.Booted(d)
}

// snapshotLocked copies the books for Decide (with the measured demand)
// or Reservable (without). f.mu is held.
func (f *Fleet) snapshotLocked(now time.Time, withDemand bool) Snapshot {
	views := f.snapBuf[:0] // reused: Decide keeps nothing of it
	f.firstCreating = time.Time{}
	for _, in := range f.books {
		if in.state == StateCreating && (f.firstCreating.IsZero() || in.createdAt.Before(f.firstCreating)) {
			f.firstCreating = in.createdAt
		}
		views = append(views, InstanceView{ID: in.id, State: in.state, CreatedAt: in.createdAt, IdleSince: in.idleSince, Uses: in.uses})
	}
	f.snapBuf = views
	if cap(views) > 4*len(views)+64 {
		f.snapBuf = nil // the fleet shrank a lot: let the big buffer go
	}
	snap := Snapshot{Now: now, Instances: views, Requested: f.requested, Reserved: f.reserved, Breaker: f.breaker}
	if withDemand && f.policy.Predictive {
		snap.Demand = f.demand.Demand(now, f.limits.CheckInterval, f.policy.Quantile())
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

// create runs one Create call for n instances.
func (f *Fleet) create(ctx context.Context, n int) {
	start := f.clock.Now()
	ids, err := f.api.Create(ctx, n, f.labels)
	f.mu.Lock()
	now := f.clock.Now()
	f.requested -= n
	f.counts[StateRequested] -= n
	f.creating--
	for _, id := range ids {
		if old := f.books[id]; old != nil {
			f.log.Error("provider returned an id already in the books", "instance", id, "state", old.state)
			continue
		}
		in := f.addLocked(id, StateCreating, now)
		in.requestedAt = start
	}
	if err != nil {
		_, rateLimited := providers.IsRateLimited(err)
		_, quota := providers.IsQuotaExceeded(err)
		_, capacity := providers.IsCapacityExhausted(err)
		if !rateLimited && ctx.Err() == nil {
			f.breaker.Fail(now, quota || capacity, f.cfg.CreateBackoff, f.cfg.CreateBackoffMax)
		}
		f.log.Warn("create instances failed", "requested", n, "created", len(ids), "kind", providers.KindOf(err), "failures", f.breaker.Failures, "retry_at", f.breaker.RetryAt, "error", err)
	} else {
		f.log.Info("instances created", "count", len(ids))
	}
	f.mu.Unlock()
	f.kick()
}

// dispatchDeletesLocked starts one batched Delete call for the instances
// whose deletion is due, and reports the next retry time through at.
func (f *Fleet) dispatchDeletesLocked(ctx context.Context, now time.Time, at func(time.Time)) {
	if f.counts[StateDeleting] == 0 {
		return
	}
	var ids []string
	for _, in := range f.books {
		if in.state != StateDeleting || in.delInFlight {
			continue
		}
		if now.Before(in.delNext) || f.deleting || len(ids) == maxDeleteBatch || ctx.Err() != nil {
			at(in.delNext)
			continue
		}
		ids = append(ids, in.id)
	}
	if len(ids) == 0 {
		return
	}
	for _, id := range ids {
		f.books[id].delInFlight = true
	}
	f.deleting = true
	slices.Sort(ids)
	f.spawn(func() { f.deleteBatch(ctx, ids) })
}

// deleteBatch runs one Delete call; the ids the provider did not confirm
// are retried with backoff.
func (f *Fleet) deleteBatch(ctx context.Context, ids []string) {
	done, err := f.api.Delete(ctx, ids)
	f.mu.Lock()
	now := f.clock.Now()
	confirmed := make(map[string]bool, len(done))
	for _, id := range done {
		confirmed[id] = true
	}
	failed := 0
	for _, id := range ids {
		in := f.books[id]
		if in == nil {
			continue
		}
		in.delInFlight = false
		if in.state != StateDeleting {
			continue
		}
		if confirmed[id] {
			f.goneLocked(in)
			continue
		}
		failed++
		in.delFailures++
		in.delNext = now.Add(Backoff(f.cfg.DeleteBackoff, f.cfg.DeleteBackoffMax, in.delFailures))
	}
	f.deleting = false
	f.mu.Unlock()
	if err != nil || failed > 0 {
		f.log.Warn("delete instances: not all confirmed; retrying later", "requested", len(ids), "confirmed", len(done), "error", err)
	}
	f.flushGone()
	f.kick()
}

// provision makes a running instance ready: connect info, then the
// provisioner. Transient connect-info errors are retried until the boot
// watchdog cancels ctx.
func (f *Fleet) provision(ctx context.Context, in *instance, inst providers.Instance) {
	var ci providers.ConnectInfo
	var err error
	op := OpConnectInfo
	for attempt := 1; ; attempt++ {
		ci, err = f.api.ConnectInfo(ctx, in.id)
		switch {
		case err == nil && ci.Protocol == providers.ProtocolSSH && ci.HostKey == "":
			// Some clouds publish the SSH host key only after boot (GCE guest
			// attributes, EC2 console output). The key is pinned, never trusted
			// on first use, so ask again until it appears or the boot watchdog
			// gives up.
			err = providers.Transient(fmt.Errorf("instance %s: no SSH host key published yet", in.id))
		case err == nil && ci.Protocol == providers.ProtocolWinRM && len(ci.TLSCert) == 0:
			// The same for the WinRM certificate, which the startup script
			// publishes once the HTTPS listener exists.
			err = providers.Transient(fmt.Errorf("instance %s: no WinRM certificate published yet", in.id))
		}
		if err == nil || !providers.IsTransient(err) || ctx.Err() != nil {
			break
		}
		if f.sleep(ctx, Backoff(time.Second, 30*time.Second, attempt)) != nil {
			break
		}
	}
	if err == nil {
		if err = ci.Validate(); err != nil {
			err = providers.Permanent(err)
		}
	}
	if err == nil && f.cfg.Provisioner != nil {
		op = "provision"
		err = f.cfg.Provisioner.Provision(ctx, inst, ci)
	}
	f.mu.Lock()
	if in.state != StateProvisioning {
		f.mu.Unlock()
		return // deleted meanwhile (boot watchdog, shutdown, vanished)
	}
	in.cancel = nil
	if err != nil {
		kind := providers.KindOf(err).String()
		if op == "provision" {
			kind = "provision"
		}
		f.failLocked(in, op, kind, err)
	} else {
		now := f.clock.Now()
		in.ci = ci
		in.idleSince = now
		if !in.requestedAt.IsZero() {
			f.m.creation.WithLabelValues(f.cfg.Name).Observe(now.Sub(in.requestedAt).Seconds())
		}
		f.breaker.Succeed(in.createdAt)
		f.becomeIdleLocked(in, false)
		f.log.Info("instance ready", "instance", in.id)
	}
	f.mu.Unlock()
	f.kick()
}

// startProvisionLocked moves in from creating to provisioning and starts
// making it ready.
func (f *Fleet) startProvisionLocked(in *instance) {
	if !f.setStateLocked(in, StateProvisioning) || f.stopped {
		return
	}
	ctx, cancel := context.WithCancel(f.runCtx)
	in.cancel = cancel
	inst := f.instanceOf(in)
	f.spawn(func() {
		defer cancel()
		f.provision(ctx, in, inst)
	})
}

// InstanceStatus is one instance row of Status.
type InstanceStatus struct {
	ID        string    `json:"id"`
	State     State     `json:"state"`
	Since     time.Time `json:"since"`
	CreatedAt time.Time `json:"created_at"`
	IdleSince time.Time `json:"idle_since,omitzero"`
	Uses      int       `json:"uses"`
	Reason    Reason    `json:"reason,omitempty"`
}

// Status is a snapshot of the fleet for `mayfly fleet status` and the
// demo's live view.
type Status struct {
	Runner      string           `json:"runner"`
	Time        time.Time        `json:"time"`
	PolicyEntry int              `json:"policy_entry"` // schedule.NoEntry for the default
	Policy      schedule.Policy  `json:"policy"`
	IdleTarget  int              `json:"idle_target"`
	Held        string           `json:"held,omitempty"`
	Counts      map[string]int   `json:"counts"`
	Reserved    int              `json:"reserved"` // jobs promised an instance not yet handed out
	Breaker     Breaker          `json:"breaker"`
	APICalls    map[string]int   `json:"api_calls"`
	Instances   []InstanceStatus `json:"instances"`
}

// Status returns the fleet's current state, instances sorted by creation.
func (f *Fleet) Status() Status {
	f.mu.Lock()
	st := Status{
		Runner:      f.cfg.Name,
		Time:        f.clock.Now(),
		PolicyEntry: f.policyEntry,
		Policy:      f.policy,
		IdleTarget:  f.lastPlan.IdleTarget,
		Held:        f.lastPlan.Held,
		Counts:      make(map[string]int, NumStates),
		Reserved:    f.reserved,
		Breaker:     f.breaker,
		Instances:   make([]InstanceStatus, 0, len(f.books)),
	}
	for s := range NumStates {
		if State(s) != StateGone {
			st.Counts[State(s).String()] = f.counts[s]
		}
	}
	for _, in := range f.books {
		st.Instances = append(st.Instances, InstanceStatus{
			ID: in.id, State: in.state, Since: in.since, CreatedAt: in.createdAt,
			IdleSince: in.idleSince, Uses: in.uses, Reason: in.reason,
		})
	}
	f.mu.Unlock()
	st.APICalls = f.api.Calls()
	slices.SortFunc(st.Instances, func(a, b InstanceStatus) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return st
}
