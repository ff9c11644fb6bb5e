package buildscript

import (
	"cmp"
	"net/http"
	"net/http/cgi"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/mayfly-ci/mayfly/internal/testenv"
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

// requireGit skips (fails under CI=true) when git is not installed.
func requireGit(t testing.TB) {
	t.Helper()
	testenv.LookPath(t, "git", "make setup installs it")
}

// gitServer serves the bare repositories under root over git's smart HTTP
// on 127.0.0.1, through Debian's git http-backend as a CGI program. Like
// GitLab for a private project, it wants basic auth with the user
// gitlab-ci-token and the job token as password, and answers 401 otherwise.
type gitServer struct {
	root  string
	token string
	host  string // 127.0.0.1:port
	// failNext answers this many more requests with 503 before serving.
	failNext atomic.Int32
	// authed and denied count requests with good credentials and 401s.
	authed, denied atomic.Int32
	// work holds a working repository per bare one, to make commits in.
	work map[string]string
	// formats names the object format of repositories not in sha1.
	formats map[string]string
}

func newGitServer(t testing.TB, token string) *gitServer {
	t.Helper()
	requireGit(t)
	backend := filepath.Join(git(t, t.TempDir(), "--exec-path"), "git-http-backend")
	if _, err := os.Stat(backend); err != nil {
		t.Fatalf("git http-backend: %v", err)
	}
	s := &gitServer{root: t.TempDir(), token: token, work: map[string]string{}, formats: map[string]string{}}
	cgiHandler := &cgi.Handler{
		Path: backend,
		Root: "/",
		Env:  []string{"GIT_PROJECT_ROOT=" + s.root, "GIT_HTTP_EXPORT_ALL=1", "GIT_CONFIG_NOSYSTEM=1", "HOME=" + s.root},
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.failNext.Add(-1) >= 0 {
			http.Error(w, "try again later", http.StatusServiceUnavailable)
			return
		}
		user, pass, ok := r.BasicAuth()
		if !ok || user != CredentialUser || pass != s.token {
			s.denied.Add(1)
			w.Header().Set("WWW-Authenticate", `Basic realm="GitLab"`)
			http.Error(w, "HTTP Basic: Access denied", http.StatusUnauthorized)
			return
		}
		s.authed.Add(1)
		cgiHandler.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	s.host = strings.TrimPrefix(srv.URL, "http://")
	return s
}

// url returns the repository's URL, with the given credentials when user is
// not empty (as GitLab puts the job token in git_info.repo_url).
func (s *gitServer) url(name, user, password string) string {
	if user == "" {
		return "http://" + s.host + "/grp/" + name + ".git"
	}
	return "http://" + user + ":" + password + "@" + s.host + "/grp/" + name + ".git"
}

// submodule is a gitlink to add to a commit.
type submodule struct{ path, url, sha string }

// commit commits files and gitlinks to repository name on branch main
// (creating it) and pushes it to the server; it returns the commit's sha.
func (s *gitServer) commit(t testing.TB, name string, files map[string]string, subs ...submodule) string {
	t.Helper()
	work, ok := s.work[name]
	if !ok {
		work = filepath.Join(t.TempDir(), name)
		format := "--object-format=" + cmp.Or(s.formats[name], "sha1")
		git(t, filepath.Dir(work), "init", "-q", "-b", "main", format, work)
		git(t, s.root, "init", "-q", "--bare", "-b", "main", format, filepath.Join("grp", name+".git"))
		s.work[name] = work
	}
	var gitmodules strings.Builder
	for _, sm := range subs {
		gitmodules.WriteString("[submodule \"" + sm.path + "\"]\n\tpath = " + sm.path + "\n\turl = " + sm.url + "\n")
		git(t, work, "update-index", "--add", "--cacheinfo", "160000,"+sm.sha+","+sm.path)
	}
	if len(subs) > 0 {
		files[".gitmodules"] = gitmodules.String()
	}
	for f, content := range files {
		if err := os.WriteFile(filepath.Join(work, f), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		git(t, work, "add", f)
	}
	git(t, work, "commit", "-q", "-m", "change")
	git(t, work, "push", "-q", filepath.Join(s.root, "grp", name+".git"), "main")
	return git(t, work, "rev-parse", "HEAD")
}

// demoRepos makes grp/lib (a file), grp/sub (a file and lib as submodule
// "deep" by the relative URL ../lib.git) and grp/demo (three commits of
// file.txt, with sub as submodule "sub" by ../sub.git). It returns demo's
// commits, oldest first.
func (s *gitServer) demoRepos(t testing.TB) []string {
	t.Helper()
	lib := s.commit(t, "lib", map[string]string{"lib.txt": "lib\n"})
	sub := s.commit(t, "sub", map[string]string{"sub.txt": "sub\n"}, submodule{"deep", "../lib.git", lib})
	shas := []string{s.commit(t, "demo", map[string]string{"file.txt": "one\n"}, submodule{"sub", "../sub.git", sub})}
	for _, c := range []string{"two", "three"} {
		shas = append(shas, s.commit(t, "demo", map[string]string{"file.txt": c + "\n"}))
	}
	return shas
}

// job is a job that checks out demo at sha with the server's token in its
// repo_url, as GitLab sends it, and prints HEAD and file.txt.
func (s *gitServer) job(sha string, vars ...runnerapi.Variable) *runnerapi.JobResponse {
	j := baseJob("git rev-parse HEAD", "cat file.txt")
	j.Token = s.token
	j.GitInfo = runnerapi.GitInfo{RepoURL: s.url("demo", CredentialUser, s.token), Ref: "main", Sha: sha, RefType: "branch",
		Refspecs: []string{"+refs/heads/main:refs/remotes/origin/main", "+refs/tags/*:refs/tags/*"}}
	j.Variables = vars
	return j
}

// noSecretIn fails when secret appears in any file under the given dirs
// (git's objects are compressed, but no object holds the token).
func noSecretIn(t testing.TB, secret string, dirs ...string) {
	t.Helper()
	for _, dir := range dirs {
		err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return err
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			if strings.Contains(string(b), secret) {
				t.Errorf("%s holds the job token:\n%s", p, b)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}
