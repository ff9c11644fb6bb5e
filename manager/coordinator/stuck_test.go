package coordinator

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// TestDropStuckJobs: a running job no runner call touched for the stuck-job
// timeout fails with stuck_or_timeout_failure, as GitLab's
// DropRunningService fails it; accepted trace patches and running
// heartbeats touch it only once its updated_at is older than the touch
// granularity (GitLab's needs_touch?: 15 minutes of the 1 hour).
func TestDropStuckJobs(t *testing.T) {
	type step struct {
		at time.Duration // since the job was taken
		do string        // patch, patch416, running, cancel, or "" (only sweep)
		// want is the job's status after this step's sweep.
		want string
	}
	cases := []struct {
		name           string
		timeout, touch time.Duration
		steps          []step
	}{
		{name: "never touched: dropped just past the hour", steps: []step{
			{at: time.Hour, want: StatusRunning},
			{at: time.Hour + time.Second, want: StatusFailed},
		}},
		{name: "calls within the touch granularity move nothing", steps: []step{
			{at: 5 * time.Minute, do: "patch", want: StatusRunning},
			{at: 15 * time.Minute, do: "running", want: StatusRunning},
			{at: time.Hour + time.Second, want: StatusFailed},
		}},
		{name: "a patch past the granularity touches", steps: []step{
			{at: 20 * time.Minute, do: "patch", want: StatusRunning},
			{at: time.Hour + time.Second, want: StatusRunning},
			{at: 80 * time.Minute, want: StatusRunning},
			{at: 80*time.Minute + time.Second, want: StatusFailed},
		}},
		{name: "a running heartbeat past the granularity touches", steps: []step{
			{at: 16 * time.Minute, do: "running", want: StatusRunning},
			{at: 75 * time.Minute, want: StatusRunning},
			{at: 76*time.Minute + time.Second, want: StatusFailed},
		}},
		{name: "a refused patch (416) touches nothing", steps: []step{
			{at: 20 * time.Minute, do: "patch416", want: StatusRunning},
			{at: time.Hour + time.Second, want: StatusFailed},
		}},
		{name: "regular calls keep a live job for hours", steps: []step{
			{at: 16 * time.Minute, do: "patch", want: StatusRunning},
			{at: 32 * time.Minute, do: "running", want: StatusRunning},
			{at: 48 * time.Minute, do: "patch", want: StatusRunning},
			{at: 64 * time.Minute, do: "running", want: StatusRunning},
			{at: 80 * time.Minute, do: "patch", want: StatusRunning},
			{at: 140 * time.Minute, want: StatusRunning},
			{at: 141 * time.Minute, want: StatusFailed},
		}},
		{name: "a canceling job is not running: left to the cancel", steps: []step{
			{at: time.Minute, do: "cancel", want: StatusCanceling},
			{at: 10 * time.Hour, want: StatusCanceling},
		}},
		{name: "off", timeout: -1, steps: []step{
			{at: 100 * time.Hour, want: StatusRunning},
		}},
		{name: "short timeout, default granularity a quarter", timeout: 2 * time.Minute, steps: []step{
			{at: 20 * time.Second, do: "patch", want: StatusRunning}, // within 30 s: no touch
			{at: 2*time.Minute + time.Second, want: StatusFailed},
		}},
		{name: "short timeout, every call touches", timeout: time.Minute, touch: -1, steps: []step{
			{at: 10 * time.Second, do: "patch", want: StatusRunning},
			{at: 20 * time.Second, do: "running", want: StatusRunning},
			{at: 80 * time.Second, want: StatusRunning},
			{at: 81 * time.Second, want: StatusFailed},
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, Config{StuckJobTimeout: tc.timeout, StuckJobTouch: tc.touch})
			e.project("p", "", jobs("a")...)
			tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
			j := e.mustJob(tok)
			start := e.clock.Now()
			trace := []byte{}
			for _, st := range tc.steps {
				e.clock.Advance(start.Add(st.at).Sub(e.clock.Now()))
				switch st.do {
				case "patch":
					line := []byte("line\n")
					if r := e.patch(j.ID, j.Token, len(trace), line); r.status != http.StatusAccepted {
						t.Fatalf("patch at %v: %d", st.at, r.status)
					}
					trace = append(trace, line...)
				case "patch416":
					if r := e.patch(j.ID, j.Token, len(trace)+7, []byte("x")); r.status != http.StatusRequestedRangeNotSatisfiable {
						t.Fatalf("patch at a wrong offset at %v: %d, want 416", st.at, r.status)
					}
				case "running":
					if r := e.update(j.ID, runnerapi.UpdateJobRequest{Token: j.Token, State: runnerapi.StateRunning}); r.status != http.StatusOK {
						t.Fatalf("running update at %v: %d", st.at, r.status)
					}
				case "cancel":
					if _, err := e.s.Cancel(j.ID); err != nil {
						t.Fatal(err)
					}
				}
				dropped := e.s.DropStuckJobs()
				if got := e.status(j.ID); got != st.want {
					t.Fatalf("at %v after %q: status %s, want %s", st.at, st.do, got, st.want)
				}
				if wantDropped := st.want == StatusFailed; wantDropped != slices.Contains(dropped, j.ID) {
					t.Fatalf("at %v: DropStuckJobs returned %v, want job %d dropped: %v", st.at, dropped, j.ID, wantDropped)
				}
			}
			rec, err := e.s.Job(j.ID)
			if err != nil {
				t.Fatal(err)
			}
			if rec.Status != StatusFailed {
				return
			}
			if rec.FailureReason != runnerapi.FailureStuckOrTimeout {
				t.Errorf("failure reason %q, want %q", rec.FailureReason, runnerapi.FailureStuckOrTimeout)
			}
			if !strings.HasPrefix(string(rec.Trace), string(trace)) || !strings.Contains(string(rec.Trace[len(trace):]), "ERROR: Job failed (stuck_or_timeout_failure): "+StuckJobMessage) {
				t.Errorf("trace %q: want the runner's bytes, then the stuck line", rec.Trace)
			}
			// The runner learns it from its next call, as from GitLab.
			r := e.patch(j.ID, j.Token, len(rec.Trace), []byte("late\n"))
			if r.status != http.StatusForbidden || r.header.Get(runnerapi.HeaderJobStatus) != StatusFailed {
				t.Errorf("patch after the drop: %d, Job-Status %q; want 403 failed", r.status, r.header.Get(runnerapi.HeaderJobStatus))
			}
			if again := e.s.DropStuckJobs(); len(again) != 0 {
				t.Errorf("a second sweep dropped %v again", again)
			}
		})
	}
}

// TestStuckJobConfig: a touch granularity not shorter than the timeout is
// refused, naming the field.
func TestStuckJobConfig(t *testing.T) {
	_, err := New(Config{StuckJobTimeout: time.Minute, StuckJobTouch: time.Minute})
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Field != "StuckJobTouch" {
		t.Fatalf("New: %v, want a FieldError on StuckJobTouch", err)
	}
	for _, tc := range []struct {
		cfg                   Config
		timeout, touch, sweep time.Duration
	}{
		{Config{}, time.Hour, 15 * time.Minute, 5 * time.Minute},
		{Config{StuckJobTimeout: 2 * time.Minute}, 2 * time.Minute, 30 * time.Second, 10 * time.Second},
		{Config{StuckJobTimeout: time.Minute, StuckJobTouch: -1}, time.Minute, 0, 5 * time.Second},
		{Config{StuckJobTimeout: -1}, 0, 0, 0},
		{Config{StuckJobTimeout: 10 * time.Hour}, 10 * time.Hour, 150 * time.Minute, 5 * time.Minute},
	} {
		timeout, touch, sweep := stuckSettings(tc.cfg)
		if timeout != tc.timeout || touch != tc.touch || sweep != tc.sweep {
			t.Errorf("%+v: %v %v %v, want %v %v %v", tc.cfg, timeout, touch, sweep, tc.timeout, tc.touch, tc.sweep)
		}
	}
}

// TestServeSweepsStuckJobs: Serve runs the clean-up on the real clock and
// stops it with the server.
func TestServeSweepsStuckJobs(t *testing.T) {
	s, err := New(Config{StuckJobTimeout: 300 * time.Millisecond, StuckJobTouch: -1, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateProject(ProjectSpec{Name: "p", Pipelines: []PipelineSpec{{Jobs: jobs("a")}}}); err != nil {
		t.Fatal(err)
	}
	r, err := s.RegisterRunner(RunnerOptions{RegistrationToken: s.RegistrationToken(), RunUntagged: true})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- s.Serve(ctx, ln) }()
	defer func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	res, err := http.Post("http://"+ln.Addr().String()+"/api/v4/jobs/request", "application/json", strings.NewReader(`{"token":"`+r.Token+`"}`))
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusCreated {
		t.Fatalf("job request: %d", res.StatusCode)
	}
	wctx, wcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer wcancel()
	rec, err := s.WaitJob(wctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	if rec.Status != StatusFailed || rec.FailureReason != runnerapi.FailureStuckOrTimeout {
		t.Fatalf("job %s %q, want failed %q", rec.Status, rec.FailureReason, runnerapi.FailureStuckOrTimeout)
	}
}
