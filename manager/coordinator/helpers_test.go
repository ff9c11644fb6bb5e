package coordinator

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// fakeClock is an injectable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// env is a coordinator behind an httptest server on 127.0.0.1.
type env struct {
	t     testing.TB
	s     *Server
	ts    *httptest.Server
	clock *fakeClock
}

const testRegToken = "reg-token-xyz"

func newEnv(t testing.TB, cfg Config) *env {
	t.Helper()
	clock := &fakeClock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
	if cfg.Now == nil {
		cfg.Now = clock.Now
	}
	if cfg.RegistrationToken == "" {
		cfg.RegistrationToken = testRegToken
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ts := httptest.NewServer(s)
	t.Cleanup(ts.Close)
	return &env{t: t, s: s, ts: ts, clock: clock}
}

type resp struct {
	status int
	header http.Header
	body   []byte
}

func (e *env) do(method, path string, header map[string]string, body []byte) resp {
	e.t.Helper()
	req, err := http.NewRequest(method, e.ts.URL+path, bytes.NewReader(body))
	if err != nil {
		e.t.Fatalf("new request: %v", err)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	res, err := e.ts.Client().Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		e.t.Fatalf("%s %s: read body: %v", method, path, err)
	}
	return resp{status: res.StatusCode, header: res.Header, body: b}
}

func (e *env) doJSON(method, path string, v any) resp {
	e.t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		e.t.Fatalf("marshal: %v", err)
	}
	return e.do(method, path, map[string]string{"Content-Type": "application/json"}, b)
}

// register registers a runner over HTTP and returns its token.
func (e *env) register(req runnerapi.RegisterRunnerRequest) string {
	e.t.Helper()
	if req.TagList == "" {
		req.RunUntagged = true
	}
	if !req.Active && req.Paused == nil {
		req.Active = true
	}
	r := e.doJSON("POST", "/api/v4/runners", req)
	if r.status != http.StatusCreated {
		e.t.Fatalf("register: status %d body %s", r.status, r.body)
	}
	var out runnerapi.RegisterRunnerResponse
	if err := json.Unmarshal(r.body, &out); err != nil || out.Token == "" {
		e.t.Fatalf("register: body %s: %v", r.body, err)
	}
	return out.Token
}

// requestJob asks for a job; it returns the reply and the decoded job on 201.
func (e *env) requestJob(token, lastUpdate string) (resp, *runnerapi.JobResponse) {
	e.t.Helper()
	r := e.doJSON("POST", "/api/v4/jobs/request", runnerapi.JobRequest{Token: token, LastUpdate: lastUpdate})
	if r.status != http.StatusCreated {
		return r, nil
	}
	var j runnerapi.JobResponse
	if err := json.Unmarshal(r.body, &j); err != nil {
		e.t.Fatalf("decode job: %v\n%s", err, r.body)
	}
	return r, &j
}

// mustJob asks for a job and fails unless one comes back.
func (e *env) mustJob(token string) *runnerapi.JobResponse {
	e.t.Helper()
	r, j := e.requestJob(token, "")
	if j == nil {
		e.t.Fatalf("job request: status %d, want 201 (%s)", r.status, r.body)
	}
	return j
}

func (e *env) patch(id int64, token string, start int, data []byte) resp {
	e.t.Helper()
	h := map[string]string{"Content-Type": "text/plain", runnerapi.HeaderJobToken: token}
	if start >= 0 {
		h[runnerapi.HeaderContentRange] = fmt.Sprintf("%d-%d", start, start+len(data)-1)
	}
	return e.do("PATCH", "/api/v4/jobs/"+strconv.FormatInt(id, 10)+"/trace", h, data)
}

func (e *env) update(id int64, req runnerapi.UpdateJobRequest) resp {
	e.t.Helper()
	return e.doJSON("PUT", "/api/v4/jobs/"+strconv.FormatInt(id, 10), req)
}

// finish uploads trace and sends a final update for job j.
func (e *env) finish(j *runnerapi.JobResponse, state string, trace []byte) {
	e.t.Helper()
	if len(trace) > 0 {
		if r := e.patch(j.ID, j.Token, 0, trace); r.status != http.StatusAccepted {
			e.t.Fatalf("patch job %d: %d", j.ID, r.status)
		}
	}
	req := runnerapi.UpdateJobRequest{Token: j.Token, State: state,
		Output: runnerapi.JobTraceOutput{Checksum: runnerapi.TraceChecksum(trace), Bytesize: len(trace)}}
	if state == runnerapi.StateFailed {
		req.FailureReason, req.ExitCode = runnerapi.FailureScriptFailure, 1
	}
	if r := e.update(j.ID, req); r.status != http.StatusOK {
		e.t.Fatalf("update job %d: %d %s", j.ID, r.status, r.body)
	}
}

// project creates a project and one pipeline whose jobs are named by names.
func (e *env) project(name, group string, jobs ...JobSpec) ProjectRecord {
	e.t.Helper()
	ps := ProjectSpec{Name: name, Group: group}
	if len(jobs) > 0 {
		ps.Pipelines = []PipelineSpec{{Jobs: jobs}}
	}
	rec, err := e.s.CreateProject(ps)
	if err != nil {
		e.t.Fatalf("create project %s: %v", name, err)
	}
	return rec
}

func jobs(names ...string) []JobSpec {
	out := make([]JobSpec, len(names))
	for i, n := range names {
		out[i] = JobSpec{Name: n, Script: []string{"echo " + n}}
	}
	return out
}

func (e *env) status(id int64) string {
	e.t.Helper()
	rec, err := e.s.Job(id)
	if err != nil {
		e.t.Fatalf("job %d: %v", id, err)
	}
	return rec.Status
}
