package gitrepo

import (
	"context"
	"encoding/base64"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/internal/testenv"
)

// git runs the real git CLI for a test, with no user configuration.
func git(t testing.TB, dir string, args ...string) string {
	t.Helper()
	out, err := gitErr(t, dir, args...)
	if err != nil {
		t.Fatalf("git %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(out)
}

func gitErr(t testing.TB, dir string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "git", append([]string{"-c", "protocol.file.allow=always"}, args...)...)
	cmd.Dir = dir
	cmd.Env = []string{"HOME=" + t.TempDir(), "PATH=" + os.Getenv("PATH"), "GIT_CONFIG_NOSYSTEM=1", "GIT_TERMINAL_PROMPT=0", "LC_ALL=C",
		"GIT_AUTHOR_NAME=Ada", "GIT_AUTHOR_EMAIL=ada@example.com", "GIT_COMMITTER_NAME=Ada", "GIT_COMMITTER_EMAIL=ada@example.com"}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func needGit(t testing.TB) {
	t.Helper()
	testenv.LookPath(t, "git", "Debian package git; make setup installs it")
}

func writeFiles(t testing.TB, dir string, files map[string]string) {
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

// gitProject makes a git work tree on branch trunk with one commit and an
// uncommitted change.
func gitProject(t testing.TB) string {
	dir := t.TempDir()
	git(t, dir, "init", "-q", "-b", "trunk")
	writeFiles(t, dir, map[string]string{"README": "hello\n", ".gitlab-ci.yml": "a: {script: x}\n"})
	git(t, dir, "add", ".")
	git(t, dir, "commit", "-q", "-m", "First line\n\nMore words.")
	git(t, dir, "tag", "v1")
	writeFiles(t, dir, map[string]string{"README": "changed, not committed\n"})
	return dir
}

// snapshot lists every file of a tree with its size and mode, to prove a
// source directory is left as it was.
func snapshot(t testing.TB, dir string) string {
	var b strings.Builder
	err := filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		b.WriteString(rel + " " + info.Mode().String() + " " + info.ModTime().String())
		if !info.IsDir() {
			data, _ := os.ReadFile(p)
			b.WriteString(" " + base64.StdEncoding.EncodeToString(data))
		}
		b.WriteString("\n")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestImportGitRepoAndPlainDir(t *testing.T) {
	needGit(t)
	ctx := context.Background()
	src := gitProject(t)
	plain := t.TempDir()
	writeFiles(t, plain, map[string]string{
		".gitlab-ci.yml": "b: {script: y}\n",
		"lib/stale.txt":  "replaced by the submodule\n",
		"main.sh":        "echo hi\n",
		".gitmodules":    "[submodule \"lib\"]\n\tpath = lib\n\turl = ../app.git\n",
	})
	before, beforePlain := snapshot(t, src), snapshot(t, plain)

	s, err := NewStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	// The plain directory is listed first but needs root/app: ImportAll orders them.
	repos, err := s.ImportAll(ctx, []Source{{Path: "root/site", Dir: plain}, {Path: "root/app", Dir: src}})
	if err != nil {
		t.Fatal(err)
	}
	site, app := repos[0], repos[1]
	if app.DefaultBranch != "trunk" || app.Head != git(t, src, "rev-parse", "HEAD") || !app.Dirty {
		t.Errorf("git source: %+v", app)
	}
	if site.DefaultBranch != "main" || len(site.Head) != 40 || site.Dirty {
		t.Errorf("plain source: %+v", site)
	}
	if after := snapshot(t, src); after != before {
		t.Errorf("the git source directory changed")
	}
	if after := snapshot(t, plain); after != beforePlain {
		t.Errorf("the plain source directory changed")
	}
	// The gitlink replaces the plain files under lib/ with root/app's commit.
	tree := git(t, site.Dir, "ls-tree", "-r", site.Head)
	if !strings.Contains(tree, "160000 commit "+app.Head+"\tlib") || strings.Contains(tree, "stale.txt") || !strings.Contains(tree, "main.sh") {
		t.Errorf("site tree:\n%s", tree)
	}
	c, err := app.Commit(ctx, app.Head)
	if err != nil {
		t.Fatal(err)
	}
	if c.Title() != "First line" || c.Description() != "More words." || c.AuthorName != "Ada" || c.Parent != "" || c.Timestamp.IsZero() {
		t.Errorf("commit %+v", c)
	}
	if b, err := app.ReadFile(ctx, app.Head, ".gitlab-ci.yml"); err != nil || string(b) != "a: {script: x}\n" {
		t.Errorf("ReadFile: %q %v", b, err)
	}
	if _, err := app.ReadFile(ctx, app.Head, "nope"); err == nil {
		t.Error("ReadFile of a missing file succeeded")
	}
	if subs := site.Submodules(ctx, site.Head); len(subs) != 1 || subs[0].Path != "lib" || subs[0].URL != "../app.git" {
		t.Errorf("submodules %+v", subs)
	}
	if !site.Exists(ctx, site.Head, "*.sh") || !site.Exists(ctx, site.Head, "**/*.yml") || site.Exists(ctx, site.Head, "lib/*.txt") {
		t.Error("Exists globs")
	}
	d1, ok1 := app.CacheKeyDigest(ctx, app.Head, []string{"README"})
	d2, ok2 := app.CacheKeyDigest(ctx, app.Head, []string{"/README", "missing"})
	if !ok1 || !ok2 || d1 != d2 || len(d1) != 40 {
		t.Errorf("cache key digest %q %v %q %v", d1, ok1, d2, ok2)
	}
	if _, ok := app.CacheKeyDigest(ctx, app.Head, []string{"missing"}); ok {
		t.Error("a digest for missing files")
	}
}

func TestImportRefusals(t *testing.T) {
	needGit(t)
	s, err := NewStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	plain := t.TempDir()
	writeFiles(t, plain, map[string]string{".gitmodules": "[submodule \"x\"]\n\tpath = x\n\turl = https://example.com/x.git\n"})
	cases := []struct {
		src  Source
		want string
	}{
		{Source{Path: "nonamespace", Dir: plain}, "want namespace/name"},
		{Source{Path: "root/../etc", Dir: plain}, "want namespace/name"},
		{Source{Path: "root/x", Dir: filepath.Join(plain, "missing")}, "no such file"},
		{Source{Path: "root/x", Dir: plain}, "is not relative"},
	}
	for _, c := range cases {
		if _, err := s.Import(ctx, c.src); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Import(%+v) = %v, want %q", c.src, err, c.want)
		}
	}
	writeFiles(t, plain, map[string]string{".gitmodules": "[submodule \"x\"]\n\tpath = x\n\turl = ../unknown.git\n"})
	if _, err := s.Import(ctx, Source{Path: "root/x", Dir: plain}); err == nil || !strings.Contains(err.Error(), "not served") {
		t.Errorf("unknown submodule project: %v", err)
	}
}

func TestResolveRelative(t *testing.T) {
	tests := []struct {
		project, url, want string
		ok                 bool
	}{
		{"root/app", "../lib.git", "root/lib", true},
		{"root/app", "../lib", "root/lib", true},
		{"acme/web/app", "../../tools/lib.git", "acme/tools/lib", true},
		{"root/app", "../../lib.git", "", false},
		{"root/app", "./lib.git", "", false},
		{"root/app", "https://example.com/lib.git", "", false},
	}
	for _, tt := range tests {
		got, ok := ResolveRelative(tt.project, tt.url)
		if got != tt.want || ok != tt.ok {
			t.Errorf("ResolveRelative(%q, %q) = %q %v, want %q %v", tt.project, tt.url, got, ok, tt.want, tt.ok)
		}
	}
}

// tokenAuth accepts gitlab-ci-token:<tok> for the projects listed for tok.
func tokenAuth(allowed map[string][]string) Authorizer {
	return func(r *http.Request, project string) error {
		user, pass, ok := r.BasicAuth()
		if !ok || user != "gitlab-ci-token" {
			return ErrUnauthorized
		}
		projects, known := allowed[pass]
		if !known {
			return ErrUnauthorized
		}
		for _, p := range projects {
			if p == project {
				return nil
			}
		}
		return ErrForbidden
	}
}

// serveStore imports a git project (root/app) and a plain one that names
// it as a submodule (root/site) and serves them on 127.0.0.1.
func serveStore(t testing.TB, allowed map[string][]string) (*Store, *httptest.Server, []*Repo) {
	needGit(t)
	src := gitProject(t)
	plain := t.TempDir()
	writeFiles(t, plain, map[string]string{"site.txt": "site\n", ".gitmodules": "[submodule \"lib\"]\n\tpath = lib\n\turl = ../app.git\n"})
	s, err := NewStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	repos, err := s.ImportAll(context.Background(), []Source{{Path: "root/app", Dir: src}, {Path: "root/site", Dir: plain}})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler(tokenAuth(allowed), nil))
	t.Cleanup(ts.Close)
	return s, ts, repos
}

func TestCloneOverSmartHTTP(t *testing.T) {
	_, ts, repos := serveStore(t, map[string][]string{"good": {"root/app", "root/site"}, "apponly": {"root/app"}})
	app, site := repos[0], repos[1]
	host := strings.TrimPrefix(ts.URL, "http://")
	work := t.TempDir()

	// As gitlab-runner fetches: a pipeline ref at depth 1, then checkout of the SHA.
	if err := site.SetRef(context.Background(), "refs/pipelines/7", site.Head); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(work, "runner")
	git(t, work, "init", "-q", dir)
	git(t, dir, "remote", "add", "origin", "http://gitlab-ci-token:good@"+host+"/root/site.git")
	git(t, dir, "fetch", "-q", "origin", "+refs/pipelines/7:refs/pipelines/7", "+refs/heads/main:refs/remotes/origin/main", "--depth", "1")
	git(t, dir, "checkout", "-q", "-f", site.Head)
	if got := git(t, dir, "rev-parse", "HEAD"); got != site.Head {
		t.Errorf("checked out %s, want %s", got, site.Head)
	}
	// The submodule's relative URL keeps the job token; its project is allowed.
	git(t, dir, "submodule", "update", "--init", "--depth", "1")
	if b, err := os.ReadFile(filepath.Join(dir, "lib", ".gitlab-ci.yml")); err != nil || string(b) != "a: {script: x}\n" {
		t.Errorf("submodule content %q %v", b, err)
	}
	if got := git(t, filepath.Join(dir, "lib"), "rev-parse", "HEAD"); got != app.Head {
		t.Errorf("submodule at %s, want %s", got, app.Head)
	}

	refused := []struct {
		name, url, want string
	}{
		{"no credentials", "http://" + host + "/root/app.git", "could not read Username"},
		{"wrong token", "http://gitlab-ci-token:bad@" + host + "/root/app.git", "Authentication failed"},
		{"token of another project", "http://gitlab-ci-token:apponly@" + host + "/root/site.git", "403"},
		{"unknown project", "http://gitlab-ci-token:good@" + host + "/root/none.git", "403"},
	}
	for i, c := range refused {
		out, err := gitErr(t, work, "clone", "-q", c.url, filepath.Join(work, "refused", string(rune('a'+i))))
		if err == nil || !strings.Contains(out, c.want) {
			t.Errorf("%s: err %v, output %q, want %q", c.name, err, out, c.want)
		}
	}
	// Read-only: a push is refused.
	clone := filepath.Join(work, "clone")
	git(t, work, "clone", "-q", "http://gitlab-ci-token:good@"+host+"/root/app.git", clone)
	git(t, clone, "commit", "-q", "--allow-empty", "-m", "push me")
	if out, err := gitErr(t, clone, "push", "-q", "origin", "HEAD:trunk"); err == nil || !strings.Contains(out, "403") {
		t.Errorf("push: err %v output %q", err, out)
	}
	if got := git(t, app.Dir, "rev-parse", "refs/heads/trunk"); got != app.Head {
		t.Errorf("the served branch moved to %s", got)
	}
	// Without credentials the server asks for them as GitLab does.
	res, err := http.Get(ts.URL + "/root/app.git/info/refs?service=git-upload-pack")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusUnauthorized || res.Header.Get("WWW-Authenticate") != `Basic realm="GitLab"` {
		t.Errorf("no credentials: %d %q", res.StatusCode, res.Header.Get("WWW-Authenticate"))
	}
	// Dumb HTTP is not served.
	res, err = http.Get("http://gitlab-ci-token:good@" + host + "/root/app.git/info/refs")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusForbidden {
		t.Errorf("dumb info/refs: %d", res.StatusCode)
	}
}

// BenchmarkCloneSample clones a served project with the git CLI over
// 127.0.0.1 at depth 1, as a runner does; it reports the time per clone.
func BenchmarkCloneSample(b *testing.B) {
	_, ts, _ := serveStore(b, map[string][]string{"good": {"root/app", "root/site"}})
	url := "http://gitlab-ci-token:good@" + strings.TrimPrefix(ts.URL, "http://") + "/root/app.git"
	work := b.TempDir()
	i := 0
	for b.Loop() {
		i++
		git(b, work, "clone", "-q", "--depth", "1", url, filepath.Join(work, "c", strings.Repeat("x", i%5+1)+string(rune('0'+i%10))+time.Now().Format("150405.000000000")))
	}
}

func TestRefreshKeepsPipelineRefs(t *testing.T) {
	needGit(t)
	ctx := context.Background()
	src := gitProject(t)
	plain := t.TempDir()
	writeFiles(t, plain, map[string]string{"a.txt": "one\n", ".gitignore": "build/\n", "build/out": "ignored\n"})
	s, err := NewStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	repos, err := s.ImportAll(ctx, []Source{{Path: "root/app", Dir: src}, {Path: "root/plain", Dir: plain}})
	if err != nil {
		t.Fatal(err)
	}
	app, pl := repos[0], repos[1]
	if tree := git(t, pl.Dir, "ls-tree", "-r", "--name-only", pl.Head); strings.Contains(tree, "build/out") {
		t.Errorf(".gitignore not honoured:\n%s", tree)
	}
	for _, r := range repos {
		if err := r.SetRef(ctx, "refs/pipelines/1", r.Head); err != nil {
			t.Fatal(err)
		}
	}
	// Unchanged plain directory: same commit.
	if r, before, err := s.Refresh(ctx, "root/plain"); err != nil || r.Head != pl.Head || before != pl.Head {
		t.Errorf("refresh unchanged: %v %v %v", r, before, err)
	}
	writeFiles(t, plain, map[string]string{"a.txt": "two\n"})
	r, before, err := s.Refresh(ctx, "root/plain")
	if err != nil || r.Head == pl.Head || before != pl.Head || git(t, r.Dir, "rev-parse", r.Head+"^") != pl.Head {
		t.Fatalf("refresh plain: %+v before %s err %v", r, before, err)
	}
	git(t, src, "commit", "-q", "-am", "second")
	ra, before, err := s.Refresh(ctx, "root/app")
	if err != nil || ra.Head != git(t, src, "rev-parse", "HEAD") || before != app.Head || s.Repo("root/app") != ra {
		t.Fatalf("refresh git: %+v before %s err %v", ra, before, err)
	}
	for _, r := range []*Repo{r, ra} {
		if got := git(t, r.Dir, "rev-parse", "refs/pipelines/1"); got == r.Head {
			t.Errorf("%s: refs/pipelines/1 moved to the new head", r.Path)
		}
	}
}
