package sim_test

import (
	"context"
	"log/slog"
	"math"
	"slices"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/fleet"
	"github.com/mayfly-ci/mayfly/fleet/fleettest"
	"github.com/mayfly-ci/mayfly/fleet/sim"
	"github.com/mayfly-ci/mayfly/fleet/sim/traces"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/fake"
	"github.com/mayfly-ci/mayfly/schedule"
)

// Tolerances of the cross-check (see TestSimulatorMatchesRuntime).
const (
	crossHours = 0.05 // idle and total VM-hours, relative
	crossCalls = 0.03 // provider calls per call, relative
	crossP90   = time.Second
)

// TestSimulatorMatchesRuntime cross-checks the simulator with the runtime
// fleet driven the plain way, on the first day of the twotz shape (about
// 4 300 jobs) under the predictive policy: the same fleet.Fleet, once with
// the simulator's provider, provisioner and driver, once with the fake
// provider (providers/fake, ConnectInfo by call) and a manager loop written
// here, on a fake clock. Boots take 45 s and deletions 20 s in both. The
// jobs started must be the same, the p90 within 1 s, the idle and total
// VM-hours within 5 % and each kind of provider call within 3 %.
func TestSimulatorMatchesRuntime(t *testing.T) {
	sh, err := traces.Lookup("twotz")
	if err != nil {
		t.Fatal(err)
	}
	all := sh.Generate(1)
	var jobs []sim.Job
	for _, j := range all {
		if j.Arrival.Before(traces.Epoch.Add(24 * time.Hour)) {
			jobs = append(jobs, j)
		}
	}
	const boot, del = 45 * time.Second, 20 * time.Second
	sched := schedule.Schedule{Default: schedule.Policy{IdleCount: 1000, IdleTime: 10 * time.Minute, Predictive: true, PredictiveQuantile: 0.92}}
	limits := fleet.Limits{MaxUses: 1, MaxGrowthRate: 100, CheckInterval: 3 * time.Second, OnDemandWithin: 90 * time.Second}

	r, err := sim.Run(sim.Options{
		Policy: sim.PolicyMayfly, Jobs: jobs, Schedule: sched, Limits: limits,
		Provider: sim.Provider{Boot: sim.Boot{Kind: "fixed", Median: boot}, DeleteTime: del, Connect: sim.ConnectByCall},
	})
	if err != nil {
		t.Fatal(err)
	}
	h := runHarness(t, jobs, sched, limits, boot, del)

	t.Logf("simulator: %d started, p90 %.1f s, idle %.1f VM-h, total %.1f VM-h, calls %v", r.Started, r.LatencyP90, r.IdleVMHours, r.TotalVMHours, r.APICallsByCall)
	t.Logf("runtime:   %d started, p90 %.1f s, idle %.1f VM-h, total %.1f VM-h, calls %v", h.started, h.p90.Seconds(), h.idle, h.total, h.calls)
	if r.Started != h.started || r.Started != len(jobs) {
		t.Errorf("jobs started: simulator %d, runtime %d, of %d", r.Started, h.started, len(jobs))
	}
	if d := time.Duration(math.Abs(r.LatencyP90-h.p90.Seconds()) * float64(time.Second)); d > crossP90 {
		t.Errorf("p90: simulator %.1f s, runtime %v", r.LatencyP90, h.p90)
	}
	near := func(what string, a, b, tol float64) {
		if math.Abs(a-b) > tol*max(math.Abs(a), math.Abs(b), 1) {
			t.Errorf("%s: simulator %.2f, runtime %.2f, beyond %.0f %%", what, a, b, 100*tol)
		}
	}
	near("idle VM-hours", r.IdleVMHours, h.idle, crossHours)
	near("total VM-hours", r.TotalVMHours, h.total, crossHours)
	for _, call := range []string{fleet.OpCreate, fleet.OpDelete, fleet.OpList, fleet.OpConnectInfo} {
		near(call+" calls", float64(r.APICallsByCall[call]), float64(h.calls[call]), crossCalls)
	}
}

// harnessResult is what the plain runtime loop measured.
type harnessResult struct {
	started     int
	p90         time.Duration
	idle, total float64 // VM-hours
	calls       map[string]int
}

// runHarness runs the jobs through a fleet.Fleet on the fake provider: a
// runner polling every check interval reserves, takes a job and acquires
// (in a goroutine, as the manager does), one job at a time; a job releases
// its instance when its duration is over.
func runHarness(t *testing.T, jobs []sim.Job, sched schedule.Schedule, limits fleet.Limits, boot, del time.Duration) harnessResult {
	t.Helper()
	start := jobs[0].Arrival.Add(-10 * time.Minute) // the simulator's warm-up
	clk := fleettest.NewClock(start)
	fk, err := fake.New(fake.Options{Now: clk.Now, BootDelay: boot, DeleteDelay: del})
	if err != nil {
		t.Fatal(err)
	}
	f, err := fleet.New(fleet.Config{Name: "sim", ManagerID: "sim", Provider: fk, Schedule: sched, Limits: limits, Clock: clk, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()

	type result struct {
		job   int
		lease *fleet.Lease
	}
	results := make(chan result, len(jobs))
	type running struct {
		end   time.Time
		lease *fleet.Lease
	}
	var (
		queue            []int
		run              []running
		lat              []time.Duration
		started, handed  int
		idleNS, totalNS  float64
		nextJob          int
		last             = start
		nextTick         = start
		deadline         = time.Now().Add(5 * time.Minute)
		waitingAcquires  int
		lastIdle, lastVM int
	)
	settle := func() {
		for !(f.Settled() && waitingAcquires == f.Gauges().Waiting) {
			select {
			case r := <-results:
				waitingAcquires--
				lat = append(lat, clk.Now().Sub(jobs[r.job].Arrival))
				run = append(run, running{clk.Now().Add(jobs[r.job].Duration), r.lease})
				started++
			case <-f.Changed():
			case <-time.After(time.Millisecond):
			}
			if time.Now().After(deadline) {
				t.Fatalf("the runtime loop did not finish within 5 min of wall time")
			}
		}
		st := f.Status()
		lastIdle = st.Counts[fleet.StateIdle.String()]
		lastVM = 0
		for _, in := range fk.Instances() {
			if in.HasLabels(f.Labels()) && in.State != providers.StateGone {
				lastVM++
			}
		}
	}
	settle()
	for handed < len(jobs) || len(run) > 0 {
		// The next instant: an arrival, a job's end, a poll or a timer.
		next := nextTick
		if nextJob < len(jobs) && jobs[nextJob].Arrival.Before(next) {
			next = jobs[nextJob].Arrival
		}
		for _, r := range run {
			if r.end.Before(next) {
				next = r.end
			}
		}
		if tm, ok := clk.Next(); ok && tm.Before(next) {
			next = tm
		}
		dt := next.Sub(last).Hours()
		idleNS += float64(lastIdle) * dt
		totalNS += float64(lastVM) * dt
		last = next
		clk.AdvanceTo(next)
		settle()
		for nextJob < len(jobs) && !jobs[nextJob].Arrival.After(next) {
			queue = append(queue, nextJob)
			nextJob++
		}
		kept := run[:0]
		for _, r := range run {
			if r.end.After(next) {
				kept = append(kept, r)
				continue
			}
			r.lease.Release(fleet.JobSucceeded)
			settle()
		}
		run = kept
		if !next.Before(nextTick) {
			nextTick = nextTick.Add(limits.CheckInterval)
			for len(queue) > 0 {
				res, _, ok := f.Reserve()
				if !ok {
					break
				}
				j := queue[0]
				queue = queue[1:]
				handed++
				waitingAcquires++
				go func() {
					l, err := res.Acquire(ctx)
					if err != nil {
						t.Errorf("acquire: %v", err)
						return
					}
					results <- result{j, l}
				}()
				settle()
			}
		}
	}
	slices.Sort(lat)
	calls := f.Status().APICalls
	return harnessResult{started: started, p90: lat[(len(lat)*9+9)/10-1], idle: idleNS, total: totalNS, calls: calls}
}
