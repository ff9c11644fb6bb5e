package coordinator

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// captureDir holds what an unmodified gitlab-runner v14.10.1 sent to a
// minimal responder (register, verify, four jobs, unregister).
const captureDir = "../../testdata/gitlab-capture"

type captured struct {
	Method  string            `json:"method"`
	Path    string            `json:"path"`
	Status  int               `json:"status"`
	Headers map[string]string `json:"headers"`
	JSON    json.RawMessage   `json:"json"`
}

func loadCapture(t *testing.T) ([]captured, map[int64][]byte) {
	t.Helper()
	f, err := os.Open(filepath.Join(captureDir, "requests.jsonl"))
	if err != nil {
		t.Fatalf("open capture: %v", err)
	}
	defer f.Close()
	var reqs []captured
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var c captured
		if err := json.Unmarshal(sc.Bytes(), &c); err != nil {
			t.Fatalf("capture line %d: %v", len(reqs)+1, err)
		}
		reqs = append(reqs, c)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	traces := map[int64][]byte{}
	for id := int64(1); id <= 4; id++ {
		b, err := os.ReadFile(filepath.Join(captureDir, fmt.Sprintf("job-%d.trace", id)))
		if err != nil {
			t.Fatal(err)
		}
		traces[id] = b
	}
	return reqs, traces
}

// TestReplayOfficialRunnerCapture drives the coordinator with the requests
// the official runner sent, in the same order, and compares our status with
// the status the capture's responder gave. Two differences are intentional:
//
//   - Line 15: the responder injected a 416 although the offset was right
//     (to record the runner's resync). We append correctly-placed bytes, so
//     we answer 202; the runner's resend on line 16 then starts behind our
//     end and gets a real 416 with Range 0-22943, after which we resume
//     from 22943 exactly as the runner does on a 416.
//   - Line 10: the responder signalled cancel on job 3's trace; here the
//     job is canceled through Server.Cancel before that PATCH, which then
//     answers 202 with Job-Status: canceling like the responder did.
func TestReplayOfficialRunnerCapture(t *testing.T) {
	reqs, traces := loadCapture(t)
	if len(reqs) != 18 {
		t.Fatalf("capture has %d requests, want 18", len(reqs))
	}
	e := newEnv(t, Config{RegistrationToken: "reg-token-xyz"})
	secret := []VariableSpec{{Key: "SECRET_X", Value: "s3cr3t-value-123", Masked: true}}
	var js []JobSpec
	for _, name := range []string{"hello", "fail", "long", "big"} {
		js = append(js, JobSpec{Name: name, Script: []string{"echo " + name}, Variables: secret, GitStrategy: "none"})
	}
	e.project("capture", "", js...)

	tokens := map[string]string{} // captured token -> ours
	sub := func(tok string) string {
		if v, ok := tokens[tok]; ok {
			return v
		}
		return tok
	}
	for i, c := range reqs {
		line := i + 1
		want := c.Status
		headers := map[string]string{}
		for k, v := range c.Headers {
			headers[k] = v
		}
		var body []byte
		if c.Method == "PATCH" {
			id, _ := strconv.ParseInt(strings.Split(c.Path, "/")[4], 10, 64)
			start, end, err := parseContentRange(c.Headers["Content-Range"])
			if err != nil {
				t.Fatalf("line %d: %v", line, err)
			}
			body = traces[id][start : end+1]
			headers["Job-Token"] = sub(c.Headers["Job-Token"])
		} else if len(c.JSON) > 0 && string(c.JSON) != "null" {
			var m map[string]any
			if err := json.Unmarshal(c.JSON, &m); err != nil {
				t.Fatalf("line %d: %v", line, err)
			}
			if tok, ok := m["token"].(string); ok {
				m["token"] = sub(tok)
			}
			body, _ = json.Marshal(m)
		}
		switch line {
		case 10:
			if rec, err := e.s.Cancel(3); err != nil || rec.Status != StatusCanceling {
				t.Fatalf("cancel job 3: %v %+v", err, rec)
			}
		case 15:
			want = 202 // see the doc comment: the responder's 416 was injected
		case 16:
			want = 416
		}
		r := e.do(c.Method, c.Path, headers, body)
		if r.status != want {
			t.Fatalf("line %d %s %s: status %d, want %d (capture %d): %s", line, c.Method, c.Path, r.status, want, c.Status, r.body)
		}
		switch {
		case c.Method == "POST" && c.Path == "/api/v4/runners":
			var out runnerapi.RegisterRunnerResponse
			if err := json.Unmarshal(r.body, &out); err != nil {
				t.Fatal(err)
			}
			tokens["runner-token-1"] = out.Token
		case c.Path == "/api/v4/jobs/request":
			var j runnerapi.JobResponse
			if err := json.Unmarshal(r.body, &j); err != nil {
				t.Fatal(err)
			}
			if n := int64(len(tokens)); j.ID != n {
				t.Fatalf("line %d: got job %d, want %d", line, j.ID, n)
			}
			tokens[fmt.Sprintf("job-token-%d", j.ID)] = j.Token
			if r.header.Get(runnerapi.HeaderLastUpdate) == "" {
				t.Errorf("line %d: no X-GitLab-Last-Update", line)
			}
		case c.Method == "PATCH":
			if line == 10 || line == 11 {
				if got := r.header.Get(runnerapi.HeaderJobStatus); got != "canceling" {
					t.Errorf("line %d: Job-Status %q, want canceling", line, got)
				}
			}
			if line == 16 {
				// Resume from the Range end, as the runner does after a 416.
				rng := r.header.Get(runnerapi.HeaderRange)
				if rng != "0-22943" {
					t.Fatalf("line 16: Range %q, want 0-22943", rng)
				}
				rest := traces[4][22943:]
				if rr := e.patch(4, sub("job-token-4"), 22943, rest); rr.status != 202 || rr.header.Get(runnerapi.HeaderRange) != "0-23076" {
					t.Fatalf("resume after 416: %d %q", rr.status, rr.header.Get(runnerapi.HeaderRange))
				}
			}
		}
	}

	want := []struct {
		status, runnerState, reason string
		exit                        int
	}{
		{StatusSuccess, "success", "", 0},
		{StatusFailed, "failed", "script_failure", 3},
		{StatusCanceled, "failed", "unknown_failure", 0},
		{StatusSuccess, "success", "", 0},
	}
	for i, w := range want {
		id := int64(i + 1)
		rec, err := e.s.Job(id)
		if err != nil {
			t.Fatal(err)
		}
		if string(rec.Trace) != string(traces[id]) {
			t.Errorf("job %d: stored trace (%d bytes) differs from job-%d.trace (%d bytes)", id, len(rec.Trace), id, len(traces[id]))
		}
		if rec.Status != w.status || rec.RunnerState != w.runnerState || rec.FailureReason != w.reason || rec.ExitCode != w.exit {
			t.Errorf("job %d: status %s runner state %s reason %q exit %d, want %+v", id, rec.Status, rec.RunnerState, rec.FailureReason, rec.ExitCode, w)
		}
		if rec.TraceVerified == nil || !*rec.TraceVerified {
			t.Errorf("job %d: output checksum/bytesize do not match the stored trace", id)
		}
		if rec.StartedAt.IsZero() || rec.FinishedAt.IsZero() {
			t.Errorf("job %d: timestamps %v %v", id, rec.StartedAt, rec.FinishedAt)
		}
	}
	if r := e.patch(3, sub("job-token-3"), 970, []byte("x")); r.status != 403 || r.header.Get(runnerapi.HeaderJobStatus) != "canceled" {
		t.Errorf("job 3 after cancel: %d %q, want 403 canceled", r.status, r.header.Get(runnerapi.HeaderJobStatus))
	}
	if len(e.s.Runners()) != 0 {
		t.Errorf("runner still registered after the captured unregister")
	}
}
