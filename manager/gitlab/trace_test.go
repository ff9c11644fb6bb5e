package gitlab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

func startTrace(t *testing.T, c *Client, opts TraceOptions) *JobTrace {
	t.Helper()
	tr, err := c.StartJobTrace(context.Background(), 7, "jt-7", opts)
	if err != nil {
		t.Fatal(err)
	}
	return tr
}

func TestJobTraceUploadsPeriodically(t *testing.T) {
	g := newGitlabTrace(t)
	c, _ := newTestClient(t, g.URL, nil)
	tr := startTrace(t, c, TraceOptions{Interval: 5 * time.Millisecond})

	// Concurrent writers, as stdout and stderr of a job would be.
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := range 200 {
				fmt.Fprintf(tr, "writer %d line %d\n", w, i)
			}
		})
	}
	wg.Wait()
	waitFor(t, "periodic upload", func() bool { tr2, _, _ := g.snapshot(); return len(tr2) == tr.Len() })
	if err := tr.Finish(context.Background(), runnerapi.StateSuccess, "", 0); err != nil {
		t.Fatalf("Finish: %v", err)
	}
	trace, ranges, puts := g.snapshot()
	if len(trace) != tr.Len() || tr.Sent() != len(trace) {
		t.Fatalf("server has %d bytes, trace %d, sent %d", len(trace), tr.Len(), tr.Sent())
	}
	if len(puts) != 1 || puts[0].State != "success" || puts[0].Output.Bytesize != len(trace) ||
		puts[0].Output.Checksum != runnerapi.TraceChecksum(trace) || puts[0].Checksum != puts[0].Output.Checksum {
		t.Fatalf("puts = %+v", puts)
	}
	if bytes.Count(trace, []byte("\n")) != 800 {
		t.Errorf("server trace has %d lines, want 800", bytes.Count(trace, []byte("\n")))
	}
	for _, r := range ranges {
		var s, e int
		if _, err := fmt.Sscanf(r, "%d-%d", &s, &e); err != nil || e < s {
			t.Errorf("bad Content-Range %q (empty chunk?)", r)
		}
	}
}

func TestJobTraceChunksLargeOutput(t *testing.T) {
	g := newGitlabTrace(t)
	c, _ := newTestClient(t, g.URL, nil)
	tr := startTrace(t, c, TraceOptions{Interval: time.Hour})
	data := bytes.Repeat([]byte("0123456789abcdef"), (2*MaxTraceChunk+100)/16)
	_, _ = tr.Write(data)
	if err := tr.Finish(context.Background(), runnerapi.StateSuccess, "", 0); err != nil {
		t.Fatal(err)
	}
	trace, ranges, _ := g.snapshot()
	want := []string{"0-1048575", "1048576-2097151", fmt.Sprintf("2097152-%d", len(data)-1)}
	if strings.Join(ranges, " ") != strings.Join(want, " ") || !bytes.Equal(trace, data) {
		t.Fatalf("ranges = %v, want %v (server %d bytes)", ranges, want, len(trace))
	}
}

func TestJobTraceResyncsOn416(t *testing.T) {
	g := newGitlabTrace(t)
	c, _ := newTestClient(t, g.URL, nil)
	tr := startTrace(t, c, TraceOptions{Interval: time.Hour})
	ctx := context.Background()
	_, _ = tr.Write([]byte("hello world\n"))
	if err := tr.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	// The server loses the tail of what it stored: it now has "hello".
	g.mu.Lock()
	g.trace = g.trace[:5]
	g.mu.Unlock()
	_, _ = tr.Write([]byte("more\n"))
	if err := tr.Flush(ctx); err == nil {
		t.Fatal("Flush answered 416 reported success")
	}
	if tr.Sent() != 5 {
		t.Fatalf("resume offset = %d, want 5", tr.Sent())
	}
	if err := tr.Finish(ctx, runnerapi.StateSuccess, "", 0); err != nil {
		t.Fatal(err)
	}
	trace, ranges, puts := g.snapshot()
	if string(trace) != "hello world\nmore\n" {
		t.Fatalf("server trace = %q", trace)
	}
	if want := "0-11 12-16 5-16"; strings.Join(ranges, " ") != want {
		t.Errorf("ranges = %v, want %s", ranges, want)
	}
	if len(puts) != 1 || puts[0].Output.Bytesize != 17 {
		t.Errorf("puts = %+v", puts)
	}
}

func TestJobTraceCancellation(t *testing.T) {
	tests := []struct {
		name       string
		rep        reply
		aborted    bool
		status     string
		finishErr  error
		putsAfter  int
		patchAfter bool // whether Finish still PATCHes
	}{
		{name: "canceling on 202", rep: reply{status: 202, header: map[string]string{"Job-Status": "canceling"}}, status: "canceling", putsAfter: 1, patchAfter: true},
		{name: "403 canceled", rep: reply{status: 403, header: map[string]string{"Job-Status": "canceled"}}, aborted: true, status: "canceled", finishErr: ErrJobAborted, putsAfter: 1},
		{name: "403 bare", rep: reply{status: 403}, aborted: true, finishErr: ErrJobAborted, putsAfter: 1},
		{name: "202 failed", rep: reply{status: 202, header: map[string]string{"Job-Status": "failed"}}, aborted: true, status: "failed", finishErr: ErrJobAborted, putsAfter: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := newGitlabTrace(t)
			g.onPatch = func(n, start int, body []byte) *reply {
				if n == 0 {
					return &tt.rep
				}
				return nil
			}
			if tt.aborted {
				g.onPut = func(int, runnerapi.UpdateJobRequest) reply {
					return reply{status: 403, header: map[string]string{"Job-Status": "canceled"}}
				}
			}
			c, _ := newTestClient(t, g.URL, nil)
			tr := startTrace(t, c, TraceOptions{Interval: 5 * time.Millisecond})
			_, _ = tr.Write([]byte("running...\n"))
			select {
			case <-tr.Canceled():
			case <-time.After(5 * time.Second):
				t.Fatal("cancellation not signalled")
			}
			if tr.Aborted() != tt.aborted || tr.JobStatus() != tt.status {
				t.Errorf("Aborted = %v, JobStatus = %q", tr.Aborted(), tr.JobStatus())
			}
			_, _ = tr.Write([]byte("ERROR: Job failed: canceled\n"))
			err := tr.Finish(context.Background(), runnerapi.StateFailed, runnerapi.FailureUnknownFailure, 0)
			if tt.finishErr != nil {
				if !errors.Is(err, tt.finishErr) {
					t.Fatalf("Finish = %v, want %v", err, tt.finishErr)
				}
			} else if err != nil {
				t.Fatalf("Finish = %v", err)
			}
			trace, ranges, puts := g.snapshot()
			if len(puts) != tt.putsAfter || puts[0].State != "failed" || puts[0].FailureReason != "unknown_failure" {
				t.Errorf("puts = %+v", puts)
			}
			if tt.patchAfter {
				if string(trace) != "running...\nERROR: Job failed: canceled\n" {
					t.Errorf("trace = %q", trace)
				}
			} else if len(ranges) != 1 {
				t.Errorf("PATCHes after abort: %v", ranges)
			}
		})
	}
}

func TestFinishLoops(t *testing.T) {
	tests := []struct {
		name       string
		puts       []reply // answers in order; the last repeats
		opts       TraceOptions
		wantErr    string
		wantPuts   int
		wantRanges string
		wantSleeps []time.Duration
	}{
		{name: "200", puts: []reply{{status: 200}}, wantPuts: 1, wantRanges: "0-10"},
		{name: "202 then 200", puts: []reply{{status: 202}, {status: 202}, {status: 200}}, wantPuts: 3, wantRanges: "0-10",
			wantSleeps: []time.Duration{time.Second, time.Second}},
		{name: "202 steers interval", puts: []reply{{status: 202, header: map[string]string{"X-GitLab-Trace-Update-Interval": "7"}}, {status: 200}}, wantPuts: 2, wantRanges: "0-10",
			wantSleeps: []time.Duration{7 * time.Second}},
		{name: "412 resends whole trace", puts: []reply{{status: 412}, {status: 200}}, wantPuts: 2, wantRanges: "0-10 0-10"},
		{name: "5xx then 200", puts: []reply{{status: 503}, {status: 500}, {status: 200}}, wantPuts: 3, wantRanges: "0-10"},
		{name: "404 aborts", puts: []reply{{status: 404}}, wantPuts: 1, wantRanges: "0-10", wantErr: "job aborted"},
		{name: "gives up by count", puts: []reply{{status: 500}}, opts: TraceOptions{MaxFinalAttempts: 4}, wantPuts: 4, wantRanges: "0-10", wantErr: "gave up after 4 attempts"},
		{name: "gives up by time", puts: []reply{{status: 202}}, opts: TraceOptions{FinalUpdateTimeout: 10 * time.Second}, wantPuts: 11, wantRanges: "0-10", wantErr: "gave up after 11 attempts"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := newGitlabTrace(t)
			g.onPut = func(n int, req runnerapi.UpdateJobRequest) reply { return tt.puts[min(n, len(tt.puts)-1)] }
			c, clk := newTestClient(t, g.URL, func(cfg *Config) { cfg.Backoff = Backoff{Min: time.Nanosecond, Max: time.Nanosecond, NoJitter: true} })
			opts := tt.opts
			opts.Interval = time.Second
			tr := startTrace(t, c, opts)
			_, _ = tr.Write([]byte("some output"))
			err := tr.Finish(context.Background(), runnerapi.StateSuccess, "", 0)
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("Finish = %v, want %q", err, tt.wantErr)
			}
			trace, ranges, puts := g.snapshot()
			if len(puts) != tt.wantPuts || strings.Join(ranges, " ") != tt.wantRanges || string(trace) != "some output" {
				t.Fatalf("puts %d, ranges %v, trace %q", len(puts), ranges, trace)
			}
			for _, p := range puts {
				if p.Output.Checksum != runnerapi.TraceChecksum([]byte("some output")) || p.Output.Bytesize != 11 {
					t.Errorf("put = %+v", p)
				}
			}
			if tt.wantSleeps != nil {
				var intervalSleeps []time.Duration
				for _, s := range clk.Sleeps() {
					if s > time.Nanosecond {
						intervalSleeps = append(intervalSleeps, s)
					}
				}
				if !equalDurations(intervalSleeps, tt.wantSleeps) {
					t.Errorf("sleeps = %v, want %v", intervalSleeps, tt.wantSleeps)
				}
			}
		})
	}
}

func TestFinishSendsTraceBeforeUpdate(t *testing.T) {
	g := newGitlabTrace(t)
	fails := 2
	g.onPatch = func(n, start int, body []byte) *reply {
		if n < fails {
			return &reply{status: 502}
		}
		return nil
	}
	g.onPut = func(n int, req runnerapi.UpdateJobRequest) reply {
		if len(g.trace) != req.Output.Bytesize { // g.mu is held while hooks run
			return reply{status: 412}
		}
		return reply{status: 200}
	}
	c, _ := newTestClient(t, g.URL, nil)
	tr := startTrace(t, c, TraceOptions{Interval: time.Second})
	_, _ = tr.Write([]byte("abc"))
	if err := tr.Finish(context.Background(), runnerapi.StateFailed, runnerapi.FailureScriptFailure, 3); err != nil {
		t.Fatal(err)
	}
	_, ranges, puts := g.snapshot()
	if len(ranges) != 3 || len(puts) != 1 || puts[0].ExitCode != 3 {
		t.Fatalf("ranges %v puts %+v", ranges, puts)
	}
}

func TestFinishHonoursContext(t *testing.T) {
	g := newGitlabTrace(t)
	g.onPut = func(int, runnerapi.UpdateJobRequest) reply { return reply{status: 202} }
	c, err := New(Config{URL: g.URL, Logger: testLogger()}) // real clock
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseIdleConnections()
	tr, err := c.StartJobTrace(context.Background(), 3, "jt", TraceOptions{Interval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = tr.Finish(ctx, runnerapi.StateSuccess, "", 0)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Finish = %v", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("Finish took %v after cancellation", d)
	}
}

func TestHeartbeatAfterSilence(t *testing.T) {
	tests := []struct {
		name    string
		put     reply
		aborted bool
	}{
		{name: "alive", put: reply{status: 200}},
		{name: "canceled", put: reply{status: 403, header: map[string]string{"Job-Status": "canceled"}}, aborted: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := newGitlabTrace(t)
			g.onPut = func(int, runnerapi.UpdateJobRequest) reply { return tt.put }
			c, clk := newTestClient(t, g.URL, nil)
			tr := startTrace(t, c, TraceOptions{Interval: 2 * time.Millisecond})
			_, _ = tr.Write([]byte("x"))
			waitFor(t, "first patch", func() bool { _, r, _ := g.snapshot(); return len(r) == 1 })
			time.Sleep(20 * time.Millisecond) // ticks with nothing to send, clock not advanced
			if _, _, puts := g.snapshot(); len(puts) != 0 {
				t.Fatalf("heartbeat before silence: %+v", puts)
			}
			clk.Advance(DefaultForceSendInterval + time.Second)
			waitFor(t, "heartbeat", func() bool { _, _, p := g.snapshot(); return len(p) >= 1 })
			time.Sleep(20 * time.Millisecond)
			_, _, puts := g.snapshot()
			if len(puts) != 1 || puts[0].State != "running" || puts[0].Token != "jt-7" || puts[0].Output != (runnerapi.JobTraceOutput{}) {
				t.Fatalf("heartbeats = %+v, want exactly one PUT running", puts)
			}
			if tt.aborted {
				select {
				case <-tr.Canceled():
				case <-time.After(5 * time.Second):
					t.Fatal("403 on heartbeat did not cancel")
				}
			}
			err := tr.Finish(context.Background(), runnerapi.StateSuccess, "", 0)
			if tt.aborted != errors.Is(err, ErrJobAborted) || !tt.aborted && err != nil {
				t.Fatalf("Finish = %v", err)
			}
		})
	}
}

func TestOutputLimit(t *testing.T) {
	g := newGitlabTrace(t)
	c, _ := newTestClient(t, g.URL, nil)
	tr := startTrace(t, c, TraceOptions{Interval: time.Hour, OutputLimit: 100})
	for _, n := range []int{60, 60, 10} {
		if got, err := tr.Write(bytes.Repeat([]byte("a"), n)); got != n || err != nil {
			t.Fatalf("Write(%d) = %d, %v", n, got, err)
		}
	}
	if err := tr.Finish(context.Background(), runnerapi.StateSuccess, "", 0); err != nil {
		t.Fatal(err)
	}
	trace, _, puts := g.snapshot()
	if !bytes.Equal(trace[:100], bytes.Repeat([]byte("a"), 100)) {
		t.Fatalf("first 100 bytes = %q", trace[:100])
	}
	rest := string(trace[100:])
	// gitlab-runner's notice, word for word (helpers/trace's limitWriter).
	if want := "\n\x1b[33;1mJob's log exceeded limit of 100 bytes.\nJob execution will continue but no more output will be collected.\x1b[0;m\n"; rest != want {
		t.Fatalf("tail = %q, want %q", rest, want)
	}
	if puts[0].Output.Bytesize != len(trace) || puts[0].Output.Checksum != runnerapi.TraceChecksum(trace) {
		t.Errorf("put = %+v", puts[0])
	}
	if n, err := tr.Write([]byte("late")); n != 0 || !errors.Is(err, ErrTraceClosed) {
		t.Errorf("Write after Finish = %d, %v", n, err)
	}
	if err := tr.Finish(context.Background(), runnerapi.StateSuccess, "", 0); err == nil {
		t.Error("second Finish succeeded")
	}
}

func TestJobTraceBadArguments(t *testing.T) {
	c, _ := newTestClient(t, "http://127.0.0.1:1", nil)
	if _, err := c.StartJobTrace(context.Background(), 0, "jt", TraceOptions{}); err == nil {
		t.Error("id 0 accepted")
	}
	if _, err := c.StartJobTrace(context.Background(), 1, "", TraceOptions{}); err == nil {
		t.Error("empty token accepted")
	}
	ctx, cancel := context.WithCancel(context.Background())
	tr, err := c.StartJobTrace(ctx, 1, "jt", TraceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := tr.Finish(context.Background(), "canceled", "", 0); err == nil || !strings.Contains(err.Error(), "state must be") {
		t.Errorf("bad state: %v", err)
	}
	<-tr.loopDone
}

func TestInterval(t *testing.T) {
	headers := []string{"9", "0", "junk", "99999"}
	want := []time.Duration{9 * time.Second, 9 * time.Second, 9 * time.Second, 15 * time.Minute}
	g := newGitlabTrace(t)
	g.onPatch = func(n, start int, body []byte) *reply {
		g.trace = append(g.trace[:start], body...)
		return &reply{status: 202, header: map[string]string{"X-GitLab-Trace-Update-Interval": headers[n]}}
	}
	c, _ := newTestClient(t, g.URL, nil)
	tr := startTrace(t, c, TraceOptions{Interval: time.Hour})
	if tr.Interval() != time.Hour {
		t.Fatalf("initial interval = %v", tr.Interval())
	}
	for i := range headers {
		_, _ = tr.Write([]byte("x"))
		if err := tr.Flush(context.Background()); err != nil {
			t.Fatal(err)
		}
		if tr.Interval() != want[i] {
			t.Errorf("after %q interval = %v, want %v", headers[i], tr.Interval(), want[i])
		}
	}
	if err := tr.Finish(context.Background(), runnerapi.StateSuccess, "", 0); err != nil {
		t.Fatal(err)
	}
}

// TestNoGoroutineLeak checks that the upload goroutine and the HTTP
// machinery are gone after Finish, and after a cancelled context without Finish.
func TestNoGoroutineLeak(t *testing.T) {
	for _, viaFinish := range []bool{true, false} {
		t.Run(fmt.Sprintf("finish=%v", viaFinish), func(t *testing.T) {
			opts := []goleak.Option{goleak.IgnoreCurrent()}
			g := newGitlabTrace(t)
			c, _ := newTestClient(t, g.URL, nil)
			ctx, cancel := context.WithCancel(context.Background())
			tr, err := c.StartJobTrace(ctx, 9, "jt", TraceOptions{Interval: time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			for range 50 {
				_, _ = tr.Write([]byte("line\n"))
				time.Sleep(100 * time.Microsecond)
			}
			if viaFinish {
				if err := tr.Finish(context.Background(), runnerapi.StateSuccess, "", 0); err != nil {
					t.Fatal(err)
				}
			} else {
				cancel()
				<-tr.loopDone
			}
			cancel()
			g.Close()
			c.CloseIdleConnections()
			goleak.VerifyNone(t, opts...)
		})
	}
}

// TestFinishInterruptsHangingUpload: an upload of the periodic loop that
// hangs does not hold Finish up; Finish re-sends from the acknowledged offset.
func TestFinishInterruptsHangingUpload(t *testing.T) {
	var mu sync.Mutex
	var stored []byte
	hung := make(chan struct{})
	var hangOnce sync.Once
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if r.Method == http.MethodPut {
			w.WriteHeader(http.StatusOK)
			return
		}
		first := false
		hangOnce.Do(func() { first = true })
		if first {
			close(hung)
			<-r.Context().Done() // hang until the client gives up
			return
		}
		var start int
		_, _ = fmt.Sscanf(r.Header.Get("Content-Range"), "%d-", &start)
		mu.Lock()
		stored = append(stored[:start], body...)
		mu.Unlock()
		w.WriteHeader(http.StatusAccepted)
	}))
	defer srv.Close()
	c, _ := newTestClient(t, srv.URL, nil)
	tr := startTrace(t, c, TraceOptions{Interval: time.Millisecond})
	_, _ = tr.Write([]byte("first part\n"))
	select {
	case <-hung:
	case <-time.After(5 * time.Second):
		t.Fatal("no upload arrived")
	}
	_, _ = tr.Write([]byte("second part\n"))
	start := time.Now()
	if err := tr.Finish(context.Background(), runnerapi.StateSuccess, "", 0); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("Finish waited %v for a hanging upload", d)
	}
	mu.Lock()
	defer mu.Unlock()
	if string(stored) != "first part\nsecond part\n" {
		t.Fatalf("stored = %q", stored)
	}
}

// The cut at the output limit does not split a UTF-8 character; bytes
// that are not UTF-8 are cut where the limit says.
func TestOutputLimitCutsWholeCharacters(t *testing.T) {
	for _, tt := range []struct {
		name, in string
		limit    int
		want     string
	}{
		{"ascii", "abcdef", 4, "abcd"},
		{"two-byte char split", "ab\u00e9cd", 3, "ab"},
		{"two-byte char whole", "ab\u00e9cd", 4, "ab\u00e9"},
		{"four-byte char split after 3", "a\U0001F600b", 4, "a"},
		{"four-byte char whole", "a\U0001F600b", 5, "a\U0001F600"},
		{"invalid bytes cut as they come", "a\xff\xfe\xfdb", 3, "a\xff\xfe"},
		{"lone continuation bytes", "a\x80\x80\x80\x80", 4, "a\x80\x80\x80"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := string(cutUTF8([]byte(tt.in), tt.limit)); got != tt.want {
				t.Errorf("cutUTF8(%q, %d) = %q, want %q", tt.in, tt.limit, got, tt.want)
			}
		})
	}
}

// TestFinishRidesOutOutage: GitLab answering 503 to the trace and the
// final update for two minutes (a restart, an outage) does not lose the
// job: with the client's real backoff (up to 60 s) Finish keeps sending
// within its 5-minute bound and reports the end once GitLab is back.
func TestFinishRidesOutOutage(t *testing.T) {
	g := newGitlabTrace(t)
	c, clk := newTestClient(t, g.URL, nil)
	back := clk.Now().Add(2 * time.Minute)
	down := func() *reply {
		if clk.Now().Before(back) {
			return &reply{status: http.StatusServiceUnavailable}
		}
		return nil
	}
	g.onPatch = func(int, int, []byte) *reply { return down() }
	g.onPut = func(int, runnerapi.UpdateJobRequest) reply {
		if r := down(); r != nil {
			return *r
		}
		return reply{status: http.StatusOK}
	}
	tr := startTrace(t, c, TraceOptions{Interval: time.Second})
	_, _ = tr.Write([]byte("some output"))
	if err := tr.Finish(context.Background(), runnerapi.StateSuccess, "", 0); err != nil {
		t.Fatalf("Finish through a 2-minute outage: %v", err)
	}
	trace, _, puts := g.snapshot()
	if string(trace) != "some output" || len(puts) == 0 || puts[len(puts)-1].State != runnerapi.StateSuccess {
		t.Fatalf("trace %q, %d puts; want the whole trace and the final update", trace, len(puts))
	}
	if took := clk.Now().Sub(back.Add(-2 * time.Minute)); took < 2*time.Minute || took > 2*time.Minute+DefaultFinalUpdateTimeout {
		t.Errorf("Finish ended %v after the outage began", took)
	}
}
