// Package sim is a discrete-event simulator of an autoscaled VM-per-job
// fleet. It replays a job-arrival trace through an idle-pool policy and a
// simulated provider in virtual time, and reports queue-to-start latency,
// VM-hours and provider API calls.
//
// The "mayfly" and "predictive" policies run the production fleet.Fleet
// (its scaler, reservations, waiters, list cadence and API budget) on a
// fleettest.Clock that the simulation advances, with a simulated provider
// and provisioner, and a driver that takes jobs as the manager does, so
// their figures are the runtime's; "docker-machine" and
// "taskscaler" re-implement gitlab-runner's two autoscalers as baselines,
// after gitlab-runner's source and documentation (docker+machine's
// executors/docker/machine, taskscaler's documented settings; the
// taskscaler capacity formula is inferred and marked so in the report's
// assumptions); "oracle" knows the future and is a lower bound.
package sim

import (
	"container/heap"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/fleet"
	"github.com/mayfly-ci/mayfly/schedule"
)

// Policy names accepted by Options.Policy.
const (
	PolicyDockerMachine = "docker-machine"
	PolicyTaskscaler    = "taskscaler"
	PolicyMayfly        = "mayfly"
	PolicyPredictive    = "predictive"
	PolicyOracle        = "oracle"
)

// Policies lists the policy names, baselines first.
var Policies = []string{PolicyDockerMachine, PolicyTaskscaler, PolicyMayfly, PolicyPredictive, PolicyOracle}

// Options configures one simulation run.
type Options struct {
	// Policy is one of Policies.
	Policy string
	// Trace names the trace in the report (optional).
	Trace string
	// Jobs is the arrival trace, sorted by arrival (ReadTrace sorts).
	Jobs []Job
	// Schedule is the idle policy in force at each time.
	Schedule schedule.Schedule
	// Limits are the fleet's bounds and cadences, as the runtime fleet
	// takes them. The taskscaler baseline has no MaxGrowthRate and
	// ignores it; the baselines ignore OnDemandWithin, BootTimeout and the
	// list intervals.
	fleet.Limits
	// MaxJobs caps jobs running at once (concurrent and the runner's
	// limit); 0 = no cap.
	MaxJobs int
	// Provider is the simulated cloud.
	Provider Provider
	// Predictive tunes the predictive policy.
	Predictive Predictive
	// Warmup is how long before the first arrival the simulation starts,
	// so that the pool can fill (default 10m; negative: none).
	Warmup time.Duration
	// Horizon bounds the simulation after the last arrival (default
	// 12h); jobs not started by then count as not started.
	Horizon time.Duration
	// SLO is the queue-to-start bound of Report.WithinSLO (default 120s).
	SLO time.Duration
	// SeriesStep, when positive, records Report.Series at this step.
	SeriesStep time.Duration
}

func (o *Options) defaults() error {
	if !slices.Contains(Policies, o.Policy) {
		return fmt.Errorf("policy: want one of %s, got %q", strings.Join(Policies, ", "), o.Policy)
	}
	if len(o.Jobs) == 0 {
		return errors.New("trace: no jobs")
	}
	if !slices.IsSortedFunc(o.Jobs, func(a, b Job) int { return a.Arrival.Compare(b.Arrival) }) {
		return errors.New("trace: jobs not sorted by arrival")
	}
	if err := o.Limits.Validate(); err != nil {
		return err
	}
	if o.MaxJobs < 0 {
		return fmt.Errorf("MaxJobs must not be negative, got %d", o.MaxJobs)
	}
	if o.Horizon < 0 || o.SLO < 0 || o.SeriesStep < 0 {
		return errors.New("Horizon, SLO and SeriesStep must not be negative")
	}
	if err := o.Provider.validate(); err != nil {
		return err
	}
	if err := o.Predictive.defaults(); err != nil {
		return err
	}
	o.Limits = o.Limits.WithDefaults()
	switch {
	case o.Warmup == 0:
		o.Warmup = 10 * time.Minute
	case o.Warmup < 0:
		o.Warmup = 0
	}
	if o.Horizon == 0 {
		o.Horizon = 12 * time.Hour
	}
	if o.SLO == 0 {
		o.SLO = 120 * time.Second
	}
	return nil
}

// Run simulates opts and reports the outcome.
func Run(opts Options) (Report, error) {
	if err := opts.defaults(); err != nil {
		return Report{}, fmt.Errorf("simulate: %w", err)
	}
	if opts.Policy == PolicyOracle {
		return runOracle(&opts), nil
	}
	w := newWorld(&opts)
	switch opts.Policy {
	case PolicyDockerMachine:
		w.ctl = newDockerMachine(w)
	case PolicyTaskscaler:
		w.ctl = newTaskscaler(w)
	case PolicyMayfly, PolicyPredictive:
		rf, err := newRuntimeFleet(w, opts.Policy == PolicyPredictive)
		if err != nil {
			return Report{}, fmt.Errorf("simulate: %w", err)
		}
		w.ctl = rf
		w.run()
		if err := rf.stop(); err != nil {
			return Report{}, fmt.Errorf("simulate %s: %w", opts.Policy, err)
		}
		return w.report(), nil
	}
	w.run()
	return w.report(), nil
}

// timed is a controller with timers of its own (the runtime fleet's
// clock), which the simulation runs in order with its events.
type timed interface {
	// next returns the due time of the earliest timer.
	next() (time.Time, bool)
	// fire moves the controller's clock to t, running the timers due.
	fire(t time.Time)
}

// vmState is a simulated VM's state; the controllers map it to their own
// vocabulary.
type vmState int

const (
	vmRequested vmState = iota // create call waiting for the API budget
	vmCreating                 // booting
	vmIdle                     // ready, no job
	vmBusy                     // running a job
	vmFailed                   // boot failed, not yet deleted
	vmDeleting                 // deletion called, still billed
	vmGone
	numVMStates
)

type vm struct {
	id        int
	name      string
	state     vmState
	since     time.Time // entered state
	createdAt time.Time // the create call went through
	readyAt   time.Time
	idleSince time.Time // ready, or last job end
	uses      int
	bootEnd   time.Time
	failBoot  bool
	job       int // bound on-demand job (docker-machine, IdleCount 0), or -1
	// The runtime fleet's VMs (simCloud):
	labels       map[string]string
	deleteCalled bool // the provider's Delete was called for it
	everIdle     bool // became ready
}

type evKind int

const (
	evTick evKind = iota
	evCreated
	evBooted
	evJobEnd
	evDeleted
	evWake
)

type event struct {
	at   time.Time
	seq  uint64
	kind evKind
	vm   *vm
}

type eventHeap []event

func (h eventHeap) Len() int { return len(h) }
func (h eventHeap) Less(i, j int) bool {
	if c := h[i].at.Compare(h[j].at); c != 0 {
		return c < 0
	}
	return h[i].seq < h[j].seq
}
func (h eventHeap) Swap(i, j int)     { h[i], h[j] = h[j], h[i] }
func (h *eventHeap) Push(x any)       { *h = append(*h, x.(event)) }
func (h *eventHeap) Pop() any         { old := *h; e := old[len(old)-1]; *h = old[:len(old)-1]; return e }
func (h *eventHeap) push(e event)     { heap.Push(h, e) }
func (h *eventHeap) pop() event       { return heap.Pop(h).(event) }
func (h eventHeap) peekAt() time.Time { return h[0].at }

// controller is one autoscaling policy's reaction to the world.
type controller interface {
	// tick is one job-request attempt of the runner (every CheckInterval).
	tick(now time.Time)
	// booted: v finished booting (v.failBoot: it failed; v is vmFailed).
	booted(v *vm, now time.Time)
	// jobEnded: v's job ended; v is still vmBusy.
	jobEnded(v *vm, now time.Time)
	// wake: a wake-up the controller asked for with world.wakeAt.
	wake(now time.Time)
	// settle runs after all events at one instant.
	settle(now time.Time)
	// assumptions lists modelling assumptions for the report.
	assumptions() []string
	// polls says whether the controller lists the provider's instances
	// (counted as API calls by pollCalls).
	polls() bool
}

type world struct {
	o     *Options
	ctl   controller
	cloud *cloud
	ev    eventHeap
	seq   uint64
	now   time.Time
	start time.Time
	end   time.Time // hard stop

	nextVM  int
	count   [numVMStates]int
	alive   int
	peak    int
	stateNS [numVMStates]time.Duration // VM time by state

	jobs     []Job
	arrived  int   // jobs[:arrived] have arrived
	pending  []int // FIFO of arrived, unstarted jobs
	pendHead int
	started  int
	finished int
	running  int // jobs running or bound to a VM
	latency  []time.Duration
	// jobLatency, when not nil, records each job's latency by index.
	jobLatency []time.Duration
	failures   int
	created    int // VMs created
	// wastedWhileWaiting counts VMs deleted unused after they became
	// ready while a job was waiting for one (issue 20's invariant).
	wastedWhileWaiting int
	// waitingJobs counts jobs taken on demand whose VM has not come.
	waitingJobs   int
	deletedUnused int // VMs deleted without running a job, after they became ready

	lastAdvance  time.Time
	creatingTime time.Duration // time with a VM requested or creating

	wakeScheduled time.Time

	series     []Sample
	nextSample time.Time
}

func newWorld(o *Options) *world {
	start := o.Jobs[0].Arrival.Add(-o.Warmup)
	w := &world{
		o:       o,
		cloud:   newCloud(o.Provider),
		now:     start,
		start:   start,
		end:     o.Jobs[len(o.Jobs)-1].Arrival.Add(o.Horizon),
		jobs:    o.Jobs,
		latency: make([]time.Duration, 0, len(o.Jobs)),
	}
	w.lastAdvance = start
	w.nextSample = start
	return w
}

func (w *world) schedule(at time.Time, k evKind, v *vm) {
	w.seq++
	w.ev.push(event{at: at, seq: w.seq, kind: k, vm: v})
}

// wakeAt asks for a controller wake at t (coalesced to the earliest).
func (w *world) wakeAt(t time.Time) {
	if t.IsZero() {
		return
	}
	if t.Before(w.now) {
		t = w.now
	}
	if !w.wakeScheduled.IsZero() && !t.Before(w.wakeScheduled) && w.wakeScheduled.After(w.now) {
		return
	}
	w.wakeScheduled = t
	w.schedule(t, evWake, nil)
}

// advance moves virtual time to t, accounting VM time.
func (w *world) advance(t time.Time) {
	if !t.After(w.lastAdvance) {
		w.now = t
		return
	}
	dt := t.Sub(w.lastAdvance)
	for s := range numVMStates {
		w.stateNS[s] += time.Duration(w.count[s]) * dt
	}
	if w.count[vmRequested]+w.count[vmCreating] > 0 {
		w.creatingTime += dt
	}
	for w.o.SeriesStep > 0 && !w.nextSample.After(t) {
		w.sample(w.nextSample)
		w.nextSample = w.nextSample.Add(w.o.SeriesStep)
	}
	w.lastAdvance = t
	w.now = t
}

func (w *world) setState(v *vm, s vmState) {
	if v.state == s {
		return
	}
	w.count[v.state]--
	w.count[s]++
	if s == vmGone {
		w.alive--
	}
	v.state = s
	v.since = w.now
}

func (w *world) run() {
	w.schedule(w.start, evTick, nil)
	tc, _ := w.ctl.(timed)
	for w.finished < len(w.jobs) {
		// The next instant: an arrival, an event or a controller's timer.
		var t time.Time
		hasEv := w.ev.Len() > 0
		hasArr := w.arrived < len(w.jobs)
		switch {
		case hasArr && (!hasEv || !w.ev.peekAt().Before(w.jobs[w.arrived].Arrival)):
			t = w.jobs[w.arrived].Arrival
		case hasEv:
			t = w.ev.peekAt()
		}
		if tc != nil {
			if nt, ok := tc.next(); ok && (t.IsZero() || nt.Before(t)) {
				t = nt
			}
		}
		if t.IsZero() {
			return
		}
		if t.After(w.end) {
			w.advance(w.end)
			return
		}
		w.advance(t)
		for w.arrived < len(w.jobs) && !w.jobs[w.arrived].Arrival.After(t) {
			w.pending = append(w.pending, w.arrived)
			w.arrived++
		}
		if tc != nil {
			tc.fire(t) // the controller's clock moves with the world's
		}
		for w.ev.Len() > 0 && !w.ev.peekAt().After(t) {
			e := w.ev.pop()
			w.handle(e)
		}
		w.ctl.settle(w.now)
	}
}

func (w *world) handle(e event) {
	v := e.vm
	switch e.kind {
	case evTick:
		w.ctl.tick(w.now)
		w.schedule(w.now.Add(w.o.CheckInterval), evTick, nil)
	case evCreated:
		if v.state != vmRequested {
			return
		}
		v.createdAt = w.now
		w.setState(v, vmCreating)
		boot, failed := w.cloud.boot()
		v.bootEnd, v.failBoot = w.now.Add(boot), failed
		w.schedule(v.bootEnd, evBooted, v)
	case evBooted:
		if v.state != vmCreating || !v.bootEnd.Equal(w.now) {
			return // deleted meanwhile (boot watchdog)
		}
		if v.failBoot {
			w.failures++
			w.setState(v, vmFailed)
		} else {
			v.readyAt, v.idleSince = w.now, w.now
			w.setState(v, vmIdle)
		}
		w.ctl.booted(v, w.now)
	case evJobEnd:
		w.finished++
		w.running--
		w.ctl.jobEnded(v, w.now)
	case evDeleted:
		w.setState(v, vmGone)
	case evWake:
		if w.wakeScheduled.Equal(w.now) {
			w.wakeScheduled = time.Time{}
		}
		w.ctl.wake(w.now)
	}
}

// create asks for n VMs: one API call when batched, else one per VM.
func (w *world) create(n int, batched bool) []*vm {
	out := make([]*vm, 0, n)
	var at time.Time
	for i := range n {
		if i == 0 || !batched {
			at = w.cloud.call(w.now)
		}
		w.nextVM++
		v := &vm{id: w.nextVM, state: vmRequested, since: w.now, job: -1}
		w.count[vmRequested]++
		w.alive++
		w.peak = max(w.peak, w.alive)
		w.created++
		if at.After(w.now) {
			w.schedule(at, evCreated, v)
		} else {
			v.createdAt = w.now
			w.setState(v, vmCreating)
			boot, failed := w.cloud.boot()
			v.bootEnd, v.failBoot = w.now.Add(boot), failed
			w.schedule(v.bootEnd, evBooted, v)
		}
		out = append(out, v)
	}
	return out
}

// launch makes n VMs booting now, for the runtime fleet's provider (which
// counts its own calls; the fleet keeps its own API budget).
func (w *world) launch(n int) []*vm {
	out := make([]*vm, 0, n)
	for range n {
		w.nextVM++
		v := &vm{id: w.nextVM, state: vmRequested, since: w.now, job: -1}
		w.count[vmRequested]++
		w.alive++
		w.peak = max(w.peak, w.alive)
		w.created++
		v.createdAt = w.now
		w.setState(v, vmCreating)
		boot, failed := w.cloud.boot()
		v.bootEnd, v.failBoot = w.now.Add(boot), failed
		if failed {
			w.failures++
		}
		out = append(out, v)
	}
	return out
}

// ready makes a booted VM idle (the runtime fleet's provisioner is done).
func (w *world) ready(v *vm) {
	v.readyAt, v.idleSince, v.everIdle = w.now, w.now, true
	w.setState(v, vmIdle)
}

// removeCalled records the provider's Delete call for VMs: each is billed
// for the provider's DeleteTime more.
func (w *world) removeCalled(vs []*vm) {
	for _, v := range vs {
		v.deleteCalled = true
		if v.state == vmIdle && v.uses == 0 {
			w.deletedUnused++
			if w.waitingJobs > 0 {
				w.wastedWhileWaiting++
			}
		}
		w.setState(v, vmDeleting)
		w.schedule(w.now.Add(w.o.Provider.DeleteTime), evDeleted, v)
	}
}

// remove deletes VMs: one API call when batched, else one per VM.
func (w *world) remove(vs []*vm, batched bool) {
	var at time.Time
	calls := 0
	for _, v := range vs {
		if v.state == vmDeleting || v.state == vmGone {
			continue
		}
		if v.state == vmRequested {
			// Never created: nothing to delete.
			w.setState(v, vmGone)
			continue
		}
		if calls == 0 || !batched {
			at = w.cloud.call(w.now)
			calls++
		}
		w.setState(v, vmDeleting)
		w.schedule(at.Add(w.o.Provider.DeleteTime), evDeleted, v)
	}
}

// hasPending reports whether a job waits in GitLab's queue.
func (w *world) hasPending() bool { return w.pendHead < len(w.pending) }

// canRun reports whether the runner may take one more job.
func (w *world) canRun() bool { return w.o.MaxJobs == 0 || w.running < w.o.MaxJobs }

// takeJob removes the oldest pending job from the queue.
func (w *world) takeJob() int {
	j := w.pending[w.pendHead]
	w.pendHead++
	if w.pendHead > 1024 && w.pendHead*2 > len(w.pending) {
		w.pending = append(w.pending[:0], w.pending[w.pendHead:]...)
		w.pendHead = 0
	}
	w.running++
	return j
}

// requeue puts a taken job back at the head of the queue.
func (w *world) requeue(j int) {
	w.running--
	if w.pendHead > 0 {
		w.pendHead--
		w.pending[w.pendHead] = j
		return
	}
	w.pending = slices.Insert(w.pending, 0, j)
}

// startJob runs job j on v, which must be idle (or creating-to-idle).
func (w *world) startJob(v *vm, j int) {
	w.started++
	w.latency = append(w.latency, w.now.Sub(w.jobs[j].Arrival))
	if w.jobLatency != nil {
		w.jobLatency[j] = w.now.Sub(w.jobs[j].Arrival)
	}
	v.uses++
	v.job = -1
	w.setState(v, vmBusy)
	w.schedule(w.now.Add(w.jobs[j].Duration), evJobEnd, v)
}

// jobDone moves a VM whose job ended back to idle.
func (w *world) backToIdle(v *vm) {
	v.idleSince = w.now
	w.setState(v, vmIdle)
}
