package gitlab

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

const captureDir = "../../testdata/gitlab-capture"

// captured is one line of requests.jsonl: what gitlab-runner v14.10.1 sent.
type captured struct {
	Method  string            `json:"method"`
	Path    string            `json:"path"`
	Status  int               `json:"status"`
	Headers map[string]string `json:"headers"`
	JSON    json.RawMessage   `json:"json"`
}

func loadCapture(t *testing.T) []captured {
	t.Helper()
	f, err := os.Open(filepath.Join(captureDir, "requests.jsonl"))
	if err != nil {
		t.Fatalf("open capture: %v", err)
	}
	defer f.Close()
	var out []captured
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var c captured
		if err := json.Unmarshal(sc.Bytes(), &c); err != nil {
			t.Fatalf("capture line %d: %v", len(out)+1, err)
		}
		out = append(out, c)
	}
	return out
}

func loadTrace(t *testing.T, job int) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(captureDir, fmt.Sprintf("job-%d.trace", job)))
	if err != nil {
		t.Fatalf("read trace: %v", err)
	}
	return b
}

// TestMatchesOfficialRunnerCapture replays the recorded session (register,
// verify, four jobs, unregister) with our client against a responder that
// answers as the capture's responder did, and checks that every request has
// the official runner's method, path, relevant headers and JSON body.
func TestMatchesOfficialRunnerCapture(t *testing.T) {
	want := loadCapture(t)
	traces := map[int][]byte{}
	for j := 1; j <= 4; j++ {
		traces[j] = loadTrace(t, j)
	}
	var jobRequestInfo runnerapi.VersionInfo
	for _, c := range want {
		if c.Path == "/api/v4/jobs/request" {
			var jr runnerapi.JobRequest
			if err := json.Unmarshal(c.JSON, &jr); err != nil {
				t.Fatal(err)
			}
			jobRequestInfo = jr.Info
			break
		}
	}

	jobCount := 0
	srv := newScriptServer(t, func(n int, r recorded) reply {
		if n >= len(want) {
			return reply{status: http.StatusInternalServerError}
		}
		c := want[n]
		rep := reply{status: c.Status, header: map[string]string{}}
		switch {
		case c.Path == "/api/v4/runners" && c.Method == http.MethodPost:
			rep.header["Content-Type"] = "application/json"
			rep.body = `{"id":1,"token":"runner-token-1","token_expires_at":null}`
		case c.Path == "/api/v4/jobs/request":
			jobCount++
			rep.header["Content-Type"] = "application/json"
			rep.body = fmt.Sprintf(`{"id":%d,"token":"job-token-%d","job_info":{"name":"j","stage":"test","project_id":1,"project_name":"p"},`+
				`"git_info":{"repo_url":"","ref":"main","sha":"0123456789abcdef0123456789abcdef01234567","before_sha":"","ref_type":"branch","refspecs":[],"depth":0},`+
				`"runner_info":{"timeout":3600},"variables":[{"key":"GIT_STRATEGY","value":"none","public":true}],`+
				`"steps":[{"name":"script","script":["echo hi"],"timeout":3600,"when":"on_success","allow_failure":false}],`+
				`"image":null,"services":[],"artifacts":[],"cache":[],"credentials":[],"dependencies":[],"features":{"trace_sections":true}}`, jobCount, jobCount)
		case c.Method == http.MethodPatch && c.Status == http.StatusRequestedRangeNotSatisfiable:
			rep.header["Range"] = "0-22791"
		case c.Method == http.MethodPatch && c.Path == "/api/v4/jobs/3/trace" && c.Headers["Content-Range"] == "0-889":
			rep.header["Job-Status"] = runnerapi.StateCanceling
		}
		return rep
	})
	c, _ := newTestClient(t, srv.URL+"/", func(cfg *Config) { cfg.Info = jobRequestInfo })
	ctx := context.Background()
	quiet := TraceOptions{Interval: time.Hour} // only explicit Flush and Finish send

	reg, err := c.Register(ctx, runnerapi.RegisterRunnerRequest{
		Token: "reg-token-xyz", Description: "capture-runner", TagList: "linux,small",
		RunUntagged: true, Locked: false, Active: true,
	})
	if err != nil || reg.Token != "runner-token-1" {
		t.Fatalf("Register = %+v, %v", reg, err)
	}
	if alive, err := c.Verify(ctx, "runner-token-1"); !alive || err != nil {
		t.Fatalf("Verify = %v, %v", alive, err)
	}
	requestJob := func(id int64) *JobTrace {
		t.Helper()
		res, err := c.RequestJob(ctx, "runner-token-1", RequestOptions{})
		if err != nil || res.Outcome != JobReceived || res.Job.ID != id {
			t.Fatalf("RequestJob = %+v, %v", res, err)
		}
		tr, err := c.StartJobTrace(ctx, res.Job.ID, res.Job.Token, quiet)
		if err != nil {
			t.Fatal(err)
		}
		return tr
	}
	write := func(tr *JobTrace, b []byte) {
		t.Helper()
		if n, err := tr.Write(b); n != len(b) || err != nil {
			t.Fatalf("Write = %d, %v", n, err)
		}
	}

	// job 1: success, one PATCH.
	tr := requestJob(1)
	write(tr, traces[1])
	if err := tr.Finish(ctx, runnerapi.StateSuccess, "", 0); err != nil {
		t.Fatalf("job 1 Finish: %v", err)
	}
	// job 2: exit 3.
	tr = requestJob(2)
	write(tr, traces[2])
	if err := tr.Finish(ctx, runnerapi.StateFailed, runnerapi.FailureScriptFailure, 3); err != nil {
		t.Fatalf("job 2 Finish: %v", err)
	}
	// job 3: Job-Status canceling on the first PATCH.
	tr = requestJob(3)
	write(tr, traces[3][:890])
	if err := tr.Flush(ctx); err != nil {
		t.Fatalf("job 3 Flush: %v", err)
	}
	select {
	case <-tr.Canceled():
	default:
		t.Fatal("job 3: Job-Status canceling did not signal cancellation")
	}
	if tr.Aborted() {
		t.Error("job 3: canceling must not count as aborted")
	}
	write(tr, traces[3][890:])
	if err := tr.Finish(ctx, runnerapi.StateFailed, runnerapi.FailureUnknownFailure, 0); err != nil {
		t.Fatalf("job 3 Finish: %v", err)
	}
	// job 4: 416 with Range 0-22791 on the second PATCH.
	tr = requestJob(4)
	write(tr, traces[4][:22791])
	if err := tr.Flush(ctx); err != nil {
		t.Fatalf("job 4 first Flush: %v", err)
	}
	write(tr, traces[4][22791:22943])
	if err := tr.Flush(ctx); err == nil {
		t.Fatal("job 4: Flush answered 416 should report the trace as not fully sent")
	}
	if got := tr.Sent(); got != 22791 {
		t.Fatalf("job 4: after 416 resume offset = %d, want 22791", got)
	}
	write(tr, traces[4][22943:])
	if err := tr.Finish(ctx, runnerapi.StateSuccess, "", 0); err != nil {
		t.Fatalf("job 4 Finish: %v", err)
	}
	if err := c.Unregister(ctx, "runner-token-1"); err != nil {
		t.Fatalf("Unregister: %v", err)
	}

	got := srv.requests()
	if len(got) != len(want) {
		for i, r := range got {
			t.Logf("got %d: %s %s %s", i, r.Method, r.Path, r.Header.Get("Content-Range"))
		}
		t.Fatalf("sent %d requests, the official runner sent %d", len(got), len(want))
	}
	for i := range want {
		w, g := want[i], got[i]
		where := fmt.Sprintf("request %d (%s %s)", i+1, w.Method, w.Path)
		if g.Method != w.Method || g.Path != w.Path {
			t.Errorf("%s: got %s %s", where, g.Method, g.Path)
			continue
		}
		for _, h := range []string{"Content-Type", "Content-Range", "Job-Token", "Accept"} {
			if gv, wv := g.Header.Get(h), w.Headers[h]; gv != wv {
				t.Errorf("%s: header %s = %q, want %q", where, h, gv, wv)
			}
		}
		if !strings.HasPrefix(g.Header.Get("User-Agent"), "mayfly test (") {
			t.Errorf("%s: User-Agent = %q", where, g.Header.Get("User-Agent"))
		}
		if w.Method == http.MethodPatch {
			job, _ := strconv.Atoi(strings.Split(w.Path, "/")[4])
			var start, end int
			if _, err := fmt.Sscanf(w.Headers["Content-Range"], "%d-%d", &start, &end); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(g.Body, traces[job][start:end+1]) {
				t.Errorf("%s: PATCH body differs from job-%d.trace[%d:%d]", where, job, start, end+1)
			}
			continue
		}
		var wj, gj any
		if err := json.Unmarshal(w.JSON, &wj); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(g.Body, &gj); err != nil {
			t.Errorf("%s: body is not JSON: %v", where, err)
			continue
		}
		if !reflect.DeepEqual(gj, wj) {
			t.Errorf("%s: JSON body\n got %s\nwant %s", where, g.Body, w.JSON)
		}
	}
}

// TestCaptureFacts pins the capture facts the brief names, independent of replay.
func TestCaptureFacts(t *testing.T) {
	tests := []struct {
		job      int
		checksum string
		size     int
	}{
		{1, "crc32:fba0a951", 1163},
		{2, "crc32:29454bc3", 1116},
		{4, "crc32:8c7e029c", 23076},
	}
	for _, tt := range tests {
		b := loadTrace(t, tt.job)
		if len(b) != tt.size || runnerapi.TraceChecksum(b) != tt.checksum {
			t.Errorf("job-%d.trace: %d bytes %s, want %d %s", tt.job, len(b), runnerapi.TraceChecksum(b), tt.size, tt.checksum)
		}
	}
}
