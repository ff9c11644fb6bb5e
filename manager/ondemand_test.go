package manager_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager"
	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/manager/localfleet"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// bootingFleet promises every job an instance "expected in 30s", and hands
// one out only once boot is closed, as a fleet taking jobs on demand does.
type bootingFleet struct {
	local    *localfleet.Fleet
	boot     chan struct{}
	canceled atomic.Int64 // reservations given back
	waiting  atomic.Int64 // Acquire calls blocked on boot
}

func (f *bootingFleet) Reserve() (manager.Reservation, time.Duration, bool) {
	return &bootingReservation{f: f}, 30 * time.Second, true
}

type bootingReservation struct{ f *bootingFleet }

func (r *bootingReservation) Cancel() { r.f.canceled.Add(1) }

func (r *bootingReservation) Acquire(ctx context.Context) (manager.Lease, error) {
	r.f.waiting.Add(1)
	defer r.f.waiting.Add(-1)
	select {
	case <-r.f.boot:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	res, _, ok := r.f.local.Reserve()
	if !ok {
		return nil, errors.New("no local instance")
	}
	return res.Acquire(ctx)
}

// A job taken on demand says in its trace that it waits for a VM, runs
// once the VM is there, and is counted.
func TestOnDemandJobWaitsForItsVM(t *testing.T) {
	bf := &bootingFleet{boot: make(chan struct{})}
	e := newEnvFleet(t, []coordinator.JobSpec{{Name: "build", Script: []string{"echo built"}}}, nil,
		func(l *localfleet.Fleet) manager.Fleet { bf.local = l; return bf })
	e.waitStatus("build", "running")
	waitFor(t, "the job to wait for its VM", func() bool { return bf.waiting.Load() == 1 })
	close(bf.boot)
	j := e.job("build")
	tr := traceOf(t, j)
	if j.Status != "success" {
		t.Fatalf("job = %s %s, want success; trace:\n%s", j.Status, j.FailureReason, tr)
	}
	wait := strings.Index(tr, "Waiting for a VM: none was idle, one is expected in about 30s")
	got := strings.Index(tr, "Got VM local-")
	out := strings.Index(tr, "\nbuilt\n")
	if wait < 0 || got < wait || out < got {
		t.Errorf("trace should say it waits, then which VM it got, then run the script; trace:\n%s", tr)
	}
	if n := counterSum(t, e.reg, "mayfly_jobs_on_demand_total"); n != 1 {
		t.Errorf("mayfly_jobs_on_demand_total = %v, want 1", n)
	}
}

// A job canceled in GitLab while it waits for its VM ends canceled at
// once, and no instance is taken for it.
func TestOnDemandJobCanceledWhileWaiting(t *testing.T) {
	bf := &bootingFleet{boot: make(chan struct{})}
	e := newEnvFleet(t, []coordinator.JobSpec{{Name: "build", Script: []string{"echo built"}}}, nil,
		func(l *localfleet.Fleet) manager.Fleet { bf.local = l; return bf })
	e.waitStatus("build", "running")
	waitFor(t, "the job to wait for its VM", func() bool { return bf.waiting.Load() == 1 })
	if _, err := e.srv.Cancel(e.srv.Jobs()[0].ID); err != nil {
		t.Fatal(err)
	}
	j := e.job("build")
	if j.Status != "canceled" {
		t.Errorf("job = %s %s, want canceled", j.Status, j.FailureReason)
	}
	waitFor(t, "the wait to end", func() bool { return bf.waiting.Load() == 0 })
	if len(e.fleet.Leased()) != 0 || len(e.fleet.Deleted()) != 0 {
		t.Errorf("an instance was taken for a canceled job: leased %v deleted %v", e.fleet.Leased(), e.fleet.Deleted())
	}
	if n := counterSum(t, e.reg, "mayfly_runner_system_failures_total"); n != 0 {
		t.Errorf("a cancel counted as %v system failures", n)
	}
}

// Aborting the manager while a job waits for its VM fails the job as the
// runner's fault.
func TestOnDemandJobAbortedWhileWaiting(t *testing.T) {
	bf := &bootingFleet{boot: make(chan struct{})}
	e := newEnvFleet(t, []coordinator.JobSpec{{Name: "build", Script: []string{"echo built"}}}, nil,
		func(l *localfleet.Fleet) manager.Fleet { bf.local = l; return bf })
	e.waitStatus("build", "running")
	waitFor(t, "the job to wait for its VM", func() bool { return bf.waiting.Load() == 1 })
	e.m.Abort()
	j := e.job("build")
	if j.Status != "failed" || j.FailureReason != runnerapi.FailureRunnerSystemFailure {
		t.Errorf("job = %s %s, want failed runner_system_failure", j.Status, j.FailureReason)
	}
}

// An empty job request gives the reservation back.
func TestEmptyRequestCancelsReservation(t *testing.T) {
	bf := &bootingFleet{boot: make(chan struct{})}
	newEnvFleet(t, nil, nil, func(l *localfleet.Fleet) manager.Fleet { bf.local = l; return bf })
	waitFor(t, "a few empty polls", func() bool { return bf.canceled.Load() >= 3 })
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
