package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

func TestAdminAPI(t *testing.T) {
	e := newEnv(t, Config{})
	yamlBody := []byte("projects:\n  - name: web\n    pipelines:\n      - jobs:\n          - {name: a, script: [x]}\n          - {name: b, script: [y]}\n")
	steps := []struct {
		name, method, path, ctype, body string
		want                            int
		check                           func(t *testing.T, r resp)
	}{
		{"info", "GET", "/-/mayfly/info", "", "", 200, func(t *testing.T, r resp) {
			if !strings.Contains(string(r.body), `"registration_token":"reg-token-xyz"`) {
				t.Errorf("info %s", r.body)
			}
		}},
		{"create group json", "POST", "/-/mayfly/groups", "application/json", `{"path":"acme","registration_token":"g-tok"}`, 201, nil},
		{"create project json", "POST", "/-/mayfly/projects", "application/json", `{"name":"api","group":"acme"}`, 201, func(t *testing.T, r resp) {
			var p ProjectRecord
			if err := json.Unmarshal(r.body, &p); err != nil || p.ID != 1 || p.Path != "acme/api" || p.RegistrationToken == "" {
				t.Errorf("project %s: %v", r.body, err)
			}
		}},
		{"create project bad field", "POST", "/-/mayfly/projects", "application/json", `{"name":"x","colour":"red"}`, 400, func(t *testing.T, r resp) {
			if !strings.Contains(string(r.body), "colour") {
				t.Errorf("error body %s does not name the field", r.body)
			}
		}},
		{"enqueue into project", "POST", "/-/mayfly/projects/1/pipelines", "application/json", `{"jobs":[{"name":"one","script":["x"]}]}`, 201, nil},
		{"enqueue into missing project", "POST", "/-/mayfly/projects/9/pipelines", "application/json", `{"jobs":[{"name":"one","script":["x"]}]}`, 404, nil},
		{"enqueue bad pipeline", "POST", "/-/mayfly/projects/1/pipelines", "application/json", `{"jobs":[{"name":"one"}]}`, 400, func(t *testing.T, r resp) {
			if !strings.Contains(string(r.body), "pipeline.jobs[0].script") {
				t.Errorf("error body %s", r.body)
			}
		}},
		{"apply yaml file", "POST", "/-/mayfly/pipelines", "application/yaml", string(yamlBody), 201, func(t *testing.T, r resp) {
			var res ApplyResult
			if err := json.Unmarshal(r.body, &res); err != nil || len(res.Pipelines) != 1 || len(res.Pipelines[0].JobIDs) != 2 {
				t.Errorf("apply %s: %v", r.body, err)
			}
		}},
		{"list jobs", "GET", "/-/mayfly/jobs", "", "", 200, func(t *testing.T, r resp) {
			var js []JobRecord
			if err := json.Unmarshal(r.body, &js); err != nil || len(js) != 3 || js[2].Name != "b" || js[2].Status != "pending" {
				t.Errorf("jobs %s: %v", r.body, err)
			}
		}},
		{"list running jobs", "GET", "/-/mayfly/jobs?status=running", "", "", 200, func(t *testing.T, r resp) {
			if string(r.body) != "[]" {
				t.Errorf("running jobs %s", r.body)
			}
		}},
		{"cancel job", "POST", "/-/mayfly/jobs/3/cancel", "", "", 200, func(t *testing.T, r resp) {
			if !strings.Contains(string(r.body), `"status":"canceled"`) {
				t.Errorf("cancel %s", r.body)
			}
		}},
		{"cancel again", "POST", "/-/mayfly/jobs/3/cancel", "", "", 409, nil},
		{"missing job", "GET", "/-/mayfly/jobs/42", "", "", 404, nil},
		{"bad id", "GET", "/-/mayfly/jobs/x", "", "", 400, nil},
		{"unknown admin path", "GET", "/-/mayfly/nothing", "", "", 404, nil},
		{"runners empty", "GET", "/-/mayfly/runners", "", "", 200, func(t *testing.T, r resp) {
			if string(r.body) != "[]" {
				t.Errorf("runners %s", r.body)
			}
		}},
		{"wait times out", "POST", "/-/mayfly/wait?timeout=50ms", "", "", 504, nil},
		{"wait bad timeout", "POST", "/-/mayfly/wait?timeout=1h", "", "", 400, nil},
	}
	for _, st := range steps {
		h := map[string]string{}
		if st.ctype != "" {
			h["Content-Type"] = st.ctype
		}
		r := e.do(st.method, st.path, h, []byte(st.body))
		if r.status != st.want {
			t.Errorf("%s: status %d, want %d (%s)", st.name, r.status, st.want, r.body)
			continue
		}
		if st.check != nil {
			st.check(t, r)
		}
	}

	// Run job 1 and read it back through the admin API.
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	j := e.mustJob(tok)
	trace := []byte("hello \x1b[0;m\n")
	e.finish(j, runnerapi.StateFailed, trace)
	r := e.do("GET", "/-/mayfly/jobs/1/trace", nil, nil)
	if r.status != 200 || string(r.body) != string(trace) || r.header.Get("Job-Status") != "failed" {
		t.Errorf("raw trace: %d %q %q", r.status, r.body, r.header.Get("Job-Status"))
	}
	r = e.do("GET", "/-/mayfly/jobs/1", nil, nil)
	var got struct {
		JobRecord
		Trace string `json:"trace"`
	}
	if err := json.Unmarshal(r.body, &got); err != nil || got.Trace != string(trace) || got.FailureReason != "script_failure" || got.ExitCode != 1 || len(got.Updates) != 1 {
		t.Errorf("job json %s: %v", r.body, err)
	}
	if r := e.do("POST", "/-/mayfly/runners/1/pause", nil, nil); r.status != 204 || !e.s.Runners()[0].Paused {
		t.Errorf("pause: %d", r.status)
	}
	// Finish the rest, then wait returns 200.
	e.do("POST", "/-/mayfly/runners/1/resume", nil, nil)
	e.finish(e.mustJob(tok), runnerapi.StateSuccess, nil) // job 2; job 3 was canceled
	if r := e.do("POST", "/-/mayfly/wait?timeout=5s", nil, nil); r.status != 200 {
		t.Errorf("wait after all finished: %d %s", r.status, r.body)
	}
}

func TestAdminToken(t *testing.T) {
	e := newEnv(t, Config{AdminToken: "sekret"})
	if r := e.do("GET", "/-/mayfly/info", nil, nil); r.status != 401 {
		t.Errorf("no token: %d", r.status)
	}
	if r := e.do("GET", "/-/mayfly/info", map[string]string{"Private-Token": "sekret"}, nil); r.status != 200 {
		t.Errorf("with token: %d", r.status)
	}
	// The runner API does not need it.
	if r := e.doJSON("POST", "/api/v4/runners/verify", runnerapi.RunnerTokenRequest{Token: "x"}); r.status != 403 {
		t.Errorf("runner API: %d", r.status)
	}
}

func TestWaitAllFinished(t *testing.T) {
	e := newEnv(t, Config{})
	if err := e.s.WaitAllFinished(context.Background()); err != nil {
		t.Fatalf("no jobs: %v", err)
	}
	e.project("p", "", jobs("a", "b")...)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := e.s.WaitAllFinished(ctx); !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "[1 2]") {
		t.Fatalf("unfinished: %v", err)
	}
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		done <- e.s.WaitAllFinished(ctx)
	}()
	j1, j2 := e.mustJob(tok), e.mustJob(tok)
	e.finish(j1, runnerapi.StateSuccess, []byte("a"))
	select {
	case err := <-done:
		t.Fatalf("returned with job 2 running: %v", err)
	case <-time.After(20 * time.Millisecond):
	}
	e.clock.Advance(time.Minute)
	e.finish(j2, runnerapi.StateFailed, []byte("b"))
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	rec, err := e.s.WaitJob(context.Background(), 2)
	if err != nil || rec.Status != StatusFailed || rec.FinishedAt.Sub(rec.StartedAt) != time.Minute || rec.CreatedAt.IsZero() || rec.QueuedAt.IsZero() {
		t.Errorf("job 2 %+v: %v", rec, err)
	}
	if _, err := e.s.WaitJob(context.Background(), 7); !errors.Is(err, ErrNotFound) {
		t.Errorf("wait unknown job: %v", err)
	}
}

// Serve answers on a real listener and shuts down gracefully, ending held long polls.
func TestServeGracefulShutdown(t *testing.T) {
	s, err := New(Config{RegistrationToken: testRegToken, LongPoll: MaxLongPoll, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
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
	base := "http://" + ln.Addr().String()
	rec, err := s.RegisterRunner(RunnerOptions{RegistrationToken: testRegToken, RunUntagged: true})
	if err != nil {
		t.Fatal(err)
	}
	post := func(lastUpdate string) (*http.Response, error) {
		b, _ := json.Marshal(runnerapi.JobRequest{Token: rec.Token, LastUpdate: lastUpdate})
		return http.Post(base+"/api/v4/jobs/request", "application/json", strings.NewReader(string(b)))
	}
	res, err := post("")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	v := res.Header.Get(runnerapi.HeaderLastUpdate)
	held := make(chan int, 1)
	go func() {
		res, err := post(v) // held for up to 5 minutes
		if err != nil {
			held <- -1
			return
		}
		res.Body.Close()
		held <- res.StatusCode
	}()
	for deadline := time.Now().Add(20 * time.Second); s.held.Load() == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("job request never held")
		}
	}
	cancel()
	select {
	case code := <-held:
		if code != 204 {
			t.Errorf("held poll on shutdown: %d, want 204", code)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("held long poll not released by shutdown")
	}
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Serve did not return")
	}
	if _, err := post(""); err == nil {
		t.Error("server still answering after shutdown")
	}
}
