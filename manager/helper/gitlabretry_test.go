package helper

import (
	"bytes"
	"cmp"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// answer is what the scripted GitLab does with one request: a status
// (with Retry-After when after is set), or cut the connection unanswered.
type answer struct {
	status int
	after  string
	cut    bool
}

// scriptedGitLab answers each request by script(elapsed since the first
// request, request number from 1) and records when each came.
type scriptedGitLab struct {
	mu     sync.Mutex
	first  time.Time
	times  []time.Time
	script func(elapsed time.Duration, n int) answer
	ok     func(w http.ResponseWriter) // the success answer
}

func (g *scriptedGitLab) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	io.Copy(io.Discard, r.Body)
	g.mu.Lock()
	now := time.Now()
	if g.first.IsZero() {
		g.first = now
	}
	g.times = append(g.times, now)
	a := g.script(now.Sub(g.first), len(g.times))
	g.mu.Unlock()
	switch {
	case a.cut:
		conn, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			conn.Close()
		}
	case a.status == 0:
		g.ok(w)
	default:
		if a.after != "" {
			w.Header().Set("Retry-After", a.after)
		}
		w.WriteHeader(a.status)
	}
}

func (g *scriptedGitLab) calls() []time.Time {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]time.Time(nil), g.times...)
}

// TestGitLabRetry: the artifact upload and download ride out GitLab being
// away (503s, cut connections) for their time budget with capped
// exponential backoff, well past gitlab-runner's 6 tries; Retry-After sets
// the pause within the budget; 403 and 413 fail at once, other answers
// after 3 tries; at the budget's end the transfer fails, saying so.
func TestGitLabRetry(t *testing.T) {
	const budget = 600 * time.Millisecond
	cases := []struct {
		name     string
		download bool
		script   func(elapsed time.Duration, n int) answer
		wantCode int
		// minCalls/maxCalls bound the requests made; minTook the run's length.
		minCalls, maxCalls int
		minTook, maxTook   time.Duration
		wantOut            []string
		budget             time.Duration // 0: budget
	}{
		// Nine failures: more than gitlab-runner's 6 tries on 503. Counted,
		// not timed, so that slow requests on a loaded machine (-race) do
		// not change the number of calls.
		{name: "503 for a while, then 201", script: func(_ time.Duration, n int) answer {
			if n <= 9 {
				return answer{status: 503}
			}
			return answer{}
		}, budget: 10 * time.Second, minCalls: 10, maxCalls: 10, wantOut: []string{"201 Created", "retrying in"}},
		{name: "connections cut for a while, then 201", script: func(_ time.Duration, n int) answer {
			return answer{cut: n <= 9}
		}, budget: 10 * time.Second, minCalls: 10, maxCalls: 10, wantOut: []string{"201 Created"}},
		{name: "502, 504, 429, 500 in turn, then 201", script: func(_ time.Duration, n int) answer {
			if n <= 8 {
				return answer{status: []int{502, 504, 429, 500}[n%4]}
			}
			return answer{}
		}, minCalls: 9, maxCalls: 9, wantOut: []string{"201 Created"}},
		{name: "503 past the budget", script: func(time.Duration, int) answer { return answer{status: 503} },
			wantCode: 1, minCalls: 4, minTook: budget, maxTook: budget + time.Second,
			wantOut: []string{`ERROR: uploading artifacts as "archive" to coordinator... 503 Service Unavailable (gave up after `}},
		{name: "Retry-After sets the pause", script: func(_ time.Duration, n int) answer {
			if n == 1 {
				return answer{status: 503, after: "1"}
			}
			return answer{}
		}, budget: 5 * time.Second, minCalls: 2, maxCalls: 2, minTook: 900 * time.Millisecond, wantOut: []string{"retrying in 1s"}},
		{name: "a Retry-After beyond the budget is cut to it", script: func(time.Duration, int) answer { return answer{status: 429, after: "3600"} },
			wantCode: 1, minCalls: 2, maxCalls: 2, minTook: budget, maxTook: budget + time.Second, wantOut: []string{"429 Too Many Requests (gave up after 2 attempts"}},
		{name: "403 fails at once", script: func(time.Duration, int) answer { return answer{status: 403} },
			wantCode: 1, minCalls: 1, maxCalls: 1, wantOut: []string{"403 Forbidden"}},
		{name: "413 fails at once", script: func(time.Duration, int) answer { return answer{status: 413} },
			wantCode: 1, minCalls: 1, maxCalls: 1, wantOut: []string{"413 Request Entity Too Large"}},
		{name: "other answers: 3 tries", script: func(time.Duration, int) answer { return answer{status: 400} },
			wantCode: 1, minCalls: 3, maxCalls: 3, wantOut: []string{"400 Bad Request"}},
		{name: "download: 503 for a while, then the archive", download: true, script: func(_ time.Duration, n int) answer {
			if n <= 9 {
				return answer{status: 503}
			}
			return answer{}
		}, budget: 10 * time.Second, minCalls: 10, maxCalls: 10, wantOut: []string{"Downloading artifacts from coordinator... ok"}},
		{name: "download: connections cut for a while", download: true, script: func(_ time.Duration, n int) answer {
			return answer{cut: n <= 9}
		}, budget: 10 * time.Second, minCalls: 10, maxCalls: 10, wantOut: []string{"Downloading artifacts from coordinator... ok"}},
		{name: "download: 502 past the budget", download: true, script: func(time.Duration, int) answer { return answer{status: 502} },
			wantCode: 1, minCalls: 4, minTook: budget, maxTook: budget + time.Second, wantOut: []string{"502 Bad Gateway (gave up after "}},
		{name: "download: 403 fails at once", download: true, script: func(time.Duration, int) answer { return answer{status: 403} },
			wantCode: 1, minCalls: 1, maxCalls: 1, wantOut: []string{"forbidden"}},
	}
	archive := zipBytes(t, map[string]string{"out/result.txt": "42"})
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := &scriptedGitLab{script: tc.script, ok: func(w http.ResponseWriter) {
				if tc.download {
					w.Write(archive)
					return
				}
				w.WriteHeader(http.StatusCreated)
			}}
			srv := httptest.NewServer(g)
			defer srv.Close()
			dir := t.TempDir()
			writeFiles(t, dir, map[string]string{"bin/app": "app"})
			t.Chdir(dir)
			var out bytes.Buffer
			c := &cli{stdout: &out, stderr: &out, env: func(k string) string { return map[string]string{"CI_JOB_TOKEN": "jt"}[k] },
				retryWait: 5 * time.Millisecond, retryMaxWait: 40 * time.Millisecond, retryBudget: cmp.Or(tc.budget, budget)}
			args := []string{"artifacts-uploader", "--url", srv.URL, "--id", "7", "--path", "bin/"}
			if tc.download {
				args = []string{"artifacts-downloader", "--url", srv.URL, "--id", "7"}
			}
			start := time.Now()
			code := run(context.Background(), c, args)
			took := time.Since(start)
			calls := g.calls()
			if code != tc.wantCode {
				t.Errorf("exit %d, want %d:\n%s", code, tc.wantCode, out.String())
			}
			if len(calls) < tc.minCalls || (tc.maxCalls > 0 && len(calls) > tc.maxCalls) {
				t.Errorf("%d requests, want %d to %d:\n%s", len(calls), tc.minCalls, tc.maxCalls, out.String())
			}
			if took < tc.minTook || (tc.maxTook > 0 && took > tc.maxTook) {
				t.Errorf("took %v, want %v to %v", took, tc.minTook, tc.maxTook)
			}
			for _, w := range tc.wantOut {
				if !strings.Contains(out.String(), w) {
					t.Errorf("output lacks %q:\n%s", w, out.String())
				}
			}
			// Pauses never exceed the cap but for a Retry-After.
			for i := 1; i < len(calls); i++ {
				if gap := calls[i].Sub(calls[i-1]); gap > 500*time.Millisecond && !strings.Contains(tc.name, "Retry-After") {
					t.Errorf("pause %d was %v, want at most about the 40ms cap", i, gap)
				}
			}
		})
	}
}

// TestRetryAfter reads both forms of the header.
func TestRetryAfter(t *testing.T) {
	now := time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		v    string
		want time.Duration
	}{
		{"", 0}, {"7", 7 * time.Second}, {"-3", 0}, {"soon", 0},
		{now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second},
		{now.Add(-time.Minute).Format(http.TimeFormat), 0},
	} {
		if got := retryAfter(tc.v, now); got != tc.want {
			t.Errorf("retryAfter(%q) = %v, want %v", tc.v, got, tc.want)
		}
	}
}
