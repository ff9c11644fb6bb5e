package buildscript

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mayfly-ci/mayfly/manager/mask"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// git runs git in dir and returns its trimmed output.
func git(t testing.TB, dir string, args ...string) string {
	t.Helper()
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GIT_CONFIG_NOSYSTEM=1", "HOME="+dir,
		"GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@example.com",
		"GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@example.com")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("git %v: %v\n%s", args, err, out)
	}
	return strings.TrimSpace(string(out))
}

// makeRepo creates a repository with three commits on main and returns its
// file:// URL and the commit shas, oldest first.
func makeRepo(t testing.TB) (string, []string) {
	t.Helper()
	if _, err := exec.LookPath("git"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("git not installed")
		}
		t.Skip("git not installed")
	}
	dir := filepath.Join(t.TempDir(), "repo")
	git(t, filepath.Dir(dir), "init", "-q", "-b", "main", dir)
	var shas []string
	for _, c := range []string{"one", "two", "three"} {
		if err := os.WriteFile(filepath.Join(dir, "file.txt"), []byte(c+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		git(t, dir, "add", "file.txt")
		git(t, dir, "commit", "-q", "-m", c)
		shas = append(shas, git(t, dir, "rev-parse", "HEAD"))
	}
	return "file://" + dir, shas
}

// addCommit adds a commit on main of the repository at url.
func addCommit(t testing.TB, url, content string) string {
	dir := strings.TrimPrefix(url, "file://")
	os.WriteFile(filepath.Join(dir, "file.txt"), []byte(content+"\n"), 0o644)
	git(t, dir, "commit", "-q", "-am", content)
	return git(t, dir, "rev-parse", "HEAD")
}

func gitJob(url, sha, strategy string) *runnerapi.JobResponse {
	j := baseJob("git rev-parse HEAD", "cat file.txt")
	j.GitInfo = runnerapi.GitInfo{RepoURL: url, Ref: "main", Sha: sha, RefType: "branch",
		Refspecs: []string{"+refs/heads/*:refs/remotes/origin/*"}}
	j.Variables = []runnerapi.Variable{{Key: "GIT_STRATEGY", Value: strategy}}
	return j
}

// TestGitCloneExactSha clones a local repository and checks out a commit that
// is not the branch tip; anything left in the project directory is removed.
func TestGitCloneExactSha(t *testing.T) {
	url, shas := makeRepo(t)
	e := newLocalExec(t, bashProgram(), nil)
	builds := t.TempDir()
	job := gitJob(url, shas[1], "clone")
	p, err := Generate(job, Options{BuildsDir: builds, PreCloneScript: "echo PRECLONE"})
	if err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(p.ProjectDir, 0o755)
	os.WriteFile(filepath.Join(p.ProjectDir, "stale"), []byte("x"), 0o644)

	r, trace := runPlan(t, context.Background(), p, e)
	if r.State != runnerapi.StateSuccess {
		t.Fatalf("result %+v\n%s", r, trace)
	}
	if got := git(t, p.ProjectDir, "rev-parse", "HEAD"); got != shas[1] {
		t.Fatalf("HEAD %s, want %s", got, shas[1])
	}
	for _, want := range []string{"PRECLONE\n", "Created fresh repository.", "Checking out " + shas[1][:8] + " as detached HEAD (ref is main)...", shas[1] + "\n", "\ntwo\n"} {
		if !strings.Contains(trace, want) {
			t.Errorf("trace lacks %q:\n%s", want, trace)
		}
	}
	if _, err := os.Stat(filepath.Join(p.ProjectDir, "stale")); err == nil {
		t.Error("clone kept a stale file")
	}
}

// TestGitFetchReuses fetches into an existing checkout: a new commit arrives,
// untracked files are cleaned, the origin URL is updated.
func TestGitFetchReuses(t *testing.T) {
	url, shas := makeRepo(t)
	e := newLocalExec(t, bashProgram(), nil)
	builds := t.TempDir()
	p1, err := Generate(gitJob(url, shas[0], "fetch"), Options{BuildsDir: builds})
	if err != nil {
		t.Fatal(err)
	}
	if r, trace := runPlan(t, context.Background(), p1, e); r.State != runnerapi.StateSuccess {
		t.Fatalf("first run %+v\n%s", r, trace)
	}
	os.WriteFile(filepath.Join(p1.ProjectDir, "untracked"), []byte("x"), 0o644)
	gitDir := filepath.Join(p1.ProjectDir, ".git")
	before, _ := os.Stat(gitDir)

	newSha := addCommit(t, url, "four")
	p2, err := Generate(gitJob(url, newSha, "fetch"), Options{BuildsDir: builds})
	if err != nil {
		t.Fatal(err)
	}
	r, trace := runPlan(t, context.Background(), p2, e)
	if r.State != runnerapi.StateSuccess {
		t.Fatalf("second run %+v\n%s", r, trace)
	}
	if got := git(t, p2.ProjectDir, "rev-parse", "HEAD"); got != newSha {
		t.Fatalf("HEAD %s, want %s", got, newSha)
	}
	if strings.Contains(trace, "Created fresh repository.") {
		t.Error("fetch re-created the repository")
	}
	if _, err := os.Stat(filepath.Join(p2.ProjectDir, "untracked")); err == nil {
		t.Error("git clean did not remove the untracked file")
	}
	after, _ := os.Stat(gitDir)
	if !os.SameFile(before, after) {
		t.Error("fetch replaced .git")
	}
}

// TestGitShallow fetches with depth 1 and checks the clone is shallow.
func TestGitShallow(t *testing.T) {
	url, shas := makeRepo(t)
	e := newLocalExec(t, bashProgram(), nil)
	job := gitJob(url, shas[2], "clone")
	job.GitInfo.Depth = 1
	job.GitInfo.Refspecs = []string{"+refs/heads/main:refs/remotes/origin/main"}
	p, err := Generate(job, Options{BuildsDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	r, trace := runPlan(t, context.Background(), p, e)
	if r.State != runnerapi.StateSuccess {
		t.Fatalf("result %+v\n%s", r, trace)
	}
	if got := git(t, p.ProjectDir, "rev-list", "--count", "HEAD"); got != "1" {
		t.Fatalf("history has %s commits, want 1 (shallow)", got)
	}
	if !strings.Contains(trace, "Fetching changes with git depth set to 1...") {
		t.Fatalf("trace:\n%s", trace)
	}
}

// TestGitTokenNotPrinted: a clone that fails against 127.0.0.1:1 ends the job
// with git's exit code as script_failure, and after masking with the plan's
// secrets the trace does not contain the job token.
func TestGitTokenNotPrinted(t *testing.T) {
	_, shas := makeRepo(t)
	e := newLocalExec(t, bashProgram(), nil)
	const token = "glcbt-SECRET-job-token-123"
	job := gitJob("http://gitlab-ci-token:"+token+"@127.0.0.1:1/grp/demo.git", shas[0], "clone")
	job.Token = token
	p, err := Generate(job, Options{BuildsDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	upload(t, p)
	var raw, masked bytes.Buffer
	m := mask.NewWriter(&masked, p.Secrets)
	r := p.Run(context.Background(), e, teeWriter{&raw, m}, nil, nil)
	m.Close()
	if r.State != runnerapi.StateFailed || r.FailureReason != runnerapi.FailureScriptFailure || r.ExitCode != 128 {
		t.Fatalf("result %+v\n%s", r, raw.String())
	}
	if strings.Contains(masked.String(), token) {
		t.Fatalf("masked trace shows the token:\n%s", masked.String())
	}
	// The script itself never echoes the URL; git's own messages (if any) are masked.
	if strings.Contains(raw.String(), token) {
		t.Logf("git printed the token itself; masking removed it")
	}
	if !strings.Contains(stage(t, p, StageGetSources).Script, token) {
		t.Fatal("the clone URL with the token should reach git")
	}
}

type teeWriter struct {
	a, b interface{ Write([]byte) (int, error) }
}

func (w teeWriter) Write(p []byte) (int, error) {
	w.a.Write(p)
	return w.b.Write(p)
}
