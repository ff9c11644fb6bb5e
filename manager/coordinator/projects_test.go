package coordinator

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/internal/testenv"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

func needGit(t *testing.T) {
	t.Helper()
	testenv.LookPath(t, "git", "Debian package git; make setup installs it")
}

// gitCLI runs the real git client as a runner would, with no user configuration.
func gitCLI(t *testing.T, dir string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "git", args...)
	cmd.Dir = dir
	cmd.Env = []string{"HOME=" + t.TempDir(), "PATH=" + os.Getenv("PATH"), "GIT_CONFIG_NOSYSTEM=1", "GIT_TERMINAL_PROMPT=0", "LC_ALL=C",
		"GIT_AUTHOR_NAME=Ada", "GIT_AUTHOR_EMAIL=ada@example.com", "GIT_COMMITTER_NAME=Ada", "GIT_COMMITTER_EMAIL=ada@example.com"}
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func mustGit(t *testing.T, dir string, args ...string) string {
	t.Helper()
	out, err := gitCLI(t, dir, args...)
	if err != nil {
		t.Fatalf("git %v: %v\n%s", args, err, out)
	}
	return out
}

func writeTree(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, body := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

const appCI = `
stages: [build, test]
variables:
  GIT_DEPTH: "1"
build:
  stage: build
  image: $CI_REGISTRY/root/images/debian:bookworm
  script: [make]
  environment: production
api-only:
  stage: test
  script: [echo api]
  rules:
    - if: $CI_PIPELINE_SOURCE == "api"
`

func TestProjectsFromDirectories(t *testing.T) {
	needGit(t)
	app, lib := t.TempDir(), t.TempDir()
	writeTree(t, lib, map[string]string{"lib.txt": "library\n", ".gitlab-ci.yml": "l:\n  script: [x]\n"})
	writeTree(t, app, map[string]string{
		".gitlab-ci.yml": appCI,
		".gitmodules":    "[submodule \"lib\"]\n\tpath = lib\n\turl = ../lib.git\n",
	})
	other := t.TempDir()
	writeTree(t, other, map[string]string{".gitlab-ci.yml": "o:\n  script: [x]\n"})
	e := newEnv(t, Config{StateDir: t.TempDir()})
	res, err := e.s.AddProjects(context.Background(), []ProjectSource{{Dir: app, Path: "root/app"}, {Dir: lib, Path: "root/lib"}, {Dir: other, Path: "root/other"}})
	if err != nil {
		t.Fatal(err)
	}
	appRes := res[0]
	if appRes.Pipeline == nil || appRes.Branch != "main" || len(appRes.Pipeline.JobIDs) != 1 {
		t.Fatalf("app: %+v", appRes)
	}
	if w := appRes.Pipeline.Warnings; len(w) != 1 || !strings.Contains(w[0], ".gitlab-ci.yml:9: build: environment:") {
		t.Errorf("warnings %q", w)
	}
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	var job *runnerapi.JobResponse
	for range 3 {
		j := e.mustJob(tok)
		if j.JobInfo.ProjectName == "app" {
			job = j
			continue
		}
		e.finish(j, runnerapi.StateSuccess, nil)
	}
	if job == nil {
		t.Fatal("no job of root/app")
	}
	gi := job.GitInfo
	if gi.Sha != appRes.Commit || gi.Depth != 1 || gi.Refspecs[0] != "+refs/pipelines/"+itoa(appRes.Pipeline.ID)+":refs/pipelines/"+itoa(appRes.Pipeline.ID) {
		t.Errorf("git_info %+v", gi)
	}
	// Clone exactly as gitlab-runner does, with the payload's URL and refspecs.
	work := t.TempDir()
	dir := filepath.Join(work, "build")
	mustGit(t, work, "init", "-q", dir)
	mustGit(t, dir, "remote", "add", "origin", gi.RepoURL)
	mustGit(t, dir, append([]string{"fetch", "-q", "origin", "--depth", "1"}, gi.Refspecs...)...)
	mustGit(t, dir, "checkout", "-q", "-f", gi.Sha)
	mustGit(t, dir, "submodule", "update", "--init")
	if b, err := os.ReadFile(filepath.Join(dir, "lib", "lib.txt")); err != nil || string(b) != "library\n" {
		t.Errorf("submodule checkout: %q %v", b, err)
	}
	// The token does not open projects the pipeline does not use.
	otherURL := strings.Replace(gi.RepoURL, "/root/app.git", "/root/other.git", 1)
	if out, err := gitCLI(t, work, "ls-remote", otherURL); err == nil || !strings.Contains(out, "403") {
		t.Errorf("ls-remote of another project with the job token: %v %s", err, out)
	}
	// Once the job is over, its token opens nothing.
	e.finish(job, runnerapi.StateSuccess, nil)
	if out, err := gitCLI(t, work, "ls-remote", gi.RepoURL); err == nil || !strings.Contains(out, "Authentication failed") {
		t.Errorf("ls-remote after the job ended: %v %s", err, out)
	}
	// The push token reads every project, with any user name.
	pushURL := strings.Replace(gi.RepoURL, "gitlab-ci-token:"+job.Token, "root:"+e.s.PushToken(), 1)
	if out, err := gitCLI(t, work, "ls-remote", strings.Replace(pushURL, "/root/app.git", "/root/other.git", 1)); err != nil {
		t.Errorf("ls-remote with the push token: %v %s", err, out)
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// pipelineJobs returns the ids of a pipeline's jobs.
func (s *Server) pipelineJobs(id int64) []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []int64
	for _, j := range s.pipelines[id].jobs {
		out = append(out, j.id)
	}
	return out
}

func TestCreatePipelineThroughGitLabAPI(t *testing.T) {
	needGit(t)
	app := t.TempDir()
	writeTree(t, app, map[string]string{".gitlab-ci.yml": appCI})
	e := newEnv(t, Config{StateDir: t.TempDir()})
	res, err := e.s.AddProjects(context.Background(), []ProjectSource{{Dir: app}})
	if err != nil {
		t.Fatal(err)
	}
	first := res[0]
	if first.Project.Path != "root/"+filepath.Base(app) || first.Pipeline == nil {
		t.Fatalf("%+v", first)
	}
	writeTree(t, app, map[string]string{"new.txt": "changed after the push\n"})
	path := "/api/v4/projects/" + strings.ReplaceAll(first.Project.Path, "/", "%2F") + "/pipeline?ref=main"
	if r := e.do("POST", path, nil, nil); r.status != http.StatusUnauthorized {
		t.Errorf("without a token: %d", r.status)
	}
	r := e.do("POST", path, map[string]string{"Private-Token": e.s.PushToken()}, nil)
	if r.status != http.StatusCreated {
		t.Fatalf("create pipeline: %d %s", r.status, r.body)
	}
	var pl apiPipeline
	if err := json.Unmarshal(r.body, &pl); err != nil {
		t.Fatal(err)
	}
	if pl.Source != "api" || pl.Ref != "main" || pl.SHA == first.Commit || pl.Status != "pending" || !strings.HasSuffix(pl.WebURL, "/-/pipelines/"+itoa(pl.ID)) {
		t.Errorf("pipeline %+v (first commit %s)", pl, first.Commit)
	}
	// rules: on CI_PIPELINE_SOURCE picked api-only for this pipeline only.
	if got := len(e.s.pipelineJobs(pl.ID)); got != 2 {
		t.Errorf("api pipeline has %d jobs, want build and api-only", got)
	}
	e.s.mu.Lock()
	before := e.s.pipelines[pl.ID].beforeSha
	e.s.mu.Unlock()
	if before != first.Commit {
		t.Errorf("before_sha %s, want the previous head %s", before, first.Commit)
	}
	// GitLab's GET of the pipeline, by project path.
	r = e.do("GET", "/api/v4/projects/"+strings.ReplaceAll(first.Project.Path, "/", "%2F")+"/pipelines/"+itoa(pl.ID), map[string]string{"Private-Token": e.s.PushToken()}, nil)
	var got apiPipeline
	if err := json.Unmarshal(r.body, &got); err != nil || r.status != 200 || got.ID != pl.ID || got.SHA != pl.SHA || got.Status != "pending" {
		t.Errorf("get pipeline: %d %s", r.status, r.body)
	}
	if r := e.do("GET", "/api/v4/projects/1/pipelines/999", map[string]string{"Private-Token": e.s.PushToken()}, nil); r.status != 404 {
		t.Errorf("get unknown pipeline: %d", r.status)
	}
	for _, c := range []struct {
		path string
		want int
	}{
		{"/api/v4/projects/999/pipeline?ref=main", 404},
		{"/api/v4/projects/1/pipeline?ref=nope", 400},
		{"/api/v4/projects/1/pipeline", 400},
	} {
		if r := e.do("POST", c.path, map[string]string{"Private-Token": e.s.PushToken()}, nil); r.status != c.want {
			t.Errorf("%s: %d %s, want %d", c.path, r.status, r.body, c.want)
		}
	}
}

func TestRepoConfigErrorsNameTheLine(t *testing.T) {
	needGit(t)
	app := t.TempDir()
	writeTree(t, app, map[string]string{".gitlab-ci.yml": "a:\n  script: [x]\n  scirpt: [y]\n"})
	e := newEnv(t, Config{StateDir: t.TempDir()})
	_, err := e.s.AddProjects(context.Background(), []ProjectSource{{Dir: app, Path: "root/app"}})
	if err == nil || !strings.Contains(err.Error(), `.gitlab-ci.yml:3: a: unknown keyword "scirpt"`) {
		t.Errorf("err %v", err)
	}
	// A project without .gitlab-ci.yml is served but has no pipeline, as in GitLab.
	empty := t.TempDir()
	writeTree(t, empty, map[string]string{"README": "no CI here\n"})
	res, err := e.s.AddProjects(context.Background(), []ProjectSource{{Dir: empty, Path: "root/empty"}})
	if err != nil || res[0].Pipeline != nil || !strings.Contains(res[0].NoPipeline, "no .gitlab-ci.yml at main") {
		t.Errorf("project without CI: %+v %v", res, err)
	}
}
