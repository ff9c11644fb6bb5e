package manager_test

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// A manager that died in the middle of a journal write leaves a torn last
// line: the next one reads the journal without it, finishes the job with
// its true result, and nothing of the torn record reaches the trace. A
// line damaged before the end (not a kill: the disk) fails the job
// cleanly, saying why after what GitLab has of its trace (from the trace
// copy beside the journal), and its VM is deleted.
func TestResumeFromATornJournal(t *testing.T) {
	for _, tt := range []struct {
		name           string
		tamper         func(t *testing.T, journal []byte) []byte
		status, reason string
		want           string
	}{
		{"torn last line", func(t *testing.T, b []byte) []byte {
			return append(b, `{"k":"text","text":"half-writ`...)
		}, "failed", runnerapi.FailureScriptFailure, "exit code 4"},
		{"damaged line before the end", func(t *testing.T, b []byte) []byte {
			lines := strings.SplitAfter(string(b), "\n")
			for i, l := range lines {
				if strings.HasPrefix(l, `{"k":"lease"`) && i+2 < len(lines) {
					lines[i+1] = "{\"k\":\x00garbage\n"
					return []byte(strings.Join(lines, ""))
				}
			}
			t.Fatalf("no lease record followed by two lines in the journal:\n%s", b)
			return nil
		}, "failed", runnerapi.FailureRunnerSystemFailure, "record of the job is damaged"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := newResumeEnv(t, []coordinator.JobSpec{{Name: "long",
				Script: []string{"echo started", "sleep 2", "echo finished", "exit 4"}}}, nil, nil)
			e.waitTrace("long", "\nstarted\n")
			e.m.HandOver()
			<-e.done
			journals, err := filepath.Glob(filepath.Join(e.opts.StateDir, "jobs", "*.journal"))
			if err != nil || len(journals) != 1 {
				t.Fatalf("journals %v, %v; want one", journals, err)
			}
			b, err := os.ReadFile(journals[0])
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(journals[0], tt.tamper(t, b), 0o600); err != nil {
				t.Fatal(err)
			}
			e.restart()
			j := e.job("long")
			checkResumed(t, e, j, tt.status, tt.reason, "started\n", tt.want)
			if strings.Contains(string(j.Trace), "half-writ") {
				t.Errorf("the torn record reached the trace:\n%s", j.Trace)
			}
			// The journal and its trace copy go once GitLab has the end.
			var left []string
			for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
				if left, _ = filepath.Glob(filepath.Join(e.opts.StateDir, "jobs", "*")); len(left) == 0 {
					break
				}
			}
			if len(left) > 0 {
				t.Errorf("files left in the journal dir after the job ended: %v", left)
			}
		})
	}
}

// A job whose VM went while no manager ran fails cleanly: the line saying
// why follows what GitLab has of its trace (written again from the trace
// copy, as its stages' output went with the VM), and the trace matches its
// checksum. A job whose result was decided before the VM went keeps it.
func TestResumeWhenTheVMIsGone(t *testing.T) {
	for _, tt := range []struct {
		name           string
		script         []string
		faults         []coordinator.Fault
		wait           string
		status, reason string
		want           []string
	}{
		{"while the script runs", []string{"echo started", "sleep 600"}, nil, "\nstarted\n",
			"failed", runnerapi.FailureRunnerSystemFailure, []string{"started\n", "ERROR: Job failed: (system failure) the runner manager restarted and the job's VM local-"}},
		{"after the result", []string{"echo started", "exit 6"},
			[]coordinator.Fault{{Endpoint: coordinator.FaultUpdateJob, Status: http.StatusServiceUnavailable, Times: 3}}, "exit code 6",
			"failed", runnerapi.FailureScriptFailure, []string{"started\n", "ERROR: Job failed: exit code 6"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := newResumeEnv(t, []coordinator.JobSpec{{Name: "job", Script: tt.script}}, nil, nil, tt.faults...)
			e.waitTrace("job", tt.wait)
			e.m.HandOver()
			<-e.done
			leased := e.fleet.Leased()
			if len(leased) != 1 {
				t.Fatalf("leased %v, want the job's instance", leased)
			}
			e.fleet.Lose(leased[0])
			e.restart()
			j := e.job("job")
			checkResumed(t, e, j, tt.status, tt.reason, tt.want...)
			if n := strings.Count(string(j.Trace), "ERROR: Job failed"); n != 1 {
				t.Errorf("%d summary lines in the trace, want 1:\n%s", n, j.Trace)
			}
		})
	}
}
