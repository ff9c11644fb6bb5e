package coordinator

import (
	"encoding/json"
	"fmt"
	"net/http"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// outcome is how the test runner finishes a job: state, exit code, reason.
type outcome struct {
	state  string
	exit   int
	reason string
}

var ok = outcome{state: runnerapi.StateSuccess}

func fail(exit int) outcome {
	return outcome{state: runnerapi.StateFailed, exit: exit, reason: runnerapi.FailureScriptFailure}
}

// runPipelineFile applies a pipeline file and plays a runner that finishes
// every job it gets with decide(name, attempt). It returns the names in the
// order the jobs were taken, and the final statuses of each name, oldest first.
func runPipelineFile(t *testing.T, src string, decide func(name string, attempt int) outcome) ([]string, map[string][]string, *env) {
	t.Helper()
	e := newEnv(t, Config{})
	f, err := ParsePipelineFile("test.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.s.Apply(f); err != nil {
		t.Fatal(err)
	}
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	var order []string
	attempts := map[string]int{}
	for range 100 {
		e.clock.Advance(time.Second)
		r, j := e.requestJob(tok, "")
		if j == nil {
			if r.status != http.StatusNoContent {
				t.Fatalf("job request: %d %s", r.status, r.body)
			}
			break
		}
		name := j.JobInfo.Name
		order = append(order, name)
		o := decide(name, attempts[name])
		attempts[name]++
		req := runnerapi.UpdateJobRequest{Token: j.Token, State: o.state, ExitCode: o.exit, FailureReason: o.reason}
		if r := e.update(j.ID, req); r.status != http.StatusOK {
			t.Fatalf("update %s: %d", name, r.status)
		}
	}
	statuses := map[string][]string{}
	for _, rec := range e.s.Jobs() {
		if !IsFinal(rec.Status) {
			t.Errorf("job %d %s left %s", rec.ID, rec.Name, rec.Status)
		}
		statuses[rec.Name] = append(statuses[rec.Name], rec.Status)
	}
	return order, statuses, e
}

func byName(m map[string]outcome) func(string, int) outcome {
	return func(name string, _ int) outcome {
		if o, found := m[name]; found {
			return o
		}
		return ok
	}
}

func TestPipelineWhenAndAllowFailure(t *testing.T) {
	src := `
projects:
  - name: p
    pipelines:
      - stages: [build, test, cleanup]
        jobs:
          - {name: build, stage: build, script: [make]}
          - {name: flaky, stage: build, script: [x], allow_failure: true}
          - {name: codes, stage: build, script: [x], allow_failure_exit_codes: [3]}
          - {name: unit, stage: test, script: [x]}
          - {name: notify, stage: test, script: [x], when: on_failure}
          - {name: clean, stage: cleanup, script: [x], when: always}
`
	tests := []struct {
		name     string
		runs     map[string]outcome
		want     map[string]string
		pipeline string
	}{
		{"all pass", nil, map[string]string{"build": "success", "flaky": "success", "codes": "success", "unit": "success", "notify": "skipped", "clean": "success"}, "success"},
		{"allowed failures", map[string]outcome{"flaky": fail(1), "codes": fail(3)},
			map[string]string{"flaky": "failed", "codes": "failed", "unit": "success", "notify": "skipped", "clean": "success"}, "success"},
		{"exit code not allowed", map[string]outcome{"codes": fail(1)},
			map[string]string{"codes": "failed", "unit": "skipped", "notify": "success", "clean": "success"}, "failed"},
		{"build fails", map[string]outcome{"build": fail(2)},
			map[string]string{"build": "failed", "unit": "skipped", "notify": "success", "clean": "success"}, "failed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, st, e := runPipelineFile(t, src, byName(tt.runs))
			r := e.do("GET", "/-/mayfly/pipelines/1", nil, nil)
			var pl PipelineRecord
			if err := json.Unmarshal(r.body, &pl); err != nil || r.status != 200 || pl.Status != tt.pipeline || len(pl.JobIDs) != 6 {
				t.Errorf("admin pipeline: %d %s, want status %s", r.status, r.body, tt.pipeline)
			}
			for name, want := range tt.want {
				if got := st[name]; len(got) != 1 || got[0] != want {
					t.Errorf("%s: %v, want %s", name, got, want)
				}
			}
			for _, rec := range e.s.Jobs() {
				allowed := rec.Name == "flaky" || (rec.Name == "codes" && tt.runs["codes"].exit == 3)
				if rec.Status == "failed" && rec.AllowFailure != allowed {
					t.Errorf("%s: allow_failure %v, want %v", rec.Name, rec.AllowFailure, allowed)
				}
			}
		})
	}
}

func TestPipelineNeedsRunOutOfStageOrder(t *testing.T) {
	src := `
projects:
  - name: p
    pipelines:
      - stages: [build, test, deploy]
        jobs:
          - {name: compile, stage: build, script: [x]}
          - {name: lint, stage: test, script: [x], needs: []}
          - {name: unit, stage: test, script: [x]}
          - {name: docs, stage: deploy, script: [x], needs: [{job: lint}]}
          - {name: ship, stage: deploy, script: [x], needs: [{job: unit}]}
`
	order, st, e := runPipelineFile(t, src, byName(map[string]outcome{"unit": fail(1)}))
	// lint needs nothing: pending with compile at creation, taken by id order after it.
	if got := order[:2]; !reflect.DeepEqual(got, []string{"compile", "lint"}) {
		t.Errorf("first jobs %v, want compile, lint", got)
	}
	// docs needs only lint: it is queued before unit (an earlier stage) finishes.
	recs := map[string]JobRecord{}
	for _, r := range e.s.Jobs() {
		recs[r.Name] = r
	}
	if !recs["docs"].QueuedAt.Before(recs["unit"].FinishedAt) {
		t.Errorf("docs queued at %v, unit finished at %v: docs must not wait for unit", recs["docs"].QueuedAt, recs["unit"].FinishedAt)
	}
	if st["ship"][0] != "skipped" || st["docs"][0] != "success" {
		t.Errorf("statuses %v", st)
	}
}

func TestPipelineManualJobs(t *testing.T) {
	src := `
projects:
  - name: p
    pipelines:
      - stages: [build, deploy, verify]
        jobs:
          - {name: build, stage: build, script: [x]}
          - {name: deploy, stage: deploy, script: [x], when: manual}
          - {name: after-optional, stage: verify, script: [x]}
      - stages: [build, deploy]
        jobs:
          - {name: gate, stage: build, script: [x], when: manual, allow_failure: false}
          - {name: after-gate, stage: deploy, script: [x]}
`
	order, st, _ := runPipelineFile(t, src, byName(nil))
	if slices.Contains(order, "deploy") || slices.Contains(order, "gate") {
		t.Errorf("manual jobs ran: %v", order)
	}
	want := map[string]string{"deploy": "manual", "after-optional": "success", "gate": "manual", "after-gate": "skipped"}
	for name, w := range want {
		if st[name][0] != w {
			t.Errorf("%s: %v, want %s", name, st[name], w)
		}
	}
}

func TestPipelineRetry(t *testing.T) {
	src := `
projects:
  - name: p
    pipelines:
      - stages: [build, test]
        jobs:
          - {name: flaky, stage: build, script: [x], retry: {max: 2}}
          - {name: system-only, stage: build, script: [x], retry: {max: 2, when: [runner_system_failure]}}
          - {name: exit-137, stage: build, script: [x], retry: {max: 1, exit_codes: [137]}}
          - {name: unit, stage: test, script: [x], when: always}
`
	decide := func(name string, attempt int) outcome {
		switch {
		case name == "flaky" && attempt < 2:
			return fail(1)
		case name == "system-only":
			return fail(1)
		case name == "exit-137" && attempt == 0:
			return fail(137)
		}
		return ok
	}
	_, st, e := runPipelineFile(t, src, decide)
	want := map[string][]string{
		"flaky":       {"failed", "failed", "success"},
		"system-only": {"failed"},
		"exit-137":    {"failed", "success"},
		"unit":        {"success"},
	}
	for name, w := range want {
		if !reflect.DeepEqual(st[name], w) {
			t.Errorf("%s: %v, want %v", name, st[name], w)
		}
	}
	var flaky []JobRecord
	for _, rec := range e.s.Jobs() {
		if rec.Name == "flaky" {
			flaky = append(flaky, rec)
		}
	}
	if !flaky[0].Retried || !flaky[1].Retried || flaky[2].Retried || flaky[1].RetryOf != flaky[0].ID || flaky[2].RetryOf != flaky[1].ID {
		t.Errorf("retry chain: %+v", flaky)
	}
}

func TestPipelineFileRefusesBadGraphs(t *testing.T) {
	tests := []struct{ name, jobs, want string }{
		{"unknown need", `[{name: a, script: [x], needs: [{job: b}]}]`, `jobs[0].needs[0]: job "b" is not in this pipeline`},
		{"later stage", `[{name: a, stage: build, script: [x], needs: [{job: b}]}, {name: b, stage: test, script: [x]}]`, "later stage"},
		{"cycle", `[{name: a, script: [x], needs: [{job: b}]}, {name: b, script: [x], needs: [{job: a}]}]`, "cycle"},
		{"dependency same stage", `[{name: a, script: [x]}, {name: b, script: [x], dependencies: [a]}]`, "not in an earlier stage"},
		{"bad when", `[{name: a, script: [x], when: later}]`, "when"},
		{"bad retry", `[{name: a, script: [x], retry: {max: 5}}]`, "retry.max"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := fmt.Sprintf("projects:\n  - name: p\n    pipelines:\n      - jobs: %s\n", tt.jobs)
			_, err := ParsePipelineFile("bad.yaml", []byte(src))
			if err == nil || !contains(err.Error(), tt.want) || !contains(err.Error(), "bad.yaml: projects[0].pipelines[0]") {
				t.Errorf("err %v, want %q", err, tt.want)
			}
		})
	}
}

func contains(s, sub string) bool {
	return len(sub) == 0 || (len(s) >= len(sub) && (s[:len(sub)] == sub || contains(s[1:], sub)))
}

func TestPayloadCarriesJobKeywords(t *testing.T) {
	src := `
projects:
  - name: web
    pipelines:
      - stages: [build, test]
        protected: true
        jobs:
          - {name: compile, stage: build, script: [make]}
          - {name: lint, stage: build, script: [x]}
          - name: unit
            stage: test
            script: [make test]
            image: {name: "$CI_REGISTRY/root/images/go:1", entrypoint: [""], pull_policy: [if-not-present]}
            services:
              - {name: "$CI_REGISTRY/root/images/kv:1", alias: db, command: [serve], variables: [{key: MODE, value: test}]}
            artifacts:
              paths: [bin/]
              exclude: [bin/*.o]
              when: always
              expire_in: 1 day
              reports: [{type: junit, paths: [report.xml]}]
            cache:
              - {key: gems, paths: [vendor/], policy: pull}
              - {paths: [x/], unprotect: true}
            pre_get_sources_script: [echo before clone]
          - {name: deps-none, stage: test, script: [x], dependencies: []}
          - {name: needs-lint, stage: test, script: [x], needs: [{job: compile, no_artifacts: true}, {job: lint}]}
`
	e := newEnv(t, Config{})
	f, err := ParsePipelineFile("p.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.s.Apply(f); err != nil {
		t.Fatal(err)
	}
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	compile, lint := e.mustJob(tok), e.mustJob(tok)
	e.finish(compile, runnerapi.StateSuccess, nil)
	e.finish(lint, runnerapi.StateSuccess, nil)
	_, unitBody := e.requestJob(tok, "")
	if unitBody == nil || unitBody.JobInfo.Name != "unit" {
		t.Fatalf("want unit, got %+v", unitBody)
	}
	// Decode the raw JSON, to check the wire shape and not only our struct.
	rec, _ := e.s.Job(unitBody.ID)
	raw, _ := json.Marshal(rec.Payload)
	var wire map[string]json.RawMessage
	if err := json.Unmarshal(raw, &wire); err != nil {
		t.Fatal(err)
	}
	checks := map[string]string{
		"image":        `{"name":"$CI_REGISTRY/root/images/go:1","entrypoint":[""],"pull_policy":["if-not-present"]}`,
		"services":     `[{"name":"$CI_REGISTRY/root/images/kv:1","alias":"db","command":["serve"],"variables":[{"key":"MODE","value":"test","public":false,"file":false,"masked":false,"raw":false}]}]`,
		"artifacts":    `[{"name":"","untracked":false,"paths":["bin/"],"exclude":["bin/*.o"],"when":"always","artifact_type":"archive","artifact_format":"zip","expire_in":"1 day"},{"name":"junit.xml","untracked":false,"paths":["report.xml"],"when":"always","artifact_type":"junit","artifact_format":"gzip","expire_in":"1 day"}]`,
		"cache":        `[{"key":"gems-protected","untracked":false,"policy":"pull","paths":["vendor/"],"when":"on_success","fallback_keys":[]},{"key":"default-non_protected","untracked":false,"policy":"pull-push","paths":["x/"],"when":"on_success","fallback_keys":[]}]`,
		"hooks":        `[{"name":"pre_get_sources_script","script":["echo before clone"]}]`,
		"credentials":  `[]`,
		"dependencies": fmt.Sprintf(`[{"id":%d,"token":%q,"name":"compile"},{"id":%d,"token":%q,"name":"lint"}]`, compile.ID, unitBody.Token, lint.ID, unitBody.Token),
	}
	for k, want := range checks {
		if got := string(wire[k]); got != want {
			t.Errorf("%s:\n got %s\nwant %s", k, got, want)
		}
	}
	vars := map[string]string{}
	for _, v := range unitBody.Variables {
		vars[v.Key] = v.Value
	}
	for k, want := range map[string]string{"CI_JOB_IMAGE": "$CI_REGISTRY/root/images/go:1", "CI_COMMIT_REF_PROTECTED": "true", "CI_NODE_TOTAL": "1",
		"CI_PIPELINE_SOURCE": "push", "CI_DEFAULT_BRANCH": "main", "CI_JOB_NAME_SLUG": "unit", "CI_PROJECT_PATH_SLUG": "root-web"} {
		if vars[k] != want {
			t.Errorf("%s = %q, want %q", k, vars[k], want)
		}
	}
	if _, set := vars["CI_REGISTRY"]; set {
		t.Error("CI_REGISTRY set without a registry")
	}
	// dependencies: [] downloads nothing; needs without artifacts are left out.
	for _, name := range []string{"deps-none", "needs-lint"} {
		_, j := e.requestJob(tok, "")
		if j == nil {
			t.Fatalf("no job for %s", name)
		}
		var got []string
		for _, d := range j.Dependencies {
			got = append(got, d.Name)
		}
		want := map[string][]string{"deps-none": nil, "needs-lint": {"lint"}}[j.JobInfo.Name]
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s dependencies %v, want %v", j.JobInfo.Name, got, want)
		}
	}
}
