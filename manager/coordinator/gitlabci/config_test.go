package gitlabci

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

// branchEnv is a push pipeline on branch main.
var branchEnv = Env{Vars: map[string]string{
	"CI_COMMIT_BRANCH": "main", "CI_COMMIT_REF_NAME": "main", "CI_PIPELINE_SOURCE": "push", "CI_DEFAULT_BRANCH": "main",
}}

func mustParse(t *testing.T, src string) *Config {
	t.Helper()
	cfg, err := Parse(".gitlab-ci.yml", []byte(src), Options{})
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return cfg
}

func mustPlan(t *testing.T, src string, env Env) *Plan {
	t.Helper()
	plan, err := mustParse(t, src).Evaluate(env)
	if err != nil {
		t.Fatalf("Evaluate: %v", err)
	}
	return plan
}

func jobNamed(t *testing.T, plan *Plan, name string) *Job {
	t.Helper()
	for _, j := range plan.Jobs {
		if j.Name == name {
			return j
		}
	}
	var names []string
	for _, j := range plan.Jobs {
		names = append(names, j.Name)
	}
	t.Fatalf("no job %q in %v", name, names)
	return nil
}

func names(plan *Plan) []string {
	var out []string
	for _, j := range plan.Jobs {
		out = append(out, j.Name)
	}
	return out
}

func vars(vs []Variable) map[string]string {
	m := map[string]string{}
	for _, v := range vs {
		m[v.Key] = v.Value
	}
	return m
}

func TestStagesAndDefaults(t *testing.T) {
	plan := mustPlan(t, `
stages: [build, test]
compile:
  stage: build
  script: make
unit:
  script: [make test]
`, branchEnv)
	if want := []string{".pre", "build", "test", ".post"}; !reflect.DeepEqual(plan.Stages, want) {
		t.Errorf("stages %v, want %v", plan.Stages, want)
	}
	if j := jobNamed(t, plan, "unit"); j.Stage != "test" || j.When != "on_success" || !reflect.DeepEqual(j.Script, []string{"make test"}) {
		t.Errorf("unit: %+v", j)
	}
	if j := jobNamed(t, plan, "compile"); j.Stage != "build" || !reflect.DeepEqual(j.Script, []string{"make"}) {
		t.Errorf("compile: %+v", j)
	}
	// Without stages: GitLab's default stages.
	plan = mustPlan(t, "a:\n  script: x\n", branchEnv)
	if want := []string{".pre", "build", "test", "deploy", ".post"}; !reflect.DeepEqual(plan.Stages, want) {
		t.Errorf("default stages %v, want %v", plan.Stages, want)
	}
}

func TestDefaultKeywordAndGlobals(t *testing.T) {
	plan := mustPlan(t, `
image: debian:old          # deprecated global, overridden by default:
default:
  image: {name: "$CI_REGISTRY/debian:bookworm", entrypoint: [""], pull_policy: if-not-present}
  before_script: [echo before]
  after_script: [echo after]
  tags: [linux]
  timeout: 30 minutes
  retry: 1
  services: [redis:7]
  cache: {paths: [vendor/]}
  artifacts: {paths: [out/]}
plain:
  script: echo plain
own:
  image: alpine
  tags: []
  before_script: []
  script: echo own
noinherit:
  inherit: {default: [tags]}
  script: echo x
`, branchEnv)
	p := jobNamed(t, plan, "plain")
	if p.Image == nil || p.Image.Name != "$CI_REGISTRY/debian:bookworm" || !reflect.DeepEqual(p.Image.Entrypoint, []string{""}) || !reflect.DeepEqual(p.Image.PullPolicy, []string{"if-not-present"}) {
		t.Errorf("default image: %+v", p.Image)
	}
	if !reflect.DeepEqual(p.BeforeScript, []string{"echo before"}) || !reflect.DeepEqual(p.AfterScript, []string{"echo after"}) ||
		!reflect.DeepEqual(p.Tags, []string{"linux"}) || p.Timeout != 30*time.Minute || p.Retry.Max != 1 ||
		len(p.Services) != 1 || p.Services[0].Name != "redis:7" || len(p.Cache) != 1 || p.Artifacts == nil {
		t.Errorf("defaults not applied: %+v", p)
	}
	o := jobNamed(t, plan, "own")
	if o.Image.Name != "alpine" || len(o.Tags) != 0 || len(o.BeforeScript) != 0 || !reflect.DeepEqual(o.AfterScript, []string{"echo after"}) {
		t.Errorf("job keys must replace default ones: %+v", o)
	}
	n := jobNamed(t, plan, "noinherit")
	if n.Image != nil || !reflect.DeepEqual(n.Tags, []string{"linux"}) || n.BeforeScript != nil {
		t.Errorf("inherit:default [tags]: %+v", n)
	}
}

func TestVariables(t *testing.T) {
	plan := mustPlan(t, `
variables:
  GLOBAL: g
  NUM: 010
  BOOL: true
  OVERRIDE: global
  RAW: {value: "$NOT_EXPANDED", expand: false, description: shown in the UI}
a:
  variables:
    OVERRIDE: job
    JOB_ONLY: j
  script: env
b:
  inherit: {variables: [GLOBAL]}
  script: env
c:
  inherit: {variables: false}
  script: env
`, branchEnv)
	a := vars(jobNamed(t, plan, "a").Variables)
	want := map[string]string{"GLOBAL": "g", "NUM": "010", "BOOL": "true", "OVERRIDE": "job", "RAW": "$NOT_EXPANDED", "JOB_ONLY": "j"}
	if !reflect.DeepEqual(a, want) {
		t.Errorf("a variables %v, want %v", a, want)
	}
	for _, v := range jobNamed(t, plan, "a").Variables {
		if (v.Key == "RAW") != v.Raw {
			t.Errorf("variable %s raw=%v", v.Key, v.Raw)
		}
	}
	if b := vars(jobNamed(t, plan, "b").Variables); !reflect.DeepEqual(b, map[string]string{"GLOBAL": "g"}) {
		t.Errorf("inherit:variables [GLOBAL]: %v", b)
	}
	if c := jobNamed(t, plan, "c").Variables; len(c) != 0 {
		t.Errorf("inherit:variables false: %v", c)
	}
}

func TestScriptsAnchorsExtendsReference(t *testing.T) {
	plan := mustPlan(t, `
.defaults: &defaults
  tags: [docker]
  variables: {A: "1", B: "1"}
.setup:
  script:
    - echo setup one
    - echo setup two
.base:
  <<: *defaults
  stage: build
  before_script: [echo base]
.middle:
  extends: .base
  variables: {B: "2", C: "2"}
job:
  extends: [.middle]
  variables: {C: "3"}
  script:
    - !reference [.setup, script]
    - echo job
anchored:
  <<: *defaults
  script: &s [echo anchored]
reuse:
  script: *s
`, branchEnv)
	j := jobNamed(t, plan, "job")
	if j.Stage != "build" || !reflect.DeepEqual(j.Tags, []string{"docker"}) || !reflect.DeepEqual(j.BeforeScript, []string{"echo base"}) {
		t.Errorf("extends chain: %+v", j)
	}
	if got := vars(j.Variables); !reflect.DeepEqual(got, map[string]string{"A": "1", "B": "2", "C": "3"}) {
		t.Errorf("extends deep-merges variables: %v", got)
	}
	if !reflect.DeepEqual(j.Script, []string{"echo setup one", "echo setup two", "echo job"}) {
		t.Errorf("!reference in script: %v", j.Script)
	}
	if a := jobNamed(t, plan, "anchored"); !reflect.DeepEqual(a.Tags, []string{"docker"}) || !reflect.DeepEqual(jobNamed(t, plan, "reuse").Script, []string{"echo anchored"}) {
		t.Errorf("anchors and merge keys: %+v", a)
	}
	for _, n := range names(plan) {
		if strings.HasPrefix(n, ".") {
			t.Errorf("hidden job %s in the pipeline", n)
		}
	}
}

func TestArtifactsAndCache(t *testing.T) {
	plan := mustPlan(t, `
build:
  script: make
  artifacts:
    name: bin-$CI_COMMIT_REF_SLUG
    paths: [bin/, dist/]
    exclude: [bin/*.o]
    untracked: false
    when: always
    expire_in: 1 week
    reports:
      junit: report.xml
      dotenv: [build.env]
      coverage_report: {coverage_format: cobertura, path: cov.xml}
  cache:
    - key: gems
      paths: [vendor/]
      policy: pull
      when: always
      fallback_keys: [gems-main]
    - key: {files: [go.sum], prefix: go}
      paths: [.go/]
      untracked: true
      unprotect: true
    - paths: [x/]
`, branchEnv)
	j := jobNamed(t, plan, "build")
	want := &Artifacts{Name: "bin-$CI_COMMIT_REF_SLUG", Paths: []string{"bin/", "dist/"}, Exclude: []string{"bin/*.o"}, When: "always", ExpireIn: "1 week",
		Reports: []Report{{Type: "junit", Paths: []string{"report.xml"}}, {Type: "dotenv", Paths: []string{"build.env"}}, {Type: "cobertura", Paths: []string{"cov.xml"}}}}
	if !reflect.DeepEqual(j.Artifacts, want) {
		t.Errorf("artifacts\n got %+v\nwant %+v", j.Artifacts, want)
	}
	wantCache := []Cache{
		{Key: "gems", Paths: []string{"vendor/"}, Policy: "pull", When: "always", FallbackKeys: []string{"gems-main"}},
		{KeyFiles: []string{"go.sum"}, KeyPrefix: "go", Paths: []string{".go/"}, Untracked: true, Unprotect: true},
		{Paths: []string{"x/"}},
	}
	if !reflect.DeepEqual(j.Cache, wantCache) {
		t.Errorf("cache\n got %+v\nwant %+v", j.Cache, wantCache)
	}
}

func TestImageAndServices(t *testing.T) {
	plan := mustPlan(t, `
a:
  image: $CI_REGISTRY/root/images/debian:bookworm
  services:
    - $CI_REGISTRY/root/images/kv:1
    - name: $CI_REGISTRY/root/images/postgres:15
      alias: db,database
      entrypoint: [/entry.sh]
      command: [serve, --fast]
      variables: {POSTGRES_DB: app}
      pull_policy: [always, if-not-present]
  script: ping -c1 db
`, branchEnv)
	j := jobNamed(t, plan, "a")
	if j.Image.Name != "$CI_REGISTRY/root/images/debian:bookworm" {
		t.Errorf("image %+v", j.Image)
	}
	want := []Image{{Name: "$CI_REGISTRY/root/images/kv:1"}, {Name: "$CI_REGISTRY/root/images/postgres:15", Alias: "db,database", Entrypoint: []string{"/entry.sh"},
		Command: []string{"serve", "--fast"}, Variables: []Variable{{Key: "POSTGRES_DB", Value: "app"}}, PullPolicy: []string{"always", "if-not-present"}}}
	if !reflect.DeepEqual(j.Services, want) {
		t.Errorf("services\n got %+v\nwant %+v", j.Services, want)
	}
}

func TestWhenAllowFailureRetryTimeoutTags(t *testing.T) {
	plan := mustPlan(t, `
a: {script: x, when: on_failure, allow_failure: true, tags: [linux, small], timeout: 1h 30m}
b: {script: x, when: always, allow_failure: {exit_codes: [3, 4]}, retry: {max: 2, when: [script_failure, runner_system_failure], exit_codes: 137}}
c: {script: x, when: manual}
d: {script: x, when: manual, allow_failure: false, retry: 2, timeout: "600"}
`, branchEnv)
	a, b, c, d := jobNamed(t, plan, "a"), jobNamed(t, plan, "b"), jobNamed(t, plan, "c"), jobNamed(t, plan, "d")
	if a.When != "on_failure" || !a.AllowFailure || !reflect.DeepEqual(a.Tags, []string{"linux", "small"}) || a.Timeout != 90*time.Minute {
		t.Errorf("a: %+v", a)
	}
	if b.When != "always" || b.AllowFailure || !reflect.DeepEqual(b.AllowFailureExitCodes, []int{3, 4}) ||
		!reflect.DeepEqual(b.Retry, Retry{Max: 2, When: []string{"script_failure", "runner_system_failure"}, ExitCodes: []int{137}}) {
		t.Errorf("b: %+v", b)
	}
	if c.When != "manual" || !c.AllowFailure {
		t.Errorf("manual jobs may fail by default: %+v", c)
	}
	if !(d.When == "manual" && !d.AllowFailure && d.Retry.Max == 2 && d.Timeout == 10*time.Minute) {
		t.Errorf("d: %+v", d)
	}
}

func TestNeedsAndDependencies(t *testing.T) {
	plan := mustPlan(t, `
stages: [build, test, deploy]
compile: {stage: build, script: x, parallel: 2}
lint: {stage: build, script: x}
unit:
  stage: test
  needs: [compile, {job: lint, artifacts: false}, {job: absent, optional: true}]
  script: x
first: {stage: test, needs: [], script: x}
ship:
  stage: deploy
  dependencies: [compile]
  script: x
none: {stage: deploy, dependencies: [], script: x}
`, branchEnv)
	u := jobNamed(t, plan, "unit")
	want := []Need{{Job: "compile 1/2"}, {Job: "compile 2/2"}, {Job: "lint", NoArtifacts: true}}
	if u.Needs == nil || !reflect.DeepEqual(*u.Needs, want) {
		t.Errorf("needs %+v, want %+v", u.Needs, want)
	}
	if f := jobNamed(t, plan, "first"); f.Needs == nil || len(*f.Needs) != 0 {
		t.Errorf("needs: [] must be kept as empty: %+v", f.Needs)
	}
	if s := jobNamed(t, plan, "ship"); s.Needs != nil || !reflect.DeepEqual(*s.Dependencies, []string{"compile 1/2", "compile 2/2"}) {
		t.Errorf("ship: needs %v deps %v", s.Needs, s.Dependencies)
	}
	if n := jobNamed(t, plan, "none"); n.Dependencies == nil || len(*n.Dependencies) != 0 {
		t.Errorf("dependencies: [] must be kept as empty: %v", n.Dependencies)
	}
}

func TestParallel(t *testing.T) {
	plan := mustPlan(t, `
shard: {script: x, parallel: 3}
matrix:
  script: x
  parallel:
    matrix:
      - {OS: [linux, windows], ARCH: amd64}
      - {OS: mac}
`, branchEnv)
	got := names(plan)
	want := []string{"shard 1/3", "shard 2/3", "shard 3/3", "matrix: [linux, amd64]", "matrix: [windows, amd64]", "matrix: [mac]"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("jobs %v, want %v", got, want)
	}
	if v := vars(jobNamed(t, plan, "shard 2/3").Variables); v["CI_NODE_INDEX"] != "2" || v["CI_NODE_TOTAL"] != "3" {
		t.Errorf("shard 2/3 variables %v", v)
	}
	if v := vars(jobNamed(t, plan, "matrix: [windows, amd64]").Variables); v["OS"] != "windows" || v["ARCH"] != "amd64" || v["CI_NODE_INDEX"] != "2" || v["CI_NODE_TOTAL"] != "3" {
		t.Errorf("matrix variables %v", v)
	}
}

func TestRules(t *testing.T) {
	src := `
variables: {DEPLOY: "yes"}
always: {script: x}
main-only:
  script: x
  rules: [{if: '$CI_COMMIT_BRANCH == "main"'}]
not-main:
  script: x
  rules:
    - if: $CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH
      when: never
    - when: manual
tags-only:
  script: x
  rules: [{if: $CI_COMMIT_TAG}]
push-or-web:
  script: x
  rules:
    - if: '$CI_PIPELINE_SOURCE == "push" && $DEPLOY == "yes"'
      when: on_failure
      allow_failure: true
      variables: {FROM_RULE: "1"}
regex:
  script: x
  rules: [{if: '$CI_COMMIT_REF_NAME =~ /^REL/i || $CI_PIPELINE_SOURCE == "web"'}]
exists:
  script: x
  rules: [{exists: [go.mod]}]
`
	plan := mustPlan(t, src, branchEnv)
	if got, want := names(plan), []string{"always", "main-only", "push-or-web"}; !reflect.DeepEqual(got, want) {
		t.Errorf("push to main: jobs %v, want %v", got, want)
	}
	p := jobNamed(t, plan, "push-or-web")
	if p.When != "on_failure" || !p.AllowFailure || vars(p.Variables)["FROM_RULE"] != "1" {
		t.Errorf("rule when/allow_failure/variables not applied: %+v", p)
	}
	other := Env{Vars: map[string]string{"CI_COMMIT_BRANCH": "release-1", "CI_COMMIT_REF_NAME": "release-1", "CI_PIPELINE_SOURCE": "web", "CI_DEFAULT_BRANCH": "main"},
		Exists: func(g string) bool { return g == "go.mod" }}
	plan = mustPlan(t, src, other)
	if got, want := names(plan), []string{"always", "not-main", "regex", "exists"}; !reflect.DeepEqual(got, want) {
		t.Errorf("web pipeline on release-1: jobs %v, want %v", got, want)
	}
	if nm := jobNamed(t, plan, "not-main"); nm.When != "manual" || !nm.AllowFailure {
		t.Errorf("rule when: manual: %+v", nm)
	}
	tag := Env{Vars: map[string]string{"CI_COMMIT_TAG": "v1", "CI_COMMIT_REF_NAME": "v1", "CI_PIPELINE_SOURCE": "push", "CI_DEFAULT_BRANCH": "main"}}
	if got := names(mustPlan(t, src, tag)); !reflect.DeepEqual(got, []string{"always", "not-main", "tags-only", "push-or-web"}) {
		t.Errorf("tag pipeline: jobs %v", got)
	}
}

func TestWorkflowRules(t *testing.T) {
	src := `
workflow:
  name: pipeline for $CI_COMMIT_BRANCH
  rules:
    - if: $CI_PIPELINE_SOURCE == "schedule"
      when: never
    - if: $CI_COMMIT_BRANCH
      variables: {WF: set}
a: {script: x}
`
	plan := mustPlan(t, src, branchEnv)
	if plan.Name != "pipeline for $CI_COMMIT_BRANCH" || vars(plan.Jobs[0].Variables)["WF"] != "set" {
		t.Errorf("workflow name/variables: %q %v", plan.Name, plan.Jobs[0].Variables)
	}
	cfg := mustParse(t, src)
	for _, env := range []Env{{Vars: map[string]string{"CI_PIPELINE_SOURCE": "schedule", "CI_COMMIT_BRANCH": "main"}}, {Vars: map[string]string{"CI_COMMIT_TAG": "v1"}}} {
		if _, err := cfg.Evaluate(env); !errors.Is(err, ErrNoPipeline) {
			t.Errorf("env %v: err %v, want ErrNoPipeline", env.Vars, err)
		}
	}
}

func TestOnlyExcept(t *testing.T) {
	src := `
default-refs: {script: x}
only-main: {script: x, only: [main]}
only-tags: {script: x, only: [tags]}
except-main: {script: x, except: [main]}
only-re: {script: x, only: {refs: ['/^feat-/'], variables: ['$CI_PIPELINE_SOURCE == "push"']}}
`
	if got := names(mustPlan(t, src, branchEnv)); !reflect.DeepEqual(got, []string{"default-refs", "only-main"}) {
		t.Errorf("main: %v", got)
	}
	feat := Env{Vars: map[string]string{"CI_COMMIT_BRANCH": "feat-x", "CI_COMMIT_REF_NAME": "feat-x", "CI_PIPELINE_SOURCE": "push"}}
	if got := names(mustPlan(t, src, feat)); !reflect.DeepEqual(got, []string{"default-refs", "except-main", "only-re"}) {
		t.Errorf("feat-x: %v", got)
	}
}

func TestHooksAndInclude(t *testing.T) {
	files := map[string]string{
		"ci/common.yml": "variables: {FROM_INCLUDE: yes}\n.tpl: {tags: [inc]}\n",
	}
	cfg, err := Parse(".gitlab-ci.yml", []byte(`
include:
  - local: /ci/common.yml
a:
  extends: .tpl
  hooks:
    pre_get_sources_script: [echo pre, git config --global http.lowSpeedLimit 0]
  script: x
`), Options{ReadFile: func(p string) ([]byte, error) {
		if s, ok := files[p]; ok {
			return []byte(s), nil
		}
		return nil, errors.New("no such file")
	}})
	if err != nil {
		t.Fatal(err)
	}
	plan, err := cfg.Evaluate(branchEnv)
	if err != nil {
		t.Fatal(err)
	}
	a := jobNamed(t, plan, "a")
	if !reflect.DeepEqual(a.PreGetSourcesScript, []string{"echo pre", "git config --global http.lowSpeedLimit 0"}) || !reflect.DeepEqual(a.Tags, []string{"inc"}) || vars(a.Variables)["FROM_INCLUDE"] != "yes" {
		t.Errorf("hooks/include: %+v", a)
	}
}

func TestParseDuration(t *testing.T) {
	tests := []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"3600", time.Hour, true}, {"1h", time.Hour, true}, {"1h 30m", 90 * time.Minute, true}, {"1h30m", 90 * time.Minute, true},
		{"2 hours and 10 minutes", 130 * time.Minute, true}, {"3 days", 72 * time.Hour, true}, {"1.5h", 90 * time.Minute, true},
		{"1 week", 7 * 24 * time.Hour, true}, {"0", 0, false}, {"", 0, false}, {"1 fortnight", 0, false}, {"h", 0, false}, {"40 days", 0, false},
	}
	for _, tt := range tests {
		got, err := ParseDuration(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}
