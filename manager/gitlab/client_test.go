package gitlab

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

func TestNormalizeURL(t *testing.T) {
	tests := []struct {
		in, want, errPart string
	}{
		{in: "https://gitlab.com", want: "https://gitlab.com/api/v4/"},
		{in: "https://gitlab.com/", want: "https://gitlab.com/api/v4/"},
		{in: "https://gitlab.com/ci", want: "https://gitlab.com/api/v4/"},
		{in: "https://gitlab.com/ci/", want: "https://gitlab.com/api/v4/"},
		{in: "https://gitlab.com///", want: "https://gitlab.com/api/v4/"},
		{in: "http://127.0.0.1:8080/gitlab/", want: "http://127.0.0.1:8080/gitlab/api/v4/"},
		{in: "http://host/gitlab/ci", want: "http://host/gitlab/api/v4/"},
		{in: "http://host/cix", want: "http://host/cix/api/v4/"},
		{in: "", errPart: "empty"},
		{in: "ftp://gitlab.com", errPart: "scheme"},
		{in: "gitlab.com", errPart: "scheme"},
		{in: "http://", errPart: "no host"},
		{in: "https://gitlab.com/?x=1", errPart: "query"},
		{in: "https://gitlab.com/%zz", errPart: "invalid"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := NormalizeURL(tt.in)
			if tt.errPart != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errPart) {
					t.Fatalf("NormalizeURL(%q) = %q, %v; want error with %q", tt.in, got, err, tt.errPart)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("NormalizeURL(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
			}
		})
	}
	if _, err := New(Config{URL: "ftp://x"}); err == nil {
		t.Fatal("New accepted an ftp URL")
	}
}

func TestShortTokenAndUserAgent(t *testing.T) {
	for tok, want := range map[string]string{"glrt-abcdefghij": "glrt-abc", "12345678": "1234", "ab": "a", "": ""} {
		if got := ShortToken(tok); got != want {
			t.Errorf("ShortToken(%q) = %q, want %q", tok, got, want)
		}
	}
	if ua := UserAgent("1.2.3", "main"); ua != "mayfly 1.2.3 (main; "+runtime.Version()+"; "+runtime.GOOS+"/"+runtime.GOARCH+")" {
		t.Errorf("UserAgent = %q", ua)
	}
}

const jobJSON = `{"id":42,"token":"jt-42","job_info":{"name":"build","stage":"test","project_id":1,"project_name":"demo"},` +
	`"steps":[{"name":"script","script":["echo hi"],"timeout":3600,"when":"on_success","allow_failure":false}],"image":null,"features":{"trace_sections":true}}`

func TestRequestJobOutcomes(t *testing.T) {
	jsonHdr := map[string]string{"Content-Type": "application/json"}
	tests := []struct {
		name       string
		rep        reply
		outcome    JobRequestOutcome
		wantErr    string
		payloadID  int64 // JobPayloadError.JobID, -1 when no JobPayloadError expected
		healthy    bool
		retryAfter time.Duration
	}{
		{name: "201 job", rep: reply{status: 201, header: jsonHdr, body: jobJSON}, outcome: JobReceived, payloadID: -1, healthy: true},
		{name: "201 charset", rep: reply{status: 201, header: map[string]string{"Content-Type": "application/json; charset=utf-8"}, body: jobJSON}, outcome: JobReceived, payloadID: -1, healthy: true},
		{name: "201 wrong content type", rep: reply{status: 201, header: map[string]string{"Content-Type": "text/html"}, body: jobJSON}, wantErr: "job 42: bad job payload: server should return application/json", payloadID: 42, healthy: true},
		{name: "201 type mismatch", rep: reply{status: 201, header: jsonHdr, body: `{"id":9,"token":"t","image":"alpine"}`}, wantErr: "job 9: bad job payload: decode", payloadID: 9, healthy: true},
		{name: "201 id as string", rep: reply{status: 201, header: jsonHdr, body: `{"id":"9","token":"t"}`}, wantErr: "bad job payload", payloadID: 0, healthy: true},
		{name: "201 no token", rep: reply{status: 201, header: jsonHdr, body: `{"id":5}`}, wantErr: "field token", payloadID: 5, healthy: true},
		{name: "201 not json", rep: reply{status: 201, header: jsonHdr, body: `<html>`}, wantErr: "bad job payload: decode", payloadID: 0, healthy: true},
		{name: "204", rep: reply{status: 204}, outcome: NoJob, payloadID: -1, healthy: true},
		{name: "403", rep: reply{status: 403}, outcome: RunnerForbidden, payloadID: -1, healthy: false},
		{name: "409", rep: reply{status: 409}, outcome: JobConflict, payloadID: -1, healthy: true},
		{name: "429 without reset", rep: reply{status: 429, header: map[string]string{"Retry-After": "7"}}, outcome: RateLimited, payloadID: -1, healthy: true, retryAfter: 7 * time.Second},
		{name: "429 bad reset", rep: reply{status: 429, header: map[string]string{"RateLimit-ResetTime": "soon"}}, outcome: RateLimited, payloadID: -1, healthy: true},
		{name: "500", rep: reply{status: 500}, wantErr: "unexpected status 500", payloadID: -1, healthy: true},
		{name: "422", rep: reply{status: 422}, wantErr: "unexpected status 422", payloadID: -1, healthy: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newScriptServer(t, func(int, recorded) reply { return tt.rep })
			c, _ := newTestClient(t, srv.URL, nil)
			res, err := c.RequestJob(context.Background(), "runner-token-1", RequestOptions{SystemID: "s_0123456789ab"})
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || res.Outcome != JobRequestFailed {
					t.Fatalf("RequestJob = %+v, %v; want failed with %q", res, err, tt.wantErr)
				}
				if strings.Contains(err.Error(), `"t"`) || strings.Contains(err.Error(), "jt-42") {
					t.Errorf("error leaks the job token: %v", err)
				}
			} else if err != nil || res.Outcome != tt.outcome {
				t.Fatalf("RequestJob = %+v, %v; want %v", res, err, tt.outcome)
			}
			var pe *JobPayloadError
			if errors.As(err, &pe) != (tt.payloadID >= 0) || (pe != nil && pe.JobID != tt.payloadID) {
				t.Errorf("JobPayloadError = %+v, want job id %d", pe, tt.payloadID)
			}
			if res.Healthy() != tt.healthy || res.RetryAfter != tt.retryAfter || res.StatusCode != tt.rep.status {
				t.Errorf("healthy=%v retryAfter=%v status=%d", res.Healthy(), res.RetryAfter, res.StatusCode)
			}
			if tt.outcome == JobReceived && (res.Job.ID != 42 || res.Job.Token != "jt-42" || res.Job.Steps[0].Script[0] != "echo hi") {
				t.Errorf("job = %+v", res.Job)
			}
			reqs := srv.requests()
			if len(reqs) != 1 {
				t.Fatalf("%d requests, want 1", len(reqs))
			}
			r := reqs[0]
			if r.Method != http.MethodPost || r.Path != "/api/v4/jobs/request" ||
				r.Header.Get("Accept") != "application/json" || r.Header.Get("Content-Type") != "application/json" {
				t.Errorf("request %s %s %v", r.Method, r.Path, r.Header)
			}
			var body runnerapi.JobRequest
			if err := json.Unmarshal(r.Body, &body); err != nil {
				t.Fatal(err)
			}
			if body.Token != "runner-token-1" || body.SystemID != "s_0123456789ab" || body.Info != testInfo() || body.LastUpdate != "" {
				t.Errorf("body = %+v", body)
			}
		})
	}
}

func TestLastUpdateRememberedPerToken(t *testing.T) {
	srv := newScriptServer(t, func(n int, r recorded) reply {
		switch n {
		case 0:
			return reply{status: 204, header: map[string]string{"X-GitLab-Last-Update": "lu-1"}}
		case 1:
			return reply{status: 403, header: map[string]string{"X-GitLab-Last-Update": "lu-2"}}
		default:
			return reply{status: 204}
		}
	})
	c, _ := newTestClient(t, srv.URL, nil)
	ctx := context.Background()
	for _, tok := range []string{"token-a-123", "token-a-123", "token-a-123", "token-b-456"} {
		if _, err := c.RequestJob(ctx, tok, RequestOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	var got []string
	for _, r := range srv.requests() {
		var body map[string]any
		_ = json.Unmarshal(r.Body, &body)
		lu, present := body["last_update"]
		if !present {
			lu = "<absent>"
		}
		got = append(got, lu.(string))
	}
	want := []string{"<absent>", "lu-1", "lu-2", "<absent>"}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("last_update sent = %v, want %v", got, want)
	}
	if c.LastUpdate("token-a-123") != "lu-2" {
		t.Errorf("LastUpdate = %q", c.LastUpdate("token-a-123"))
	}
}

func TestRateLimitResetTime(t *testing.T) {
	tests := []struct {
		name      string
		reset     func(now time.Time) string
		limited   int // how many 429s before a 204
		wantReqs  int
		outcome   JobRequestOutcome
		wantSleep time.Duration // first rate-limit wait
	}{
		{name: "waited out then job", reset: func(n time.Time) string { return n.Add(10 * time.Second).Format(time.RFC1123) }, limited: 1, wantReqs: 2, outcome: NoJob, wantSleep: 10 * time.Second},
		{name: "reset in the past", reset: func(n time.Time) string { return n.Add(-time.Minute).Format(time.RFC1123) }, limited: 2, wantReqs: 3, outcome: NoJob, wantSleep: 0},
		{name: "capped wait", reset: func(n time.Time) string { return n.Add(24 * time.Hour).Format(time.RFC1123) }, limited: 1, wantReqs: 2, outcome: NoJob, wantSleep: DefaultMaxRateLimitWait},
		{name: "five retries then give up", reset: func(n time.Time) string { return n.Add(time.Second).Format(time.RFC1123) }, limited: 100, wantReqs: 1 + MaxRateLimitRetries, outcome: RateLimited, wantSleep: time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var clk *fakeClock
			srv := newScriptServer(t, func(n int, r recorded) reply {
				if n < tt.limited {
					return reply{status: 429, header: map[string]string{"RateLimit-ResetTime": tt.reset(clk.Now())}}
				}
				return reply{status: 204}
			})
			var c *Client
			c, clk = newTestClient(t, srv.URL, nil)
			res, err := c.RequestJob(context.Background(), "runner-token-1", RequestOptions{})
			if err != nil || res.Outcome != tt.outcome {
				t.Fatalf("RequestJob = %+v, %v; want %v", res, err, tt.outcome)
			}
			if n := len(srv.requests()); n != tt.wantReqs {
				t.Errorf("%d requests, want %d", n, tt.wantReqs)
			}
			if s := clk.Sleeps(); len(s) == 0 || s[0] != tt.wantSleep {
				t.Errorf("sleeps = %v, want first %v", s, tt.wantSleep)
			}
		})
	}
}

func TestRateLimitWaitHonoursContext(t *testing.T) {
	srv := newScriptServer(t, func(int, recorded) reply {
		return reply{status: 429, header: map[string]string{"RateLimit-ResetTime": time.Now().Add(time.Minute).UTC().Format(time.RFC1123)}}
	})
	c, err := New(Config{URL: srv.URL, Logger: testLogger()}) // real clock
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = c.RequestJob(ctx, "runner-token-1", RequestOptions{})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want deadline exceeded", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("cancellation took %v", d)
	}
}

func TestBackoffGrowsAndResets(t *testing.T) {
	// 500 x6, 204, 500, then 204 for a second token.
	statuses := []int{500, 500, 500, 500, 500, 500, 204, 500}
	srv := newScriptServer(t, func(n int, r recorded) reply {
		if n < len(statuses) {
			return reply{status: statuses[n]}
		}
		return reply{status: 204}
	})
	c, clk := newTestClient(t, srv.URL, func(cfg *Config) {
		cfg.Backoff = Backoff{Max: 2 * time.Second, NoJitter: true}
	})
	ctx := context.Background()
	for range statuses {
		_, _ = c.RequestJob(ctx, "runner-token-1", RequestOptions{})
	}
	ms := time.Millisecond
	want := []time.Duration{100 * ms, 200 * ms, 400 * ms, 800 * ms, 1600 * ms, 2000 * ms, 100 * ms}
	if got := clk.Sleeps(); !equalDurations(got, want) {
		t.Fatalf("sleeps = %v, want %v", got, want)
	}
	if n := c.failureCount(runnerBackoffKey("POST", "jobs/request", "runner-token-1")); n != 1 {
		t.Errorf("failure count = %d, want 1", n)
	}
	// Another runner's backoff is its own.
	srv2 := newScriptServer(t, func(int, recorded) reply { return reply{status: 502} })
	c2, clk2 := newTestClient(t, srv2.URL, nil)
	_, _ = c2.RequestJob(ctx, "runner-token-1", RequestOptions{})
	_, _ = c2.RequestJob(ctx, "runner-token-1", RequestOptions{})
	_, _ = c2.RequestJob(ctx, "other-token-2", RequestOptions{})
	if got := clk2.Sleeps(); !equalDurations(got, []time.Duration{100 * ms, 200 * ms, 100 * ms}) {
		t.Fatalf("per-runner sleeps = %v", got)
	}
}

func TestBackoffDelay(t *testing.T) {
	b := Backoff{}.withDefaults()
	if b.Min != 100*time.Millisecond || b.Max != time.Minute || b.Factor != 2 || b.NoJitter {
		t.Fatalf("defaults = %+v", b)
	}
	tests := []struct {
		n    int
		rnd  float64
		want time.Duration
	}{
		{1, 0.7, 100 * time.Millisecond},
		{2, 0, 100 * time.Millisecond},
		{2, 1, 200 * time.Millisecond},
		{3, 0.5, 250 * time.Millisecond},
		{20, 1, time.Minute},
		{2000, 1, time.Minute},
		{20, 0, 100 * time.Millisecond},
	}
	for _, tt := range tests {
		if got := b.delay(tt.n, func() float64 { return tt.rnd }); got != tt.want {
			t.Errorf("delay(%d, rnd %v) = %v, want %v", tt.n, tt.rnd, got, tt.want)
		}
	}
	// Jitter stays within [Min, Min*2^(n-1)].
	for n := 1; n < 12; n++ {
		d := b.delay(n, nil2rand())
		hi := min(b.Min<<(n-1), b.Max)
		if d < b.Min || d > hi {
			t.Errorf("jittered delay(%d) = %v outside [%v, %v]", n, d, b.Min, hi)
		}
	}
}

func nil2rand() func() float64 {
	i := 0
	vals := []float64{0.1, 0.9, 0.33, 0.5, 0.999}
	return func() float64 { i++; return vals[i%len(vals)] }
}

func equalDurations(a, b []time.Duration) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestContextCancelStopsPromptly(t *testing.T) {
	t.Run("hanging server", func(t *testing.T) {
		release := make(chan struct{})
		srv := newScriptServer(t, func(int, recorded) reply {
			<-release
			return reply{status: 204}
		})
		defer close(release)
		c, _ := newTestClient(t, srv.URL, nil)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		start := time.Now()
		res, err := c.RequestJob(ctx, "runner-token-1", RequestOptions{})
		if err == nil || !errors.Is(err, context.DeadlineExceeded) || res.Outcome != JobRequestFailed {
			t.Fatalf("RequestJob = %+v, %v", res, err)
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Fatalf("took %v", d)
		}
	})
	t.Run("long backoff", func(t *testing.T) {
		srv := newScriptServer(t, func(int, recorded) reply { return reply{status: 503} })
		c, err := New(Config{URL: srv.URL, Backoff: Backoff{Min: time.Hour, NoJitter: true}, Logger: testLogger()})
		if err != nil {
			t.Fatal(err)
		}
		defer c.CloseIdleConnections()
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err = c.RequestJob(ctx, "runner-token-1", RequestOptions{})
		if err == nil || !strings.Contains(err.Error(), "503") {
			t.Fatalf("err = %v", err)
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Fatalf("backoff ignored ctx: took %v", d)
		}
	})
}

func TestRegister(t *testing.T) {
	tests := []struct {
		name    string
		rep     reply
		wantTok string
		wantErr string
		forbid  bool
	}{
		{name: "201", rep: reply{status: 201, header: map[string]string{"Content-Type": "application/json"}, body: `{"id":3,"token":"glrt-new","token_expires_at":"2030-01-01T00:00:00Z"}`}, wantTok: "glrt-new"},
		{name: "201 not json", rep: reply{status: 201, header: map[string]string{"Content-Type": "text/plain"}, body: `{"token":"x"}`}, wantErr: "application/json"},
		{name: "201 empty token", rep: reply{status: 201, header: map[string]string{"Content-Type": "application/json"}, body: `{"id":3}`}, wantErr: "empty token"},
		{name: "201 bad json", rep: reply{status: 201, header: map[string]string{"Content-Type": "application/json"}, body: `{"token":3}`}, wantErr: "decode"},
		{name: "403", rep: reply{status: 403}, wantErr: "check registration token", forbid: true},
		{name: "400", rep: reply{status: 400}, wantErr: "unexpected status 400"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newScriptServer(t, func(int, recorded) reply { return tt.rep })
			c, _ := newTestClient(t, srv.URL, nil)
			out, err := c.Register(context.Background(), runnerapi.RegisterRunnerRequest{Token: "reg-1", TagList: "a,b", Active: true})
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || errors.Is(err, ErrForbidden) != tt.forbid {
					t.Fatalf("Register = %+v, %v; want %q", out, err, tt.wantErr)
				}
				return
			}
			if err != nil || out.Token != tt.wantTok {
				t.Fatalf("Register = %+v, %v", out, err)
			}
			var body runnerapi.RegisterRunnerRequest
			_ = json.Unmarshal(srv.requests()[0].Body, &body)
			if body.Info.Executor != "" || body.Info.Shell != "" || body.Info.Features.Variables || !body.Info.Features.TraceChecksum || body.Info.Name != "mayfly" {
				t.Errorf("registration info = %+v", body.Info)
			}
		})
	}
	c, _ := newTestClient(t, "http://127.0.0.1:1", nil)
	if _, err := c.Register(context.Background(), runnerapi.RegisterRunnerRequest{}); err == nil || !strings.Contains(err.Error(), "token") {
		t.Fatalf("empty token: %v", err)
	}
}

func TestVerify(t *testing.T) {
	tests := []struct {
		status int
		alive  bool
	}{{200, true}, {403, false}, {500, true}, {404, true}}
	for _, tt := range tests {
		srv := newScriptServer(t, func(int, recorded) reply { return reply{status: tt.status, body: "200"} })
		c, _ := newTestClient(t, srv.URL, nil)
		alive, err := c.Verify(context.Background(), "runner-token-1")
		if err != nil || alive != tt.alive {
			t.Errorf("status %d: Verify = %v, %v; want %v", tt.status, alive, err, tt.alive)
		}
		r := srv.requests()[0]
		if r.Method != "POST" || r.Path != "/api/v4/runners/verify" || string(r.Body) != `{"token":"runner-token-1"}` || r.Header.Get("Accept") != "" {
			t.Errorf("request = %s %s %s %v", r.Method, r.Path, r.Body, r.Header)
		}
	}
	// No server: alive with an error.
	srv := newScriptServer(t, func(int, recorded) reply { return reply{} })
	srv.Close()
	c, _ := newTestClient(t, srv.URL, nil)
	if alive, err := c.Verify(context.Background(), "runner-token-1"); !alive || err == nil {
		t.Errorf("Verify on a closed server = %v, %v; want alive with error", alive, err)
	}
}

func TestUnregister(t *testing.T) {
	tests := []struct {
		status  int
		wantErr string
		forbid  bool
	}{{204, "", false}, {403, "forbidden", true}, {200, "unexpected status 200", false}}
	for _, tt := range tests {
		srv := newScriptServer(t, func(int, recorded) reply { return reply{status: tt.status} })
		c, _ := newTestClient(t, srv.URL, nil)
		err := c.Unregister(context.Background(), "runner-token-1")
		if (tt.wantErr == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.wantErr)) || errors.Is(err, ErrForbidden) != tt.forbid {
			t.Errorf("status %d: Unregister = %v", tt.status, err)
		}
		if err != nil && strings.Contains(err.Error(), "runner-token-1") {
			t.Errorf("error leaks the token: %v", err)
		}
		r := srv.requests()[0]
		if r.Method != "DELETE" || r.Path != "/api/v4/runners" || string(r.Body) != `{"token":"runner-token-1"}` || r.Header.Get("Content-Type") != "application/json" {
			t.Errorf("request = %s %s %s", r.Method, r.Path, r.Body)
		}
	}
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	srv := newScriptServer(t, func(n int, r recorded) reply {
		if r.Path == "/api/v4/jobs/request" {
			return reply{status: 201, header: map[string]string{"Content-Type": "application/json"}, body: jobJSON}
		}
		if n == 2 {
			return reply{status: 500}
		}
		return reply{status: 202}
	})
	c, _ := newTestClient(t, srv.URL, func(cfg *Config) { cfg.Registerer = reg })
	// A second client on the same registry shares the collectors.
	if _, err := New(Config{URL: srv.URL, Registerer: reg}); err != nil {
		t.Fatalf("second client on one registry: %v", err)
	}
	ctx := context.Background()
	res, err := c.RequestJob(ctx, "runner-token-1", RequestOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, _ = c.PatchTrace(ctx, res.Job.ID, res.Job.Token, 0, []byte("abc"))
	_, _ = c.PatchTrace(ctx, res.Job.ID, res.Job.Token, 0, []byte("abc"))
	_, _ = c.PatchTrace(ctx, 77, "jt", 0, []byte("abc")) // a job this client did not receive

	counter := func(runner, endpoint, status string) float64 {
		m, err := c.metrics.statuses.GetMetricWithLabelValues(runner, endpoint, status)
		if err != nil {
			t.Fatal(err)
		}
		return testutil.ToFloat64(m)
	}
	for _, tt := range []struct {
		runner, endpoint, status string
		want                     float64
	}{
		{"runner-t", EndpointRequestJob, "201", 1},
		{"runner-t", EndpointPatchTrace, "202", 1},
		{"runner-t", EndpointPatchTrace, "500", 1},
		{"unknown", EndpointPatchTrace, "202", 1},
	} {
		if got := counter(tt.runner, tt.endpoint, tt.status); got != tt.want {
			t.Errorf("statuses{%s,%s,%s} = %v, want %v", tt.runner, tt.endpoint, tt.status, got, tt.want)
		}
	}
	if n := testutil.CollectAndCount(c.metrics.duration); n != 3 {
		t.Errorf("duration series = %d, want 3", n)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if strings.Contains(l.GetValue(), "runner-token-1") || l.GetValue() == "jt-42" {
					t.Errorf("metric %s label %s carries a whole token", mf.GetName(), l.GetName())
				}
			}
		}
	}
	if !names["gitlab_runner_api_request_statuses_total"] || !names["gitlab_runner_api_request_duration_seconds"] {
		t.Errorf("registered metrics = %v", names)
	}
}

func testLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
