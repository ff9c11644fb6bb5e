package sim

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/mayfly-ci/mayfly/fleet"
	"github.com/mayfly-ci/mayfly/fleet/fleettest"
	"github.com/mayfly-ci/mayfly/schedule"
)

// settleTimeout bounds, in wall time, how long the driver waits for the
// fleet to settle after one step: far beyond any step, so that a fleet
// that never settles fails the run instead of hanging it.
const settleTimeout = time.Minute

// runtimeFleet drives the production fleet.Fleet (policies "mayfly" and
// "predictive") on a fleettest.Clock that the simulation advances, with
// simCloud as its provider and its provisioner. The manager's side
// follows manager.tryRequest: each CheckInterval the runner reserves an
// instance, asks GitLab for a job and takes it while Fleet.Reserve
// promises one (idle, or on demand), and asks again at once after a job
// came; a job's Acquire waits in its own goroutine, as the manager's does.
type runtimeFleet struct {
	w      *world
	clk    *fleettest.Clock
	cloud  *simCloud
	f      *fleet.Fleet
	cancel context.CancelFunc
	done   chan error
	err    error // the first failure; it ends the run

	leases    map[*vm]*fleet.Lease
	acquired  chan acquired // results of the Acquire goroutines
	started   int           // Acquire goroutines started
	finished  int           // Acquire goroutines that reported
	onDemand  int           // jobs promised an instance that was not idle
	maxTarget int
	// targetRises sums the rises of the idle target: each may create that
	// many VMs that no job asked for yet (issue 20's bound).
	targetRises, lastTarget int
	timer                   *time.Timer // settleFleet's fallback
}

type acquired struct {
	job   int
	lease *fleet.Lease
	err   error
}

func newRuntimeFleet(w *world, predictive bool) (*runtimeFleet, error) {
	o := w.o
	sched := o.Schedule
	if predictive {
		sched.Default = o.Predictive.apply(sched.Default)
		sched.Entries = append([]schedule.Entry(nil), sched.Entries...)
		for i := range sched.Entries {
			sched.Entries[i].Policy = o.Predictive.apply(sched.Entries[i].Policy)
		}
	}
	r := &runtimeFleet{
		w:        w,
		clk:      fleettest.NewClock(w.start),
		cloud:    newSimCloud(w, o.Provider.Connect),
		leases:   map[*vm]*fleet.Lease{},
		acquired: make(chan acquired, 1024),
	}
	cfg := fleet.Config{
		Name:        "sim",
		ManagerID:   "sim",
		Provider:    r.cloud.provider(),
		Schedule:    sched,
		Limits:      o.Limits,
		Provisioner: r.cloud,
		Clock:       r.clk,
		Logger:      simLogger(r.clk),
	}
	if o.Provider.APIRate > 0 {
		cfg.APIRate, cfg.APIBurst = o.Provider.APIRate, max(o.Provider.APIBurst, 1)
	}
	f, err := fleet.New(cfg)
	if err != nil {
		return nil, err
	}
	r.f = f
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	r.done = make(chan error, 1)
	go func() { r.done <- f.Run(ctx) }()
	r.settleFleet()
	return r, nil
}

// stop ends the fleet's Run and the Acquire goroutines still waiting.
func (r *runtimeFleet) stop() error {
	r.cancel()
	select {
	case err := <-r.done:
		if r.err == nil && err != nil {
			r.err = fmt.Errorf("fleet: %w", err)
		}
	case <-time.After(settleTimeout):
		if r.err == nil {
			r.err = fmt.Errorf("fleet did not stop within %s of wall time", settleTimeout)
		}
	}
	for r.finished < r.started {
		select {
		case <-r.acquired:
			r.finished++
		case <-time.After(settleTimeout):
			return r.err
		}
	}
	return r.err
}

// settleFleet waits until the fleet has nothing to do but wait for the
// clock, and every Acquire goroutine either reported or waits in the fleet
// for an instance; the jobs whose Acquire returned start meanwhile.
func (r *runtimeFleet) settleFleet() {
	var deadline time.Time
	for {
		r.collect()
		if r.f.Settled() && r.started-r.finished == r.f.Gauges().Waiting {
			break
		}
		if r.timer == nil {
			r.timer = time.NewTimer(time.Millisecond)
		} else {
			r.timer.Reset(time.Millisecond)
		}
		select {
		case <-r.f.Changed():
		case a := <-r.acquired:
			r.start(a)
		case <-r.timer.C: // a fallback: every change signals
			if deadline.IsZero() {
				deadline = time.Now().Add(settleTimeout)
			} else if time.Now().After(deadline) {
				r.fail(fmt.Errorf("fleet did not settle within %s of wall time at %s", settleTimeout, r.w.now))
				return
			}
		}
		r.timer.Stop()
	}
	target := r.f.Gauges().IdleTarget
	r.maxTarget = max(r.maxTarget, target)
	r.targetRises += max(target-r.lastTarget, 0)
	r.lastTarget = target
}

func (r *runtimeFleet) fail(err error) {
	if r.err == nil {
		r.err = err
	}
	r.w.end = r.w.now // ends the run
}

// collect starts the jobs whose Acquire returned.
func (r *runtimeFleet) collect() {
	for {
		select {
		case a := <-r.acquired:
			r.start(a)
		default:
			return
		}
	}
}

// start starts the job whose Acquire returned a.
func (r *runtimeFleet) start(a acquired) {
	r.finished++
	r.cloud.mu.Lock()
	r.w.waitingJobs--
	r.cloud.mu.Unlock()
	if a.err != nil {
		r.fail(fmt.Errorf("acquire for job %d: %w", a.job, a.err))
		return
	}
	r.cloud.mu.Lock()
	defer r.cloud.mu.Unlock()
	v := r.cloud.vms[a.lease.ID()]
	if v == nil || v.state != vmIdle {
		r.fail(fmt.Errorf("job %d got instance %s, which is not an idle VM", a.job, a.lease.ID()))
		return
	}
	r.leases[v] = a.lease
	r.w.startJob(v, a.job)
}

// next implements timed: the fleet's next timer.
func (r *runtimeFleet) next() (time.Time, bool) { return r.clk.Next() }

// fire implements timed: the fleet's clock moves to t, running its timers
// one at a time with the fleet settled after each, so that goroutines
// woken at one instant (boots ending, a pass due) cannot race: two runs
// of one seed make the same calls.
func (r *runtimeFleet) fire(t time.Time) {
	for r.clk.Step(t) && r.err == nil {
		r.settleFleet()
	}
	r.clk.AdvanceTo(t)
	r.settleFleet()
}

func (r *runtimeFleet) tick(now time.Time) {
	w := r.w
	for w.canRun() && w.hasPending() && r.err == nil {
		idle := r.f.Available() > 0
		res, _, ok := r.f.Reserve()
		if !ok {
			break // nothing promised: no job request
		}
		if !idle {
			r.onDemand++
		}
		r.cloud.mu.Lock() // the fleet's goroutines may be calling the provider
		j := w.takeJob()
		w.waitingJobs++
		r.cloud.mu.Unlock()
		r.started++
		if idle {
			// An idle instance was promised: Acquire returns at once.
			l, err := res.Acquire(context.Background())
			r.acquired <- acquired{job: j, lease: l, err: err}
		} else {
			go func() {
				l, err := res.Acquire(context.Background())
				r.acquired <- acquired{job: j, lease: l, err: err}
			}()
		}
		// One job at a time, as GitLab answers one request at a time: the
		// scaler's pass runs in between (deterministically), and waiters
		// queue in the order their jobs came.
		r.settleFleet()
	}
}

func (r *runtimeFleet) booted(*vm, time.Time) {}

func (r *runtimeFleet) jobEnded(v *vm, now time.Time) {
	l := r.leases[v]
	delete(r.leases, v)
	if v.uses >= r.w.o.MaxUses {
		r.w.setState(v, vmDeleting) // Release deletes it; billed until the provider is done
	} else {
		r.w.backToIdle(v)
	}
	l.Release(fleet.JobSucceeded)
	r.settleFleet() // before the world moves on: the fleet may call the provider
}

func (r *runtimeFleet) wake(time.Time) {}

// settle implements controller: the fleet settles after the instant's
// events.
func (r *runtimeFleet) settle(time.Time) { r.settleFleet() }

func (r *runtimeFleet) polls() bool { return false } // the provider counts its own calls

func (r *runtimeFleet) assumptions() []string {
	a := []string{
		"the production fleet.Fleet runs on a fleettest.Clock with a simulated provider: its scaler, reservations, waiters, list cadence and API budget are the runtime's",
		fmt.Sprintf("the provider gives connect info %s; calls counted at the provider: create, delete, list, connect_info", connectText(r.w.o.Provider.Connect)),
		"the manager reserves before each job request and takes a job while Fleet.Reserve promises an instance, again at once after a job came; GitLab answers at once; empty polls are not modelled",
		"a provisioner waits for the boot to end exactly (a real one polls SSH, about a second late)",
	}
	if r.w.o.Policy == PolicyPredictive {
		a = append(a, r.w.o.Predictive.describe(r.w.o.CheckInterval))
	}
	return a
}

func connectText(mode string) string {
	switch mode {
	case ConnectInList:
		return "in its list for running instances (a list must show each boot)"
	case ConnectByCall:
		return "by one ConnectInfo call per instance once a list shows it running"
	}
	return "with Create (providers.Launcher): the provisioner waits for the boot, no list needed"
}

// simLogger discards the fleet's logs unless MAYFLY_SIM_LOG is set (then
// debug logs go to stderr, stamped with the simulated time).
func simLogger(clk *fleettest.Clock) *slog.Logger {
	if os.Getenv("MAYFLY_SIM_LOG") == "" {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug, ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
		if len(groups) == 0 && a.Key == slog.TimeKey {
			return slog.Time(slog.TimeKey, clk.Now())
		}
		return a
	}}))
}
