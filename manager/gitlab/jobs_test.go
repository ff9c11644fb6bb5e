package gitlab

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

func TestUpdateJob(t *testing.T) {
	tests := []struct {
		name     string
		rep      reply
		state    UpdateState
		cancel   bool
		interval time.Duration
	}{
		{name: "200", rep: reply{status: 200}, state: UpdateSucceeded},
		{name: "200 canceling", rep: reply{status: 200, header: map[string]string{"Job-Status": "canceling"}}, state: UpdateSucceeded, cancel: true},
		{name: "202 interval", rep: reply{status: 202, header: map[string]string{"X-GitLab-Trace-Update-Interval": "5"}}, state: UpdateNotYet, interval: 5 * time.Second},
		{name: "412", rep: reply{status: 412}, state: UpdateTraceValidationFailed},
		{name: "403", rep: reply{status: 403}, state: UpdateAborted},
		{name: "403 canceled", rep: reply{status: 403, header: map[string]string{"Job-Status": "canceled"}}, state: UpdateAborted},
		{name: "404", rep: reply{status: 404}, state: UpdateAborted},
		{name: "200 canceled", rep: reply{status: 200, header: map[string]string{"Job-Status": "canceled"}}, state: UpdateAborted},
		{name: "202 failed", rep: reply{status: 202, header: map[string]string{"Job-Status": "failed"}}, state: UpdateAborted},
		{name: "500", rep: reply{status: 500}, state: UpdateRetryLater},
		{name: "400", rep: reply{status: 400}, state: UpdateRetryLater},
		{name: "409", rep: reply{status: 409}, state: UpdateRetryLater},
		{name: "interval zero ignored", rep: reply{status: 200, header: map[string]string{"X-GitLab-Trace-Update-Interval": "0"}}, state: UpdateSucceeded},
		{name: "interval negative ignored", rep: reply{status: 200, header: map[string]string{"X-GitLab-Trace-Update-Interval": "-3"}}, state: UpdateSucceeded},
		{name: "interval junk ignored", rep: reply{status: 200, header: map[string]string{"X-GitLab-Trace-Update-Interval": "3s"}}, state: UpdateSucceeded},
		{name: "interval capped", rep: reply{status: 200, header: map[string]string{"X-GitLab-Trace-Update-Interval": "86400"}}, state: UpdateSucceeded, interval: 15 * time.Minute},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newScriptServer(t, func(int, recorded) reply { return tt.rep })
			c, _ := newTestClient(t, srv.URL, nil)
			res, err := c.UpdateJob(context.Background(), 12, runnerapi.UpdateJobRequest{
				Token: "jt-12", State: runnerapi.StateFailed, FailureReason: runnerapi.FailureScriptFailure, ExitCode: 2,
			})
			if err != nil {
				t.Fatal(err)
			}
			if res.State != tt.state || res.CancelRequested != tt.cancel || res.UpdateInterval != tt.interval || res.StatusCode != tt.rep.status {
				t.Fatalf("UpdateJob = %+v (%s), want %s cancel=%v interval=%v", res, res.State, tt.state, tt.cancel, tt.interval)
			}
			r := srv.requests()[0]
			if r.Method != http.MethodPut || r.Path != "/api/v4/jobs/12" || r.Header.Get("Content-Type") != "application/json" ||
				r.Header.Get("Accept") != "" || r.Header.Get("Job-Token") != "" {
				t.Errorf("request = %s %s %v", r.Method, r.Path, r.Header)
			}
			var body runnerapi.UpdateJobRequest
			if err := json.Unmarshal(r.Body, &body); err != nil {
				t.Fatal(err)
			}
			if body.Token != "jt-12" || body.State != "failed" || body.FailureReason != "script_failure" || body.ExitCode != 2 || body.Info != testInfo() {
				t.Errorf("body = %+v", body)
			}
		})
	}
	c, _ := newTestClient(t, "http://127.0.0.1:1", nil)
	for _, bad := range []struct {
		id   int64
		req  runnerapi.UpdateJobRequest
		want string
	}{
		{0, runnerapi.UpdateJobRequest{Token: "t", State: "running"}, "id must be positive"},
		{1, runnerapi.UpdateJobRequest{State: "running"}, "token"},
		{1, runnerapi.UpdateJobRequest{Token: "t"}, "state is empty"},
	} {
		if _, err := c.UpdateJob(context.Background(), bad.id, bad.req); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("UpdateJob(%d, %+v) = %v, want %q", bad.id, bad.req, err, bad.want)
		}
	}
}

func TestPatchTrace(t *testing.T) {
	tests := []struct {
		name     string
		rep      reply
		state    PatchState
		offset   int
		cancel   bool
		interval time.Duration
	}{
		{name: "202", rep: reply{status: 202, header: map[string]string{"Range": "0-15"}}, state: PatchSucceeded, offset: 15},
		{name: "202 canceling", rep: reply{status: 202, header: map[string]string{"Job-Status": "canceling"}}, state: PatchSucceeded, offset: 15, cancel: true},
		{name: "202 interval", rep: reply{status: 202, header: map[string]string{"X-GitLab-Trace-Update-Interval": "30"}}, state: PatchSucceeded, offset: 15, interval: 30 * time.Second},
		{name: "416 with range", rep: reply{status: 416, header: map[string]string{"Range": "0-3"}}, state: PatchRangeMismatch, offset: 3},
		{name: "416 bytes= range", rep: reply{status: 416, header: map[string]string{"Range": "bytes=0-7"}}, state: PatchRangeMismatch, offset: 7},
		{name: "416 without range", rep: reply{status: 416}, state: PatchRangeMismatch, offset: 0},
		{name: "416 junk range", rep: reply{status: 416, header: map[string]string{"Range": "0-x"}}, state: PatchRangeMismatch, offset: 0},
		{name: "403", rep: reply{status: 403}, state: PatchAborted, offset: 10},
		{name: "403 canceled", rep: reply{status: 403, header: map[string]string{"Job-Status": "canceled"}}, state: PatchAborted, offset: 10},
		{name: "202 failed", rep: reply{status: 202, header: map[string]string{"Job-Status": "failed"}}, state: PatchAborted, offset: 10},
		{name: "404", rep: reply{status: 404}, state: PatchNotFound, offset: 10},
		{name: "500", rep: reply{status: 500}, state: PatchFailed, offset: 10},
		{name: "400", rep: reply{status: 400}, state: PatchFailed, offset: 10},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newScriptServer(t, func(int, recorded) reply { return tt.rep })
			c, _ := newTestClient(t, srv.URL, nil)
			res, err := c.PatchTrace(context.Background(), 12, "jt-12", 10, []byte("hello"))
			if err != nil {
				t.Fatal(err)
			}
			if res.State != tt.state || res.NewOffset != tt.offset || res.CancelRequested != tt.cancel || res.UpdateInterval != tt.interval {
				t.Fatalf("PatchTrace = %+v (%s), want %s offset %d cancel %v interval %v", res, res.State, tt.state, tt.offset, tt.cancel, tt.interval)
			}
			r := srv.requests()[0]
			if r.Method != http.MethodPatch || r.Path != "/api/v4/jobs/12/trace" || string(r.Body) != "hello" ||
				r.Header.Get("Content-Range") != "10-14" || r.Header.Get("Content-Type") != "text/plain" ||
				r.Header.Get("Job-Token") != "jt-12" || r.Header.Get("Accept") != "" {
				t.Errorf("request = %s %s %q %v", r.Method, r.Path, r.Body, r.Header)
			}
		})
	}
}

func TestPatchTraceRefusesBadChunks(t *testing.T) {
	srv := newScriptServer(t, func(int, recorded) reply { return reply{status: 202} })
	c, _ := newTestClient(t, srv.URL, nil)
	ctx := context.Background()
	res, err := c.PatchTrace(ctx, 1, "jt", 5, nil)
	if err != nil || res.State != PatchSucceeded || res.NewOffset != 5 {
		t.Errorf("empty chunk = %+v, %v", res, err)
	}
	if _, err := c.PatchTrace(ctx, 1, "jt", 0, bytes.Repeat([]byte("x"), MaxTraceChunk+1)); err == nil || !strings.Contains(err.Error(), "exceeds") {
		t.Errorf("oversized chunk: %v", err)
	}
	if _, err := c.PatchTrace(ctx, 1, "", 0, []byte("x")); err == nil {
		t.Error("empty job token accepted")
	}
	if _, err := c.PatchTrace(ctx, 1, "jt", -1, []byte("x")); err == nil {
		t.Error("negative offset accepted")
	}
	if res, err := c.PatchTrace(ctx, 1, "jt", 0, bytes.Repeat([]byte("x"), MaxTraceChunk)); err != nil || res.NewOffset != MaxTraceChunk {
		t.Errorf("1 MiB chunk = %+v, %v", res, err)
	}
	if n := len(srv.requests()); n != 1 {
		t.Errorf("%d requests sent, want only the 1 MiB one", n)
	}
}
