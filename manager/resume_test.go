package manager_test

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager"
	"github.com/mayfly-ci/mayfly/manager/config"
	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/manager/localfleet"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// newResumeEnv is newEnvConfig with a state directory for job journals.
func newResumeEnv(t *testing.T, jobs []coordinator.JobSpec, edit func(*config.Runner), wrap func(*localfleet.Fleet) manager.Fleet, faults ...coordinator.Fault) *env {
	t.Helper()
	state := filepath.Join(t.TempDir(), "state")
	return newEnvConfig(t, jobs, func(c *config.Config) { c.Concurrent = 2 },
		func(o *manager.Options) { o.StateDir = state }, edit, wrap, faults...)
}

// waitTrace waits until the stored trace of the named job contains s.
func (e *env) waitTrace(name, s string) {
	e.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		for _, j := range e.srv.Jobs() {
			if j.Name == name && strings.Contains(string(j.Trace), s) {
				return
			}
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("job %s: %q not in the trace within 30s", name, s)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// checkResumed checks a resumed job's record: its status, that its trace
// holds want in order and that the stored trace matches its checksum (the
// trace written again is the same bytes), and that its instance is gone.
func checkResumed(t *testing.T, e *env, j coordinator.JobRecord, status, reason string, want ...string) {
	t.Helper()
	if j.Status != status || j.FailureReason != reason {
		t.Errorf("job %s: %s %q, want %s %q\n%s", j.Name, j.Status, j.FailureReason, status, reason, j.Trace)
	}
	rest := string(j.Trace)
	for _, w := range want {
		i := strings.Index(rest, w)
		if i < 0 {
			t.Fatalf("job %s: trace lacks %q (in order):\n%s", j.Name, w, j.Trace)
		}
		rest = rest[i+len(w):]
	}
	if j.TraceVerified == nil || !*j.TraceVerified {
		t.Errorf("job %s: the stored trace does not match the reported checksum and size:\n%q", j.Name, j.Trace)
	}
	if strings.Count(string(j.Trace), "Running with mayfly") != 1 {
		t.Errorf("job %s: the header is in the trace more or less than once:\n%s", j.Name, j.Trace)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(e.fleet.Leased()) > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if l := e.fleet.Leased(); len(l) > 0 {
		t.Errorf("instances still leased after the job: %v", l)
	}
}

// A manager that hands over (or dies) while a stage runs is replaced by one
// that finds the stage, follows it to its end and reports the true result;
// the stage ran once, and after_script too.
func TestResumeWhileAStageRuns(t *testing.T) {
	for _, tt := range []struct {
		name, script, status, reason string
	}{
		{"success", "exit 0", "success", ""},
		{"failure", "exit 5", "failed", runnerapi.FailureScriptFailure},
	} {
		t.Run(tt.name, func(t *testing.T) {
			marks := filepath.Join(t.TempDir(), "ran")
			e := newResumeEnv(t, []coordinator.JobSpec{{Name: "long",
				Script:      []string{"echo started >>" + marks, "echo started", "sleep 2", "echo finished", tt.script},
				AfterScript: []string{"echo after-$CI_JOB_STATUS"}}}, nil, nil)
			e.waitTrace("long", "\nstarted\n")
			e.restart()
			j := e.job("long")
			checkResumed(t, e, j, tt.status, tt.reason, "started\n", "finished\n", "after-"+map[string]string{"success": "success", "failure": "failed"}[tt.name])
			if n := strings.Count(readFile(t, marks), "started"); n != 1 {
				t.Errorf("the script ran %d times, want once", n)
			}
		})
	}
}

// A manager replaced while the job waits for its VM: nothing ran yet, so
// the next one takes a VM for it and runs it.
func TestResumeWhileWaitingForAVM(t *testing.T) {
	bf := &bootingFleet{boot: make(chan struct{})}
	e := newResumeEnv(t, []coordinator.JobSpec{{Name: "build", Script: []string{"echo built"}}}, nil,
		func(l *localfleet.Fleet) manager.Fleet { bf.local = l; return bf })
	e.waitTrace("build", "Waiting for a VM")
	e.restart()
	close(bf.boot)
	j := e.job("build")
	checkResumed(t, e, j, "success", "", "Waiting for a VM", "built\n", "Job succeeded")
}

// A manager replaced while its final update is refused (GitLab answers 5xx)
// leaves the result to the next one, which reports it.
func TestResumeDuringTheFinalUpdate(t *testing.T) {
	e := newResumeEnv(t, []coordinator.JobSpec{{Name: "quick", Script: []string{"echo done", "exit 3"}}}, nil, nil,
		coordinator.Fault{Endpoint: coordinator.FaultUpdateJob, Status: http.StatusServiceUnavailable, Times: 4})
	deadline := time.Now().Add(30 * time.Second)
	for e.srv.FaultsServed() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the final update never came")
		}
		time.Sleep(10 * time.Millisecond)
	}
	e.restart()
	j := e.job("quick")
	checkResumed(t, e, j, "failed", runnerapi.FailureScriptFailure, "done\n", "exit code 3")
}

// A job GitLab canceled while no manager ran is stopped by the next one.
func TestResumedJobCanceledMeanwhile(t *testing.T) {
	e := newResumeEnv(t, []coordinator.JobSpec{{Name: "long", Script: []string{"echo started", "sleep 600"}}}, nil, nil)
	e.waitTrace("long", "\nstarted\n")
	e.m.HandOver()
	<-e.done
	var id int64
	for _, j := range e.srv.Jobs() {
		id = j.ID
	}
	if _, err := e.srv.Cancel(id); err != nil {
		t.Fatal(err)
	}
	e.restart()
	start := time.Now()
	j := e.job("long")
	if j.Status != "canceled" {
		t.Errorf("job %s, want canceled\n%s", j.Status, j.Trace)
	}
	if d := time.Since(start); d > 30*time.Second {
		t.Errorf("the canceled job took %v to stop", d)
	}
	if !strings.Contains(string(j.Trace), "started") {
		t.Errorf("trace lost its beginning:\n%s", j.Trace)
	}
}

// The runner's hard cap on job time counts from the job's first start,
// not from a restart.
func TestHardCapHoldsAcrossRestarts(t *testing.T) {
	e := newResumeEnv(t, []coordinator.JobSpec{{Name: "slow", Script: []string{"echo began-sleeping", "sleep 600"}}},
		func(r *config.Runner) { r.MaxJobTimeout = 3 * time.Second }, nil)
	e.waitTrace("slow", "\nbegan-sleeping")
	e.m.HandOver()
	<-e.done
	time.Sleep(3 * time.Second) // the cap passes while no manager runs
	e.restart()
	start := time.Now()
	j := e.job("slow")
	checkResumed(t, e, j, "failed", runnerapi.FailureJobExecutionTimeout, "\nbegan-sleeping\n", "execution took longer than 3s")
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("the job over its cap took %v after the restart to stop", d)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
