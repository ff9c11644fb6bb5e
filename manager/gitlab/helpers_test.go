package gitlab

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fakeClock is a Clock whose Sleep returns at once, advancing Now.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	sleeps []time.Duration
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
}

func (f *fakeClock) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *fakeClock) Sleep(ctx context.Context, d time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sleeps = append(f.sleeps, d)
	f.now = f.now.Add(d)
	return nil
}

func (f *fakeClock) Advance(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.now = f.now.Add(d)
}

func (f *fakeClock) Sleeps() []time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Duration(nil), f.sleeps...)
}

// recorded is one request a test server saw.
type recorded struct {
	Method string
	Path   string
	Header http.Header
	Body   []byte
}

// reply is what a scripted handler answers.
type reply struct {
	status int
	header map[string]string
	body   string
}

// scriptServer answers requests with fn and records them.
type scriptServer struct {
	*httptest.Server
	mu   sync.Mutex
	reqs []recorded
}

func newScriptServer(t *testing.T, fn func(n int, r recorded) reply) *scriptServer {
	t.Helper()
	s := &scriptServer{}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		rec := recorded{Method: r.Method, Path: r.URL.Path, Header: r.Header.Clone(), Body: b}
		s.mu.Lock()
		n := len(s.reqs)
		s.reqs = append(s.reqs, rec)
		s.mu.Unlock()
		rep := fn(n, rec)
		for k, v := range rep.header {
			w.Header().Set(k, v)
		}
		if rep.status == 0 {
			rep.status = http.StatusOK
		}
		w.WriteHeader(rep.status)
		_, _ = io.WriteString(w, rep.body)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *scriptServer) requests() []recorded {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]recorded(nil), s.reqs...)
}

// newTestClient returns a client for url with a fake clock and no jitter.
func newTestClient(t *testing.T, url string, mod func(*Config)) (*Client, *fakeClock) {
	t.Helper()
	clk := newFakeClock()
	cfg := Config{
		URL:     url,
		Version: "test",
		Info:    testInfo(),
		Clock:   clk,
		Backoff: Backoff{NoJitter: true},
		Logger:  slog.New(slog.DiscardHandler),
	}
	if mod != nil {
		mod(&cfg)
	}
	c, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(c.CloseIdleConnections)
	return c, clk
}

func testInfo() runnerapi.VersionInfo {
	return runnerapi.VersionInfo{
		Name: "mayfly", Version: "test", Platform: "linux", Architecture: "amd64",
		Executor: "ssh", Shell: "bash",
		Features: runnerapi.FeaturesInfo{Variables: true, TraceReset: true, TraceChecksum: true, TraceSize: true, Cancelable: true, ReturnExitCode: true},
	}
}

// gitlabTrace is a coordinator-like trace endpoint: it stores the trace as
// GitLab does (416 with Range 0-size on a gap, 202 with Range 0-size
// otherwise) and records updates. Hooks may override answers.
type gitlabTrace struct {
	*httptest.Server
	mu      sync.Mutex
	trace   []byte
	ranges  []string
	puts    []runnerapi.UpdateJobRequest
	onPatch func(n int, start int, body []byte) *reply // nil result: default handling
	onPut   func(n int, req runnerapi.UpdateJobRequest) reply
}

func newGitlabTrace(t *testing.T) *gitlabTrace {
	t.Helper()
	g := &gitlabTrace{}
	g.Server = httptest.NewServer(http.HandlerFunc(g.serve))
	t.Cleanup(g.Close)
	return g
}

func (g *gitlabTrace) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	g.mu.Lock()
	var rep reply
	switch {
	case r.Method == http.MethodPatch && strings.HasSuffix(r.URL.Path, "/trace"):
		cr := r.Header.Get("Content-Range")
		g.ranges = append(g.ranges, cr)
		startS, _, _ := strings.Cut(cr, "-")
		start, err := strconv.Atoi(startS)
		var hook *reply
		if g.onPatch != nil && err == nil {
			hook = g.onPatch(len(g.ranges)-1, start, body)
		}
		switch {
		case err != nil:
			rep = reply{status: http.StatusBadRequest}
		case hook != nil:
			rep = *hook
		case start > len(g.trace):
			rep = reply{status: http.StatusRequestedRangeNotSatisfiable,
				header: map[string]string{"Range": "0-" + strconv.Itoa(len(g.trace))}}
		default:
			g.trace = append(g.trace[:start], body...)
			rep = reply{status: http.StatusAccepted,
				header: map[string]string{"Range": "0-" + strconv.Itoa(len(g.trace))}}
		}
	case r.Method == http.MethodPut:
		var req runnerapi.UpdateJobRequest
		if err := json.Unmarshal(body, &req); err != nil {
			rep = reply{status: http.StatusBadRequest}
			break
		}
		g.puts = append(g.puts, req)
		rep = reply{status: http.StatusOK}
		if g.onPut != nil {
			rep = g.onPut(len(g.puts)-1, req)
		}
	default:
		rep = reply{status: http.StatusNotFound}
	}
	g.mu.Unlock()
	for k, v := range rep.header {
		w.Header().Set(k, v)
	}
	w.WriteHeader(rep.status)
}

func (g *gitlabTrace) snapshot() (trace []byte, ranges []string, puts []runnerapi.UpdateJobRequest) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]byte(nil), g.trace...), append([]string(nil), g.ranges...), append([]runnerapi.UpdateJobRequest(nil), g.puts...)
}

// waitFor polls cond for up to 5 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
