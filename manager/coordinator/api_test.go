package coordinator

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// Checklist 1: every endpoint lives under /api/v4; other paths are 404.
func TestEndpointsUnderAPIv4(t *testing.T) {
	e := newEnv(t, Config{})
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	tests := []struct {
		method, path string
		body         any
		want         int
	}{
		{"POST", "/api/v4/runners/verify", runnerapi.RunnerTokenRequest{Token: tok}, 200},
		{"POST", "/api/v4/jobs/request", runnerapi.JobRequest{Token: tok}, 204},
		{"POST", "/runners/verify", runnerapi.RunnerTokenRequest{Token: tok}, 404},
		{"POST", "/ci/api/v4/jobs/request", runnerapi.JobRequest{Token: tok}, 404},
		{"POST", "/api/v4/jobs/unknown", runnerapi.JobRequest{Token: tok}, 404},
		{"GET", "/api/v4/runners", nil, 404},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			if r := e.doJSON(tt.method, tt.path, tt.body); r.status != tt.want {
				t.Errorf("status %d, want %d (%s)", r.status, tt.want, r.body)
			}
		})
	}
}

// Checklist 2, 3: registration.
func TestRegister(t *testing.T) {
	e := newEnv(t, Config{})
	e.project("web", "", jobs("a")...)
	projTok := e.s.Projects()[0].RegistrationToken
	tests := []struct {
		name     string
		body     string
		want     int
		wantType RunnerType
		paused   bool
		tags     []string
	}{
		{"instance", `{"token":"reg-token-xyz","tag_list":"linux, small,linux","run_untagged":false,"active":true,"info":{"name":"gitlab-runner"}}`, 201, InstanceRunner, false, []string{"linux", "small"}},
		{"project", `{"token":"` + projTok + `","run_untagged":true,"locked":true,"active":true}`, 201, ProjectRunner, false, []string{}},
		{"inactive is paused", `{"token":"reg-token-xyz","run_untagged":true,"active":false}`, 201, InstanceRunner, true, []string{}},
		{"paused field", `{"token":"reg-token-xyz","run_untagged":true,"paused":true}`, 201, InstanceRunner, true, []string{}},
		{"active absent", `{"token":"reg-token-xyz","run_untagged":true}`, 201, InstanceRunner, false, []string{}},
		{"wrong token", `{"token":"nope","run_untagged":true,"active":true}`, 403, "", false, nil},
		{"missing token", `{"run_untagged":true}`, 400, "", false, nil},
		{"no tags and not untagged", `{"token":"reg-token-xyz","run_untagged":false,"active":true}`, 400, "", false, nil},
		{"short maximum_timeout", `{"token":"reg-token-xyz","run_untagged":true,"maximum_timeout":60}`, 400, "", false, nil},
		{"active and paused agree", `{"token":"reg-token-xyz","run_untagged":true,"active":false,"paused":true}`, 201, InstanceRunner, true, []string{}},
		{"active and paused contradict", `{"token":"reg-token-xyz","run_untagged":true,"active":true,"paused":true}`, 400, "", false, nil},
		{"bad access level", `{"token":"reg-token-xyz","run_untagged":true,"access_level":"everything"}`, 400, "", false, nil},
		{"tag_list as array", `{"token":"reg-token-xyz","tag_list":["a"]}`, 400, "", false, nil},
		{"not json", `token=reg-token-xyz`, 400, "", false, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := e.do("POST", "/api/v4/runners", map[string]string{"Content-Type": "application/json"}, []byte(tt.body))
			if r.status != tt.want {
				t.Fatalf("status %d, want %d (%s)", r.status, tt.want, r.body)
			}
			if tt.want != 201 {
				return
			}
			if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
				t.Errorf("Content-Type %q", ct)
			}
			var out runnerapi.RegisterRunnerResponse
			dec := json.NewDecoder(bytes.NewReader(r.body))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&out); err != nil || out.Token == "" || out.ID == 0 {
				t.Fatalf("body %s: %v", r.body, err)
			}
			var rec *RunnerRecord
			for _, rr := range e.s.Runners() {
				if rr.ID == out.ID {
					rec = &rr
				}
			}
			if rec == nil || rec.Token != out.Token {
				t.Fatalf("runner %d not stored with its token", out.ID)
			}
			if rec.Type != tt.wantType || rec.Paused != tt.paused || strings.Join(rec.Tags, ",") != strings.Join(tt.tags, ",") {
				t.Errorf("runner = %+v, want type %s paused %v tags %v", rec, tt.wantType, tt.paused, tt.tags)
			}
		})
	}
}

// Checklist 4, 5: verify and unregister.
func TestVerifyAndUnregister(t *testing.T) {
	e := newEnv(t, Config{})
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	steps := []struct {
		method, path, token string
		want                int
	}{
		{"POST", "/api/v4/runners/verify", tok, 200},
		{"POST", "/api/v4/runners/verify", "unknown", 403},
		{"DELETE", "/api/v4/runners", "unknown", 403},
		{"DELETE", "/api/v4/runners", tok, 204},
		{"POST", "/api/v4/runners/verify", tok, 403},
		{"DELETE", "/api/v4/runners", tok, 403},
	}
	for i, st := range steps {
		r := e.doJSON(st.method, st.path, runnerapi.RunnerTokenRequest{Token: st.token})
		if r.status != st.want {
			t.Errorf("step %d %s %s: status %d, want %d", i, st.method, st.path, r.status, st.want)
		}
		if st.want == 204 && len(r.body) != 0 {
			t.Errorf("204 with body %q", r.body)
		}
	}
	if r, _ := e.requestJob(tok, ""); r.status != 403 {
		t.Errorf("job request after unregister: %d, want 403", r.status)
	}
}

// Checklist 6, 12: idle 204, bad token 403, X-GitLab-Last-Update echo.
func TestJobRequestLastUpdate(t *testing.T) {
	e := newEnv(t, Config{})
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})

	r, _ := e.requestJob("bad-token", "")
	if r.status != 403 {
		t.Fatalf("bad token: %d", r.status)
	}
	r, _ = e.requestJob(tok, "")
	v1 := r.header.Get(runnerapi.HeaderLastUpdate)
	if r.status != 204 || len(r.body) != 0 || v1 == "" {
		t.Fatalf("idle: status %d body %q last update %q", r.status, r.body, v1)
	}
	r, _ = e.requestJob(tok, v1)
	if r.status != 204 || r.header.Get(runnerapi.HeaderLastUpdate) != v1 {
		t.Fatalf("current last_update: status %d header %q, want 204 echoing %q", r.status, r.header.Get(runnerapi.HeaderLastUpdate), v1)
	}
	// A new job changes the queue version: the same last_update now leads to a look-up.
	e.project("p", "", jobs("a", "b")...)
	r, j := e.requestJob(tok, v1)
	if r.status != 201 || j == nil {
		t.Fatalf("after enqueue: status %d", r.status)
	}
	v201 := r.header.Get(runnerapi.HeaderLastUpdate)
	if v201 == "" || v201 == v1 {
		t.Fatalf("201 last update %q (old %q)", v201, v1)
	}
	// The 201's value never short-circuits: the second queued job is found.
	r, j2 := e.requestJob(tok, v201)
	if r.status != 201 || j2 == nil || j2.ID == j.ID {
		t.Fatalf("second job with 201's last_update: status %d", r.status)
	}
	r, _ = e.requestJob(tok, r.header.Get(runnerapi.HeaderLastUpdate))
	v2 := r.header.Get(runnerapi.HeaderLastUpdate)
	if r.status != 204 || v2 == "" {
		t.Fatalf("drained: %d %q", r.status, v2)
	}
	if r, _ = e.requestJob(tok, v2); r.status != 204 || r.header.Get(runnerapi.HeaderLastUpdate) != v2 {
		t.Fatalf("echo after drain: %d %q", r.status, r.header.Get(runnerapi.HeaderLastUpdate))
	}
}

// Checklist 12: optional long poll, bounded, woken by a new job.
func TestJobRequestLongPoll(t *testing.T) {
	e := newEnv(t, Config{LongPoll: 300 * time.Millisecond})
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	r, _ := e.requestJob(tok, "")
	v := r.header.Get(runnerapi.HeaderLastUpdate)

	// Nothing changes: held, then 204 echoing.
	r, _ = e.requestJob(tok, v)
	if r.status != 204 || r.header.Get(runnerapi.HeaderLastUpdate) != v {
		t.Fatalf("held poll: %d %q", r.status, r.header.Get(runnerapi.HeaderLastUpdate))
	}

	// A job arriving while held is handed out by that same request.
	e2 := newEnv(t, Config{LongPoll: MaxLongPoll})
	tok2 := e2.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	r, _ = e2.requestJob(tok2, "")
	v = r.header.Get(runnerapi.HeaderLastUpdate)
	done := make(chan *runnerapi.JobResponse, 1)
	go func() {
		_, j := e2.requestJob(tok2, v)
		done <- j
	}()
	time.Sleep(50 * time.Millisecond)
	e2.project("p", "", jobs("late")...)
	select {
	case j := <-done:
		if j == nil || j.JobInfo.Name != "late" {
			t.Fatalf("held request got %+v, want job late", j)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("held request not woken by a new job")
	}

	if _, err := New(Config{LongPoll: 11 * time.Minute}); err == nil {
		t.Error("LongPoll of 11m accepted")
	}
}

var (
	sha40   = regexp.MustCompile(`^[0-9a-f]{40}$`)
	repoURL = regexp.MustCompile(`^http://gitlab-ci-token:([^@]+)@127\.0\.0\.1:\d+/acme/web\.git$`)
)

// Checklist 7, 8, 10, 11: the 201 payload has exact types and what a runner needs.
func TestJobPayload(t *testing.T) {
	e := newEnv(t, Config{})
	if _, err := e.s.CreateGroup(GroupSpec{Path: "acme"}); err != nil {
		t.Fatal(err)
	}
	e.project("web", "acme", JobSpec{
		Name: "unit", Stage: "test",
		BeforeScript: []string{"echo before"}, Script: []string{"make test"}, AfterScript: []string{"echo after"},
		Variables: []VariableSpec{{Key: "SECRET_X", Value: "s3cr3t-value-123", Masked: true}, {Key: "PLAIN", Value: "1"}, {Key: "CFG", Value: "x", File: true}, {Key: "RAWV", Value: "$x", Raw: true}},
		Tags:      []string{"linux"}, Timeout: Duration(20 * time.Minute), AllowFailure: new(true), GitStrategy: "none",
	})
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken, TagList: "linux,small", Description: "r1", MaximumTimeout: 900})
	e.clock.Advance(42 * time.Second)
	r, _ := e.requestJob(tok, "")
	if r.status != 201 {
		t.Fatalf("status %d", r.status)
	}
	if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Fatalf("Content-Type %q", ct)
	}
	// Exact types: the runner's struct decodes it with no unknown or mistyped key.
	var j runnerapi.JobResponse
	dec := json.NewDecoder(bytes.NewReader(r.body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&j); err != nil {
		t.Fatalf("decode into runnerapi.JobResponse: %v\n%s", err, r.body)
	}
	// null vs []: image null, the lists empty arrays.
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(r.body, &raw); err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]string{"image": "null", "services": "[]", "artifacts": "[]", "cache": "[]", "credentials": "[]", "dependencies": "[]"} {
		if got := string(raw[k]); got != want {
			t.Errorf("%s = %s, want %s", k, got, want)
		}
	}
	if !strings.HasPrefix(string(raw["id"]), "1") || strings.HasPrefix(string(raw["id"]), `"`) {
		t.Errorf("id = %s, want a number", raw["id"])
	}

	if j.ID != 1 || j.Token == "" {
		t.Errorf("id %d token %q", j.ID, j.Token)
	}
	if j.JobInfo.Name != "unit" || j.JobInfo.Stage != "test" || j.JobInfo.ProjectID != 1 || j.JobInfo.ProjectName != "web" {
		t.Errorf("job_info %+v", j.JobInfo)
	}
	if j.JobInfo.TimeInQueueSeconds != 42 {
		t.Errorf("time_in_queue_seconds = %v, want 42 (injected clock)", j.JobInfo.TimeInQueueSeconds)
	}
	m := repoURL.FindStringSubmatch(j.GitInfo.RepoURL)
	if m == nil || m[1] != j.Token {
		t.Errorf("repo_url %q does not carry gitlab-ci-token:<job token>@", j.GitInfo.RepoURL)
	}
	if !sha40.MatchString(j.GitInfo.Sha) || !sha40.MatchString(j.GitInfo.BeforeSha) || j.GitInfo.Ref != "main" || j.GitInfo.RefType != "branch" {
		t.Errorf("git_info %+v", j.GitInfo)
	}
	if len(j.GitInfo.Refspecs) != 2 || j.GitInfo.Refspecs[1] != "+refs/heads/main:refs/remotes/origin/main" || j.GitInfo.Depth != 20 {
		t.Errorf("refspecs %v depth %d", j.GitInfo.Refspecs, j.GitInfo.Depth)
	}
	if j.RunnerInfo.Timeout != 900 {
		t.Errorf("runner_info.timeout = %d, want min(job 1200, runner max 900)", j.RunnerInfo.Timeout)
	}
	wantSteps := []runnerapi.Step{
		{Name: "script", Script: []string{"echo before", "make test"}, Timeout: 1200, When: "on_success"},
		{Name: "after_script", Script: []string{"echo after"}, Timeout: 1200, When: "always", AllowFailure: true},
	}
	if got, _ := json.Marshal(j.Steps); string(got) != mustJSON(t, wantSteps) {
		t.Errorf("steps = %s, want %s", got, mustJSON(t, wantSteps))
	}
	if !j.Features.TraceSections || !containsAll(j.Features.FailureReasons, "script_failure", "runner_system_failure", "job_execution_timeout", "unknown_failure") {
		t.Errorf("features %+v", j.Features)
	}

	vars := map[string]runnerapi.Variable{}
	for _, v := range j.Variables {
		vars[v.Key] = v
	}
	want := map[string]string{
		"CI": "true", "GITLAB_CI": "true", "CI_JOB_ID": "1", "CI_JOB_NAME": "unit", "CI_JOB_STAGE": "test",
		"CI_PROJECT_ID": "1", "CI_PROJECT_NAME": "web", "CI_PROJECT_PATH": "acme/web", "CI_PIPELINE_ID": "1",
		"CI_SERVER_URL": e.ts.URL, "CI_COMMIT_SHA": j.GitInfo.Sha, "CI_COMMIT_REF_NAME": "main",
		"CI_JOB_TOKEN": j.Token, "GIT_STRATEGY": "none", "SECRET_X": "s3cr3t-value-123", "PLAIN": "1",
	}
	for k, v := range want {
		if vars[k].Value != v {
			t.Errorf("variable %s = %q, want %q", k, vars[k].Value, v)
		}
	}
	if v := vars["CI_JOB_TOKEN"]; !v.Masked || v.Public {
		t.Errorf("CI_JOB_TOKEN %+v, want masked and not public", v)
	}
	if v := vars["SECRET_X"]; !v.Masked || v.Public {
		t.Errorf("SECRET_X %+v, want masked and not public", v)
	}
	if v := vars["PLAIN"]; v.Masked || !v.Public {
		t.Errorf("PLAIN %+v, want public", v)
	}
	if !vars["CFG"].File || !vars["RAWV"].Raw {
		t.Errorf("file/raw flags lost: %+v %+v", vars["CFG"], vars["RAWV"])
	}

	// Checklist 8: running at 201, assigned to this runner, started timestamp set.
	rec, _ := e.s.Job(1)
	if rec.Status != StatusRunning || rec.RunnerID != 1 || rec.StartedAt.IsZero() || rec.Payload == nil || rec.Payload.Token != j.Token {
		t.Errorf("after 201: %+v", rec)
	}
	// A second job token differs (fresh per job).
	e.project("other", "", jobs("x")...)
	_, j2 := e.requestJob(tok, "")
	if j2 != nil {
		t.Errorf("runner with tags linux,small took untagged job %d without run_untagged", j2.ID)
	}
	tok2 := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	j2 = e.mustJob(tok2)
	if j2.Token == j.Token {
		t.Error("job tokens repeat")
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func containsAll(list []string, want ...string) bool {
	have := map[string]bool{}
	for _, s := range list {
		have[s] = true
	}
	for _, w := range want {
		if !have[w] {
			return false
		}
	}
	return true
}

// Checklist 13, 14, 15, 16: trace PATCH.
func TestTracePatch(t *testing.T) {
	e := newEnv(t, Config{TraceUpdateInterval: 5 * time.Second})
	e.project("p", "", jobs("a", "b")...)
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	j := e.mustJob(tok)

	type step struct {
		name       string
		token      string
		rangeHdr   string // "" = none; "auto" = start..start+len-1
		start      int
		data       string
		want       int
		wantRange  string
		wantStatus string
	}
	steps := []step{
		{"first chunk, inclusive end", j.Token, "auto", 0, "hello ", 202, "0-6", "running"},
		{"second chunk", j.Token, "auto", 6, "world\n", 202, "0-12", "running"},
		{"gap ahead", j.Token, "auto", 20, "lost", 416, "0-12", "running"},
		{"overlap behind", j.Token, "auto", 3, "XXXXXXXXXXXXXXXX", 416, "0-12", "running"},
		{"resend from zero", j.Token, "auto", 0, "hello world\nmore", 416, "0-12", "running"},
		{"resume at range end", j.Token, "auto", 12, "tail", 202, "0-16", "running"},
		{"claimed end ignored", j.Token, "12-99", 16, "!", 416, "0-16", "running"},
		{"claimed end ignored ok", j.Token, "16-99", 16, "!", 202, "0-17", "running"},
		{"empty body at end", j.Token, "17-16", 17, "", 202, "0-17", "running"},
		{"missing Content-Range", j.Token, "", 0, "x", 400, "", ""},
		{"garbage Content-Range", j.Token, "abc", 0, "x", 400, "", ""},
		{"wrong job token", "nope", "auto", 17, "x", 403, "", ""},
		{"no job token", "", "auto", 17, "x", 403, "", ""},
	}
	for _, st := range steps {
		h := map[string]string{"Content-Type": "text/plain"}
		if st.token != "" {
			h[runnerapi.HeaderJobToken] = st.token
		}
		switch st.rangeHdr {
		case "":
		case "auto":
			h[runnerapi.HeaderContentRange] = rangeOf(st.start, len(st.data))
		default:
			h[runnerapi.HeaderContentRange] = st.rangeHdr
		}
		r := e.do("PATCH", "/api/v4/jobs/1/trace", h, []byte(st.data))
		if r.status != st.want {
			t.Errorf("%s: status %d, want %d (%s)", st.name, r.status, st.want, r.body)
			continue
		}
		if got := r.header.Get(runnerapi.HeaderRange); got != st.wantRange {
			t.Errorf("%s: Range %q, want %q", st.name, got, st.wantRange)
		}
		if got := r.header.Get(runnerapi.HeaderJobStatus); got != st.wantStatus {
			t.Errorf("%s: Job-Status %q, want %q", st.name, got, st.wantStatus)
		}
		if st.want == 202 || st.want == 416 {
			if got := r.header.Get(runnerapi.HeaderTraceUpdateInterval); got != "5" {
				t.Errorf("%s: interval %q, want 5", st.name, got)
			}
		}
	}
	rec, _ := e.s.Job(1)
	if string(rec.Trace) != "hello world\ntail!" {
		t.Errorf("stored trace %q, want %q (416s must not corrupt it)", rec.Trace, "hello world\ntail!")
	}
	if len(rec.Patches) != len(steps) {
		t.Errorf("recorded %d patches, want %d (every PATCH, refused ones too)", len(rec.Patches), len(steps))
	}
	for i, p := range rec.Patches {
		if i < len(steps) && (p.Status != steps[i].want || (p.Refused == "") != (p.Status == 202)) {
			t.Errorf("patch %d (%s): recorded status %d refused %q, want %d", i, steps[i].name, p.Status, p.Refused, steps[i].want)
		}
	}

	// Checklist 15: a job that is not running answers 403 with its status.
	e.finish(j, runnerapi.StateSuccess, nil)
	r := e.patch(1, j.Token, 17, []byte("late"))
	if r.status != 403 || r.header.Get(runnerapi.HeaderJobStatus) != "success" {
		t.Errorf("finished job PATCH: %d Job-Status %q", r.status, r.header.Get(runnerapi.HeaderJobStatus))
	}
	// A pending job's token is not valid yet.
	e.s.mu.Lock()
	pendingToken := e.s.jobs[2].token
	e.s.mu.Unlock()
	if r := e.patch(2, pendingToken, 0, []byte("x")); r.status != 403 || r.header.Get(runnerapi.HeaderJobStatus) != "pending" {
		t.Errorf("pending job PATCH: %d %q", r.status, r.header.Get(runnerapi.HeaderJobStatus))
	}
}

func rangeOf(start, n int) string { return fmt.Sprintf("%d-%d", start, start+n-1) }

// Checklist 16, 17, 18: job update.
func TestJobUpdate(t *testing.T) {
	e := newEnv(t, Config{})
	e.project("p", "", jobs("a", "b", "c", "d")...)
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	trace := []byte("line 1\nline 2\n")

	// Heartbeat, then success with matching checksum.
	j := e.mustJob(tok)
	r := e.update(j.ID, runnerapi.UpdateJobRequest{Token: j.Token, State: "running"})
	if r.status != 200 || r.header.Get(runnerapi.HeaderTraceUpdateInterval) != "3" || r.header.Get(runnerapi.HeaderJobStatus) != "" {
		t.Errorf("heartbeat: %d interval %q status %q", r.status, r.header.Get(runnerapi.HeaderTraceUpdateInterval), r.header.Get(runnerapi.HeaderJobStatus))
	}
	e.patch(j.ID, j.Token, 0, trace)
	r = e.update(j.ID, runnerapi.UpdateJobRequest{Token: j.Token, State: "success", Output: runnerapi.JobTraceOutput{Checksum: runnerapi.TraceChecksum(trace), Bytesize: len(trace)}})
	if r.status != 200 || r.header.Get(runnerapi.HeaderTraceUpdateInterval) == "" {
		t.Fatalf("success: %d", r.status)
	}
	rec, _ := e.s.Job(j.ID)
	if rec.Status != StatusSuccess || rec.TraceVerified == nil || !*rec.TraceVerified || rec.FinishedAt.IsZero() || len(rec.Updates) != 2 {
		t.Errorf("after success: %+v", rec)
	}
	// Final: further updates get 403 + Job-Status.
	r = e.update(j.ID, runnerapi.UpdateJobRequest{Token: j.Token, State: "failed"})
	if r.status != 403 || r.header.Get(runnerapi.HeaderJobStatus) != "success" {
		t.Errorf("update after final: %d %q", r.status, r.header.Get(runnerapi.HeaderJobStatus))
	}

	// failed with reason and exit code; checksum mismatch is recorded.
	j = e.mustJob(tok)
	e.patch(j.ID, j.Token, 0, trace)
	r = e.update(j.ID, runnerapi.UpdateJobRequest{Token: j.Token, State: "failed", FailureReason: "script_failure", ExitCode: 3,
		Output: runnerapi.JobTraceOutput{Checksum: "crc32:00000000", Bytesize: len(trace)}})
	rec, _ = e.s.Job(j.ID)
	if r.status != 200 || rec.Status != StatusFailed || rec.FailureReason != "script_failure" || rec.ExitCode != 3 || rec.TraceVerified == nil || *rec.TraceVerified {
		t.Errorf("failed: status %d rec %+v", r.status, rec)
	}

	// Unknown failure reason → unknown_failure; bad state → 400; wrong token → 403.
	j = e.mustJob(tok)
	if r := e.update(j.ID, runnerapi.UpdateJobRequest{Token: j.Token, State: "exploded"}); r.status != 400 {
		t.Errorf("bad state: %d", r.status)
	}
	if r := e.update(j.ID, runnerapi.UpdateJobRequest{Token: "wrong", State: "success"}); r.status != 403 || r.header.Get(runnerapi.HeaderJobStatus) != "" {
		t.Errorf("wrong token: %d %q", r.status, r.header.Get(runnerapi.HeaderJobStatus))
	}
	e.update(j.ID, runnerapi.UpdateJobRequest{Token: j.Token, State: "failed", FailureReason: "job_canceled"})
	if rec, _ = e.s.Job(j.ID); rec.FailureReason != "unknown_failure" {
		t.Errorf("job_canceled stored as %q, want unknown_failure", rec.FailureReason)
	}

	// Checklist 18: a final update claiming more bytes than arrived gets 202
	// until the rest is sent; then 200 and the trace verifies.
	j = e.mustJob(tok)
	e.patch(j.ID, j.Token, 0, trace[:5])
	final := runnerapi.UpdateJobRequest{Token: j.Token, State: "success", Output: runnerapi.JobTraceOutput{Checksum: runnerapi.TraceChecksum(trace), Bytesize: len(trace)}}
	r = e.update(j.ID, final)
	if r.status != 202 || r.header.Get(runnerapi.HeaderTraceUpdateInterval) == "" || e.status(j.ID) != StatusRunning {
		t.Fatalf("short trace final update: %d, job %s", r.status, e.status(j.ID))
	}
	e.patch(j.ID, j.Token, 5, trace[5:])
	if r = e.update(j.ID, final); r.status != 200 {
		t.Fatalf("final update after the rest: %d", r.status)
	}
	if rec, _ = e.s.Job(j.ID); !*rec.TraceVerified || string(rec.Trace) != string(trace) {
		t.Errorf("trace %q verified %v", rec.Trace, *rec.TraceVerified)
	}
}

// The 202 deferral is bounded: a runner that never sends the rest still finishes.
func TestFinalUpdateDeferralBounded(t *testing.T) {
	e := newEnv(t, Config{})
	e.project("p", "", jobs("a")...)
	j := e.mustJob(e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken}))
	final := runnerapi.UpdateJobRequest{Token: j.Token, State: "success", Output: runnerapi.JobTraceOutput{Bytesize: 100}}
	for i := 0; i < maxFinalDeferrals; i++ {
		if r := e.update(j.ID, final); r.status != 202 {
			t.Fatalf("attempt %d: %d, want 202", i, r.status)
		}
	}
	if r := e.update(j.ID, final); r.status != 200 {
		t.Fatalf("after %d deferrals: %d, want 200", maxFinalDeferrals, r.status)
	}
	if rec, _ := e.s.Job(j.ID); rec.Status != StatusSuccess || *rec.TraceVerified {
		t.Errorf("rec %+v", rec)
	}
}

// Checklist 19: cancellation through PATCH and PUT replies.
func TestCancelRunningJob(t *testing.T) {
	e := newEnv(t, Config{})
	e.project("p", "", jobs("a", "b")...)
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	j := e.mustJob(tok)
	if r := e.patch(j.ID, j.Token, 0, []byte("start\n")); r.header.Get(runnerapi.HeaderJobStatus) != "running" {
		t.Fatalf("before cancel: %q", r.header.Get(runnerapi.HeaderJobStatus))
	}
	if rec, err := e.s.Cancel(j.ID); err != nil || rec.Status != StatusCanceling {
		t.Fatalf("cancel: %v %+v", err, rec)
	}
	r := e.patch(j.ID, j.Token, 6, []byte("killed\n"))
	if r.status != 202 || r.header.Get(runnerapi.HeaderJobStatus) != "canceling" {
		t.Errorf("PATCH while canceling: %d %q, want 202 canceling", r.status, r.header.Get(runnerapi.HeaderJobStatus))
	}
	r = e.update(j.ID, runnerapi.UpdateJobRequest{Token: j.Token, State: "running"})
	if r.status != 200 || r.header.Get(runnerapi.HeaderJobStatus) != "canceling" {
		t.Errorf("heartbeat while canceling: %d %q", r.status, r.header.Get(runnerapi.HeaderJobStatus))
	}
	r = e.update(j.ID, runnerapi.UpdateJobRequest{Token: j.Token, State: "failed", FailureReason: "unknown_failure",
		Output: runnerapi.JobTraceOutput{Checksum: runnerapi.TraceChecksum([]byte("start\nkilled\n")), Bytesize: 13}})
	if r.status != 200 {
		t.Fatalf("final update while canceling: %d", r.status)
	}
	rec, _ := e.s.Job(j.ID)
	if rec.Status != StatusCanceled || rec.RunnerState != "failed" || rec.FailureReason != "unknown_failure" || !*rec.TraceVerified {
		t.Errorf("after final update: %+v", rec)
	}
	r = e.patch(j.ID, j.Token, 13, []byte("more"))
	if r.status != 403 || r.header.Get(runnerapi.HeaderJobStatus) != "canceled" {
		t.Errorf("PATCH after cancel: %d %q, want 403 canceled", r.status, r.header.Get(runnerapi.HeaderJobStatus))
	}
	if _, err := e.s.Cancel(j.ID); err == nil {
		t.Error("cancel of a canceled job succeeded")
	} else if !isJobState(err) {
		t.Errorf("cancel of canceled job: %v, want ErrJobState", err)
	}

	// Force cancel: a second Cancel turns canceling into canceled; the runner gets 403.
	j2 := e.mustJob(tok)
	e.s.Cancel(j2.ID)
	e.s.Cancel(j2.ID)
	r = e.update(j2.ID, runnerapi.UpdateJobRequest{Token: j2.Token, State: "running"})
	if r.status != 403 || r.header.Get(runnerapi.HeaderJobStatus) != "canceled" {
		t.Errorf("PUT after force cancel: %d %q", r.status, r.header.Get(runnerapi.HeaderJobStatus))
	}
}

func TestCancelPendingNeverHandedOut(t *testing.T) {
	e := newEnv(t, Config{})
	e.project("p", "", jobs("a", "b")...)
	if _, err := e.s.Cancel(1); err != nil {
		t.Fatal(err)
	}
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	if j := e.mustJob(tok); j.ID != 2 {
		t.Errorf("got job %d, want 2", j.ID)
	}
	if r, _ := e.requestJob(tok, ""); r.status != 204 {
		t.Errorf("canceled job handed out: %d", r.status)
	}
	if _, err := e.s.Cancel(99); err == nil || !isNotFound(err) {
		t.Errorf("cancel unknown: %v", err)
	}
}

func TestTraceSizeLimitDropsJob(t *testing.T) {
	e := newEnv(t, Config{MaxTraceBytes: 10})
	e.project("p", "", jobs("a")...)
	j := e.mustJob(e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken}))
	e.patch(j.ID, j.Token, 0, []byte("12345"))
	r := e.patch(j.ID, j.Token, 5, []byte("678901"))
	if r.status != 403 || r.header.Get(runnerapi.HeaderJobStatus) != "failed" {
		t.Errorf("over limit: %d %q", r.status, r.header.Get(runnerapi.HeaderJobStatus))
	}
	if rec, _ := e.s.Job(j.ID); rec.Status != StatusFailed || rec.FailureReason != "trace_size_exceeded" || string(rec.Trace) != "12345" {
		t.Errorf("rec %+v", rec)
	}
}

func isJobState(err error) bool { return errors.Is(err, ErrJobState) }
func isNotFound(err error) bool { return errors.Is(err, ErrNotFound) }

// Issue 17: refused trace patches and updates stay in the job record, with
// the status answered and the reason, as the package doc promises.
func TestRefusedCallsAreRecorded(t *testing.T) {
	e := newEnv(t, Config{})
	e.project("p", "", jobs("a")...)
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	j := e.mustJob(tok)

	e.patch(j.ID, "wrong-token", 0, []byte("x"))                                                                 // 403
	e.do("PATCH", "/api/v4/jobs/1/trace", map[string]string{runnerapi.HeaderJobToken: j.Token}, []byte("y"))     // 400
	e.update(j.ID, runnerapi.UpdateJobRequest{Token: "wrong-token", State: "success"})                           // 403
	e.update(j.ID, runnerapi.UpdateJobRequest{Token: j.Token, State: "bogus"})                                   // 400
	e.update(j.ID, runnerapi.UpdateJobRequest{Token: j.Token, State: "success"})                                 // 200
	e.patch(j.ID, j.Token, 0, []byte("late"))                                                                    // 403 Job-Status success
	e.update(j.ID, runnerapi.UpdateJobRequest{Token: j.Token, State: "failed", FailureReason: "script_failure"}) // 403

	rec, err := e.s.Job(j.ID)
	if err != nil {
		t.Fatal(err)
	}
	wantPatches := []int{403, 400, 403}
	if len(rec.Patches) != len(wantPatches) {
		t.Fatalf("recorded %d patches %+v, want %d", len(rec.Patches), rec.Patches, len(wantPatches))
	}
	for i, p := range rec.Patches {
		if p.Status != wantPatches[i] || p.Refused == "" || p.Size != 0 {
			t.Errorf("patch %d: %+v, want status %d with a reason and no bytes stored", i, p, wantPatches[i])
		}
	}
	if rec.Patches[1].Start != -1 || !strings.Contains(rec.Patches[1].Refused, "Content-Range") {
		t.Errorf("patch without Content-Range recorded as %+v", rec.Patches[1])
	}
	if !strings.Contains(rec.Patches[2].Refused, "not running") {
		t.Errorf("patch after the end recorded as %+v", rec.Patches[2])
	}
	wantUpdates := []int{403, 400, 200, 403}
	if len(rec.Updates) != len(wantUpdates) {
		t.Fatalf("recorded %d updates %+v, want %d", len(rec.Updates), rec.Updates, len(wantUpdates))
	}
	for i, u := range rec.Updates {
		if u.Status != wantUpdates[i] || (u.Refused == "") != (u.Status == 200) {
			t.Errorf("update %d: %+v, want status %d", i, u, wantUpdates[i])
		}
	}
	if rec.Updates[3].State != "failed" || rec.Updates[3].FailureReason != "script_failure" {
		t.Errorf("refused update lost its content: %+v", rec.Updates[3])
	}
	if rec.Status != StatusSuccess {
		t.Errorf("refused calls changed the job: status %s", rec.Status)
	}
}
