package manager_test

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager"
	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/manager/localfleet"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// noVMFleet promises instances but, while failing is set, none comes.
type noVMFleet struct {
	manager.Fleet
	failing atomic.Bool
}

func (f *noVMFleet) Reserve() (manager.Reservation, time.Duration, bool) {
	if !f.failing.Load() {
		return f.Fleet.Reserve()
	}
	return noVMReservation{}, 0, true
}

type noVMReservation struct{}

func (noVMReservation) Cancel() {}
func (noVMReservation) Acquire(ctx context.Context) (manager.Lease, error) {
	return nil, errors.New("injected: the VM never came")
}

// A job whose end was decided before any stage started (here: its VM never
// came), and whose manager was replaced while GitLab refused the final
// update, keeps that end: the next manager reports it and runs nothing
// (the chaos suite found a resumed job running its stages after its
// runner_system_failure was in the trace, then reporting that failure).
func TestResumeKeepsAResultDecidedBeforeTheStages(t *testing.T) {
	marks := filepath.Join(t.TempDir(), "ran")
	nf := &noVMFleet{}
	nf.failing.Store(true)
	e := newResumeEnv(t, []coordinator.JobSpec{{Name: "job", Script: []string{"echo ran >" + marks}}}, nil,
		func(l *localfleet.Fleet) manager.Fleet { nf.Fleet = l; return nf },
		coordinator.Fault{Endpoint: coordinator.FaultUpdateJob, Status: http.StatusServiceUnavailable, Times: 4})
	deadline := time.Now().Add(30 * time.Second)
	for e.srv.FaultsServed() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the final update never came")
		}
		time.Sleep(10 * time.Millisecond)
	}
	nf.failing.Store(false)
	e.restart()
	j := e.job("job")
	checkResumed(t, e, j, "failed", runnerapi.FailureRunnerSystemFailure, "ERROR: Job failed: (system failure) no VM for the job: injected: the VM never came")
	if n := strings.Count(string(j.Trace), "ERROR: Job failed"); n != 1 {
		t.Errorf("%d summary lines in the trace, want 1:\n%s", n, j.Trace)
	}
	if _, err := os.Stat(marks); err == nil {
		t.Errorf("the script ran after the job's end was decided:\n%s", j.Trace)
	}
}
