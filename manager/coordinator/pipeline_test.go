package coordinator

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

const demoYAML = `
groups:
  - path: acme
    registration_token: grp-token-1
  - path: acme/platform
projects:
  - name: web
    group: acme/platform
    registration_token: prj-token-1
    pipelines:
      - ref: v1.2.0
        ref_type: tag
        stages: [build, test]
        variables:
          - {key: GIT_STRATEGY, value: none}
        before_script: [echo setup]
        jobs:
          - name: compile
            stage: build
            script: [make]
            tags: [linux, small]
            timeout: 10m
          - name: unit
            script: [make test]
            after_script: [echo bye]
            timeout: 900
            allow_failure: true
            variables:
              - key: TOKEN
                value: s3cr3t-value
                masked: true
  - name: api
    shared_runners: false
    pipelines:
      - jobs:
          - name: only
            script: ["true"]
            git_strategy: fetch
`

func TestParsePipelineFileYAMLAndJSON(t *testing.T) {
	f, err := ParsePipelineFile("demo.yaml", []byte(demoYAML))
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, Config{})
	res, err := e.s.Apply(f)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Groups) != 2 || len(res.Projects) != 2 || len(res.Pipelines) != 2 {
		t.Fatalf("result %+v", res)
	}
	if res.Groups[0].RegistrationToken != "grp-token-1" || res.Groups[1].ParentID != res.Groups[0].ID {
		t.Errorf("groups %+v", res.Groups)
	}
	if res.Projects[0].Path != "acme/platform/web" || res.Projects[0].RegistrationToken != "prj-token-1" || res.Projects[1].SharedRunners {
		t.Errorf("projects %+v", res.Projects)
	}
	if got := res.Pipelines[0].JobIDs; len(got) != 2 {
		t.Fatalf("pipeline jobs %v", got)
	}
	// Stage order: unit waits for compile; the api job is pending at once.
	if e.status(1) != StatusPending || e.status(2) != StatusCreated || e.status(3) != StatusPending {
		t.Errorf("statuses %s %s %s", e.status(1), e.status(2), e.status(3))
	}
	// The group runner of acme reaches the subgroup's project.
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: "grp-token-1", TagList: "linux,small"})
	j := e.mustJob(tok)
	if j.JobInfo.Name != "compile" || j.RunnerInfo.Timeout != 600 || j.GitInfo.RefType != "tag" || j.GitInfo.Refspecs[1] != "+refs/tags/v1.2.0:refs/tags/v1.2.0" {
		t.Errorf("compile payload %+v", j)
	}
	if j.Steps[0].Script[0] != "echo setup" || len(j.Steps) != 1 {
		t.Errorf("steps %+v", j.Steps)
	}
	e.finish(j, runnerapi.StateSuccess, nil)
	untagged := e.register(runnerapi.RegisterRunnerRequest{Token: "prj-token-1"})
	j = e.mustJob(untagged)
	if j.JobInfo.Name != "unit" || j.RunnerInfo.Timeout != 900 || len(j.Steps) != 2 || j.Steps[1].Name != "after_script" {
		t.Errorf("unit payload %+v", j)
	}

	// The same pipeline as JSON.
	jsonDoc := `{"projects":[{"name":"p","pipelines":[{"jobs":[{"name":"a","script":["x"],"timeout":"90s","variables":[{"key":"K","value":"v","file":true}]}]}]}]}`
	jf, err := ParsePipelineFile("demo.json", []byte(jsonDoc))
	if err != nil {
		t.Fatal(err)
	}
	if got := time.Duration(jf.Projects[0].Pipelines[0].Jobs[0].Timeout); got != 90*time.Second {
		t.Errorf("JSON timeout %v", got)
	}
	// YAML reads JSON too.
	if _, err := ParsePipelineFile("demo.yml", []byte(jsonDoc)); err != nil {
		t.Errorf("JSON through the YAML reader: %v", err)
	}
}

func TestPipelineFileErrors(t *testing.T) {
	job := func(extra string) string {
		return "projects:\n  - name: p\n    pipelines:\n      - jobs:\n          - name: a\n            script: [x]\n" + extra
	}
	tests := []struct {
		name, file, doc string
		wantField       string // must appear in the error
	}{
		{"empty", "p.yaml", "", "document is empty"},
		{"no projects", "p.yaml", "projects: []\n", "projects"},
		{"unknown key", "p.yaml", job("            scirpt: [y]\n"), "field scirpt not found"},
		{"unknown key json", "p.json", `{"projects":[{"name":"p","colour":1}]}`, `unknown field "colour"`},
		{"missing script", "p.yaml", "projects:\n  - name: p\n    pipelines:\n      - jobs:\n          - name: a\n", "projects[0].pipelines[0].jobs[0].script"},
		{"missing name", "p.yaml", "projects:\n  - pipelines: []\n", "projects[0].name"},
		{"bad sha", "p.yaml", "projects:\n  - name: p\n    pipelines:\n      - sha: abc\n        jobs: [{name: a, script: [x]}]\n", "projects[0].pipelines[0].sha"},
		{"unknown stage", "p.yaml", job("            stage: lint\n"), "projects[0].pipelines[0].jobs[0].stage"},
		{"duplicate job", "p.yaml", job("          - name: a\n            script: [y]\n"), "projects[0].pipelines[0].jobs[1].name"},
		{"short masked", "p.yaml", job("            variables: [{key: K, value: short, masked: true}]\n"), "projects[0].pipelines[0].jobs[0].variables[0].value"},
		{"bad var key", "p.yaml", job("            variables: [{key: 1A, value: v}]\n"), "jobs[0].variables[0].key"},
		{"bad timeout", "p.yaml", job("            timeout: soon\n"), "timeout \"soon\""},
		{"bad git strategy", "p.yaml", job("            git_strategy: rsync\n"), "jobs[0].git_strategy"},
		{"no jobs", "p.yaml", "projects:\n  - name: p\n    pipelines:\n      - ref: main\n", "projects[0].pipelines[0].jobs"},
		{"bad ref type", "p.yaml", "projects:\n  - name: p\n    pipelines:\n      - ref_type: commit\n        jobs: [{name: a, script: [x]}]\n", "ref_type"},
		{"bad group path", "p.yaml", "groups:\n  - path: a//b\n", "groups[0].path"},
		{"comma tag", "p.yaml", job("            tags: [\"a,b\"]\n"), "jobs[0].tags[0]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParsePipelineFile(tt.file, []byte(tt.doc))
			if err == nil {
				t.Fatal("no error")
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("error %v is not ErrInvalid", err)
			}
			if !strings.HasPrefix(err.Error(), tt.file+": ") || !strings.Contains(err.Error(), tt.wantField) {
				t.Errorf("error %q does not name file %s and %q", err, tt.file, tt.wantField)
			}
		})
	}
}

func TestApplyChecksAgainstModel(t *testing.T) {
	e := newEnv(t, Config{})
	dir := t.TempDir()
	write := func(name, doc string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(doc), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	first := write("one.yaml", "projects:\n  - name: p\n    registration_token: tok-a\n    pipelines:\n      - jobs: [{name: a, script: [x]}]\n")
	if _, err := e.s.ApplyFile(first); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, doc, want string
	}{
		{"missing group", "projects:\n  - name: q\n    group: nope\n", "projects[0].group"},
		{"missing parent group", "groups:\n  - path: a/b\n", "groups[0].path"},
		{"token clash", "projects:\n  - name: q\n    registration_token: tok-a\n", "projects[0].registration_token"},
		{"instance token", "projects:\n  - name: q\n    registration_token: reg-token-xyz\n", "instance registration token"},
		{"existing project other token", "projects:\n  - name: p\n    registration_token: tok-b\n", "exists with another token"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := write(strings.ReplaceAll(tt.name, " ", "-")+".yaml", tt.doc)
			_, err := e.s.ApplyFile(path)
			if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), path) {
				t.Fatalf("error %v, want it to name %s and %q", err, path, tt.want)
			}
			if n := len(e.s.Projects()); n != 1 {
				t.Errorf("failed apply changed the model: %d projects", n)
			}
		})
	}
	// Reusing an existing project enqueues another pipeline into it.
	res, err := e.s.ApplyFile(write("again.yaml", "projects:\n  - name: p\n    pipelines:\n      - jobs: [{name: b, script: [y]}]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if res.Projects[0].ID != 1 || res.Pipelines[0].IID != 2 || len(e.s.Jobs()) != 2 {
		t.Errorf("reuse: %+v", res)
	}
	if _, err := e.s.ApplyFile(filepath.Join(dir, "missing.yaml")); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}

// The shipped demo file loads and runs to completion through the HTTP API.
func TestDemoPipelineFile(t *testing.T) {
	e := newEnv(t, Config{})
	res, err := e.s.ApplyFile("testdata/demo-pipeline.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Pipelines) != 2 || len(e.s.Jobs()) != 5 {
		t.Fatalf("applied %+v", res)
	}
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: "demo-group-token"})
	for i := 0; i < 5; i++ {
		j := e.mustJob(tok)
		state := runnerapi.StateSuccess
		if j.JobInfo.Name == "flaky" {
			state = runnerapi.StateFailed
		}
		e.finish(j, state, []byte("log of "+j.JobInfo.Name+"\n"))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := e.s.WaitAllFinished(ctx); err != nil {
		t.Fatal(err)
	}
	for _, rec := range e.s.Jobs() {
		want := StatusSuccess
		if rec.Name == "flaky" {
			want = StatusFailed
		}
		if rec.Status != want || !*rec.TraceVerified {
			t.Errorf("%s: %s verified %v", rec.Name, rec.Status, *rec.TraceVerified)
		}
	}
}
