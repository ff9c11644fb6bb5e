package buildscript

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mayfly-ci/mayfly/manager/mask"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

const testJobToken = "glcbt-64_SECRETjobTOKEN123"

// storeHelperHome writes a global git config that stores credentials in
// ~/.git-credentials, the trap a job token must not fall into.
func storeHelperHome(t testing.TB, e *localExec) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(e.home, ".gitconfig"), []byte("[credential]\n\thelper = store\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

// noTokenLeft checks that the token is in none of the files a job leaves,
// that origin has no credentials, and that no helper stored them.
func noTokenLeft(t testing.TB, p *Plan, e *localExec, srv *gitServer) {
	t.Helper()
	noSecretIn(t, srv.token, p.BuildsDir, e.home)
	if got := git(t, p.ProjectDir, "remote", "get-url", "origin"); got != srv.url("demo", "", "") {
		t.Errorf("origin is %q, want %q", got, srv.url("demo", "", ""))
	}
	if _, err := os.Stat(filepath.Join(e.home, ".git-credentials")); err == nil {
		t.Error("a global credential helper stored the job token")
	}
}

// TestGetSourcesHTTP clones over HTTP with each POSIX shell, as the hosted
// fleet's jobs do: depth 1, the hosted config's pre_clone_script
// `eval "$CI_PRE_CLONE_SCRIPT"` and a post_clone_script; with bash also
// submodules by relative URL, recursively (git runs the submodule commands
// the same whatever the shell, and they cost the most). The token
// authenticates every fetch and is left nowhere: not in the trace,
// .git/config, the submodules' configs, or a credential store.
func TestGetSourcesHTTP(t *testing.T) {
	srv := newGitServer(t, testJobToken)
	shas := srv.demoRepos(t)
	for _, sh := range posixShells() {
		t.Run(sh.shell+"/"+sh.program[0], func(t *testing.T) {
			subs := sh.program[0] == bashProgram()[0]
			e := newLocalExec(t, sh.program, nil)
			storeHelperHome(t, e)
			vars := []runnerapi.Variable{{Key: "GIT_STRATEGY", Value: "clone"},
				{Key: "CI_PRE_CLONE_SCRIPT", Value: "echo \"pre clone in $(pwd)\"\nprintf '%s\\n' 'second line'"}}
			post, postOut := "echo post clone sees $(cat file.txt)", "post clone sees three\n"
			want := []string{
				"$ eval \"$CI_PRE_CLONE_SCRIPT\"", "pre clone in ", "second line\n",
				"Fetching changes with git depth set to 1...",
				"Created fresh repository.",
				"Checking out " + shas[2][:8] + " as detached HEAD (ref is main)...",
				shas[2] + "\n", "\nthree\n",
			}
			files := map[string]bool{"file.txt": true, "sub/sub.txt": subs, "sub/deep/lib.txt": subs}
			if subs {
				vars = append(vars, runnerapi.Variable{Key: "GIT_SUBMODULE_STRATEGY", Value: "recursive"})
				post, postOut = "echo post clone sees $(cat sub/deep/lib.txt)", "post clone sees lib\n"
				want = append(want, "Updating/initializing submodules recursively with git depth set to 1...",
					"Updated submodules", "Configuring submodules to use parent git credentials...")
			}
			want = append(want, postOut)
			job := srv.job(shas[2], vars...)
			job.GitInfo.Depth = 1
			job.Hooks = []runnerapi.Hook{{Name: runnerapi.HookPreGetSourcesScript, Script: []string{"echo hook after the pre_clone_script"}}}
			p, err := Generate(job, Options{Shell: sh.shell, BuildsDir: t.TempDir(),
				PreCloneScript: `eval "$CI_PRE_CLONE_SCRIPT"`, PostCloneScript: post})
			if err != nil {
				t.Fatal(err)
			}
			r, trace := runPlan(t, context.Background(), p, e)
			if r.State != runnerapi.StateSuccess {
				t.Fatalf("result %+v\n%s", r, trace)
			}
			if got := git(t, p.ProjectDir, "rev-parse", "HEAD"); got != shas[2] {
				t.Fatalf("HEAD %s, want %s", got, shas[2])
			}
			if got := git(t, p.ProjectDir, "rev-list", "--count", "HEAD"); got != "1" {
				t.Errorf("history has %s commits, want 1 (depth 1)", got)
			}
			for f, want := range files {
				if _, err := os.Stat(filepath.Join(p.ProjectDir, f)); (err == nil) != want {
					t.Errorf("%s checked out: %v, want %v", f, err == nil, want)
				}
			}
			for _, w := range want {
				if !strings.Contains(trace, w) {
					t.Errorf("trace lacks %q:\n%s", w, trace)
				}
			}
			if strings.Contains(trace, srv.token) {
				t.Errorf("trace shows the token:\n%s", trace)
			}
			if i, k := strings.Index(trace, "second line"), strings.Index(trace, "hook after the pre_clone_script\n"); i < 0 || k < i {
				t.Errorf("the hook did not run after pre_clone_script:\n%s", trace)
			}
			noTokenLeft(t, p, e, srv)
			if srv.authed.Swap(0) == 0 {
				t.Error("the server saw no authenticated request")
			}
			if !subs {
				return
			}
			// git in a submodule, as a user's script might run it, still
			// authenticates with CI_JOB_TOKEN from the environment.
			cmd := gitInEnv(e, filepath.Join(p.ProjectDir, "sub", "deep"), "CI_JOB_TOKEN="+srv.token)
			if out, err := cmd("fetch", "origin"); err != nil {
				t.Errorf("git fetch in a submodule: %v\n%s", err, out)
			}
		})
	}
}

// gitInEnv returns a runner of git in dir with the executor's environment
// plus env.
func gitInEnv(e *localExec, dir string, env ...string) func(args ...string) (string, error) {
	return func(args ...string) (string, error) {
		var out bytes.Buffer
		script := "cd " + shQuote(dir) + "\nexport " + strings.Join(env, " ") + "\ngit"
		for _, a := range args {
			script += " " + shQuote(a)
		}
		code, err := e.Run(context.Background(), ShellBash, script, &out)
		if err == nil && code != 0 {
			err = fmt.Errorf("exit code %d", code)
		}
		return out.String(), err
	}
}

// testSubmodulesNormal: GIT_SUBMODULE_STRATEGY=normal takes only the first
// level of submodules; a wrong GIT_SUBMODULE_DEPTH is a warning.
func testSubmodulesNormal(t *testing.T, srv *gitServer, shas []string) {
	e := newLocalExec(t, []string{"dash", "-s"}, nil)
	job := srv.job(shas[2], runnerapi.Variable{Key: "GIT_SUBMODULE_STRATEGY", Value: "normal"},
		runnerapi.Variable{Key: "GIT_SUBMODULE_DEPTH", Value: "deep"})
	p, err := Generate(job, Options{Shell: ShellSh, BuildsDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Warnings) != 1 || !strings.Contains(p.Warnings[0], `GIT_SUBMODULE_DEPTH "deep"`) {
		t.Errorf("warnings %q", p.Warnings)
	}
	r, trace := runPlan(t, context.Background(), p, e)
	if r.State != runnerapi.StateSuccess {
		t.Fatalf("result %+v\n%s", r, trace)
	}
	if !strings.Contains(trace, "Updating/initializing submodules...") {
		t.Errorf("trace:\n%s", trace)
	}
	for f, want := range map[string]bool{"sub/sub.txt": true, "sub/deep/lib.txt": false} {
		if _, err := os.Stat(filepath.Join(p.ProjectDir, f)); (err == nil) != want {
			t.Errorf("%s present: %v, want %v", f, err == nil, want)
		}
	}
	noTokenLeft(t, p, e, srv)
}

// TestGetSourcesCases runs the cases that share one server and do not
// change its repositories.
func TestGetSourcesCases(t *testing.T) {
	srv := newGitServer(t, testJobToken)
	shas := srv.demoRepos(t)
	for _, c := range []struct {
		name string
		test func(*testing.T, *gitServer, []string)
	}{
		{"submodules normal", testSubmodulesNormal},
		{"checkout false", testCheckoutFalse},
		{"wrong token", testWrongToken},
		{"attempts", testAttempts},
		{"sha256 repository", testSHA256},
	} {
		t.Run(c.name, func(t *testing.T) {
			srv.authed.Store(0)
			srv.denied.Store(0)
			c.test(t, srv, shas)
		})
	}
}

// TestGetSourcesFetchReuses fetches into the checkout an earlier job left:
// a shallow one (depth 1) is deepened by a full fetch, a new commit arrives,
// GIT_CLEAN_FLAGS decides which untracked files go, and .git is reused.
func TestGetSourcesFetchReuses(t *testing.T) {
	srv := newGitServer(t, testJobToken)
	shas := srv.demoRepos(t)
	e := newLocalExec(t, bashProgram(), nil)
	builds := t.TempDir()
	first := srv.job(shas[2], runnerapi.Variable{Key: "GIT_STRATEGY", Value: "fetch"})
	first.GitInfo.Depth = 1
	p1, err := Generate(first, Options{BuildsDir: builds})
	if err != nil {
		t.Fatal(err)
	}
	if r, trace := runPlan(t, context.Background(), p1, e); r.State != runnerapi.StateSuccess {
		t.Fatalf("first job %+v\n%s", r, trace)
	}
	for _, f := range []string{"untracked", "keep.me"} {
		os.WriteFile(filepath.Join(p1.ProjectDir, f), []byte("x"), 0o644)
	}
	os.WriteFile(filepath.Join(p1.ProjectDir, ".git", "index.lock"), nil, 0o644) // an interrupted git
	before, _ := os.Stat(filepath.Join(p1.ProjectDir, ".git"))

	newSha := srv.commit(t, "demo", map[string]string{"file.txt": "four\n"})
	second := srv.job(newSha, runnerapi.Variable{Key: "GIT_STRATEGY", Value: "fetch"},
		runnerapi.Variable{Key: "GIT_CLEAN_FLAGS", Value: "-ffdx -e keep.me"})
	p2, err := Generate(second, Options{BuildsDir: builds})
	if err != nil {
		t.Fatal(err)
	}
	r, trace := runPlan(t, context.Background(), p2, e)
	if r.State != runnerapi.StateSuccess {
		t.Fatalf("second job %+v\n%s", r, trace)
	}
	if got := git(t, p2.ProjectDir, "rev-parse", "HEAD"); got != newSha {
		t.Fatalf("HEAD %s, want %s", got, newSha)
	}
	if got := git(t, p2.ProjectDir, "rev-list", "--count", "HEAD"); got != "4" {
		t.Errorf("history has %s commits, want all 4 (unshallowed)", got)
	}
	if strings.Contains(trace, "Created fresh repository.") || !strings.Contains(trace, "Fetching changes...") {
		t.Errorf("fetch did not reuse the repository:\n%s", trace)
	}
	if _, err := os.Stat(filepath.Join(p2.ProjectDir, "untracked")); err == nil {
		t.Error("git clean kept an untracked file")
	}
	if _, err := os.Stat(filepath.Join(p2.ProjectDir, "keep.me")); err != nil {
		t.Error("git clean removed the file GIT_CLEAN_FLAGS excludes")
	}
	if after, _ := os.Stat(filepath.Join(p2.ProjectDir, ".git")); !os.SameFile(before, after) {
		t.Error("fetch replaced .git")
	}
	noTokenLeft(t, p2, e, srv)
}

// testCheckoutFalse: GIT_CHECKOUT=false fetches without checking
// out, and GIT_FETCH_EXTRA_FLAGS=none leaves out --prune --quiet.
func testCheckoutFalse(t *testing.T, srv *gitServer, shas []string) {
	e := newLocalExec(t, bashProgram(), nil)
	job := srv.job(shas[1], runnerapi.Variable{Key: "GIT_CHECKOUT", Value: "false"},
		runnerapi.Variable{Key: "GIT_FETCH_EXTRA_FLAGS", Value: "none"})
	job.Steps[0].Script = []string{"ls -A"}
	p, err := Generate(job, Options{BuildsDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	r, trace := runPlan(t, context.Background(), p, e)
	if r.State != runnerapi.StateSuccess {
		t.Fatalf("result %+v\n%s", r, trace)
	}
	if !strings.Contains(trace, "Skipping Git checkout") || strings.Contains(trace, "Checking out") ||
		!strings.Contains(trace, "Skipping Git submodules setup") {
		t.Errorf("trace:\n%s", trace)
	}
	if _, err := os.Stat(filepath.Join(p.ProjectDir, "file.txt")); err == nil {
		t.Error("file.txt checked out with GIT_CHECKOUT=false")
	}
	if got := git(t, p.ProjectDir, "rev-parse", "refs/remotes/origin/main"); got != shas[2] {
		t.Errorf("origin/main %s, want %s (fetched)", got, shas[2])
	}
	if !strings.Contains(stage(t, p, StageGetSources).Script, "'--no-recurse-submodules' '+refs/heads/main:refs/remotes/origin/main' '+refs/tags/*:refs/tags/*'\n") {
		t.Error("fetch has flags with GIT_FETCH_EXTRA_FLAGS=none")
	}
}

// testWrongToken: the server refuses the token; get_sources fails
// with git's exit code as script_failure, no user step runs, and neither
// token shows in the trace, masked or not.
func testWrongToken(t *testing.T, srv *gitServer, shas []string) {
	e := newLocalExec(t, bashProgram(), nil)
	const wrong = "glcbt-64_WRONGtoken987"
	job := srv.job(shas[2])
	job.Token = wrong
	job.GitInfo.RepoURL = srv.url("demo", CredentialUser, wrong)
	p, err := Generate(job, Options{BuildsDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	upload(t, p)
	var raw, masked bytes.Buffer
	m := mask.NewWriter(&masked, p.Secrets)
	var started []string
	r := p.Run(context.Background(), e.runner(), teeWriter{&raw, m}, RunOptions{OnStage: func(s Stage) { started = append(started, string(s.Name)) }})
	m.Close()
	if r.State != runnerapi.StateFailed || r.FailureReason != runnerapi.FailureScriptFailure || r.ExitCode != 128 {
		t.Fatalf("result %+v\n%s", r, raw.String())
	}
	if got := strings.Join(started, " "); got != "prepare_script get_sources" {
		t.Errorf("stages run: %s", got)
	}
	if !strings.Contains(raw.String(), "Authentication failed for '"+srv.url("demo", "", "")) {
		t.Errorf("trace lacks git's authentication error:\n%s", raw.String())
	}
	for _, tok := range []string{wrong, testJobToken} {
		if strings.Contains(raw.String(), tok) {
			t.Errorf("raw trace shows %q:\n%s", tok, raw.String())
		}
	}
	if srv.denied.Load() == 0 || srv.authed.Load() != 0 {
		t.Errorf("server: %d denied, %d authenticated", srv.denied.Load(), srv.authed.Load())
	}
}

// testAttempts: GET_SOURCES_ATTEMPTS retries get_sources after the
// server's first answer was a 503.
func testAttempts(t *testing.T, srv *gitServer, shas []string) {
	e := newLocalExec(t, bashProgram(), nil)
	srv.failNext.Store(1)
	job := srv.job(shas[0], runnerapi.Variable{Key: "GET_SOURCES_ATTEMPTS", Value: "2"})
	p, err := Generate(job, Options{BuildsDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	r, trace := runPlan(t, context.Background(), p, e)
	if r.State != runnerapi.StateSuccess || len(e.ran) != 4 { // prepare, get_sources x2, step_script
		t.Fatalf("result %+v, %d scripts run\n%s", r, len(e.ran), trace)
	}
	if !strings.Contains(trace, "\none\n") || strings.Count(trace, "Deleting tracked and untracked files...") != 1 {
		t.Errorf("want one retry after emptying the worktree:\n%s", trace)
	}
	if _, err := os.Stat(filepath.Join(p.TmpDir, "get_sources.42.attempted")); err == nil {
		t.Error("the attempt marker is left after get_sources succeeded")
	}
}

// TestGitStrategyEmpty: GIT_STRATEGY=empty empties the project dir and runs
// no git and no pre_clone_script.
func TestGitStrategyEmpty(t *testing.T) {
	marker := filepath.Join(t.TempDir(), "git-called")
	e := newLocalExec(t, bashProgram(), map[string]string{"git": "touch " + marker + "; exit 99"})
	job := baseJob("ls -A; echo listed")
	job.Variables[0].Value = "empty"
	p, err := Generate(job, Options{BuildsDir: t.TempDir(), PreCloneScript: "echo PRECLONE"})
	if err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(p.ProjectDir, 0o755)
	os.WriteFile(filepath.Join(p.ProjectDir, "stale"), nil, 0o644)
	r, trace := runPlan(t, context.Background(), p, e)
	if r.State != runnerapi.StateSuccess {
		t.Fatalf("result %+v\n%s", r, trace)
	}
	if strings.Contains(trace, "stale") || strings.Contains(trace, "PRECLONE") || !strings.Contains(trace, "creating an empty build directory") {
		t.Errorf("trace:\n%s", trace)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Error("git ran with GIT_STRATEGY=empty")
	}
}

type teeWriter struct {
	a, b interface{ Write([]byte) (int, error) }
}

func (w teeWriter) Write(p []byte) (int, error) {
	w.a.Write(p)
	return w.b.Write(p)
}

// testSHA256: a repository in SHA-256 (git_info.repo_object_format) is
// initialised in that format, else the fetch would fail.
func testSHA256(t *testing.T, srv *gitServer, _ []string) {
	srv.formats["demo256"] = "sha256"
	sha := srv.commit(t, "demo256", map[string]string{"file.txt": "sha256\n"})
	e := newLocalExec(t, bashProgram(), nil)
	job := srv.job(sha)
	job.GitInfo.RepoURL = srv.url("demo256", CredentialUser, srv.token)
	job.GitInfo.RepoObjectFormat = "sha256"
	p, err := Generate(job, Options{BuildsDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	r, trace := runPlan(t, context.Background(), p, e)
	if r.State != runnerapi.StateSuccess || len(sha) != 64 || !strings.Contains(trace, sha+"\n") {
		t.Fatalf("result %+v, sha %s\n%s", r, sha, trace)
	}
}
