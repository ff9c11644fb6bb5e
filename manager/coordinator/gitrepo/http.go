package gitrepo

import (
	"errors"
	"log/slog"
	"net/http"
	"net/http/cgi"
	"strings"
	"time"
)

// Errors an Authorizer returns.
var (
	// ErrUnauthorized: no or wrong credentials (401, git asks for them).
	ErrUnauthorized = errors.New("unauthorized")
	// ErrForbidden: valid credentials without access to this project (403).
	ErrForbidden = errors.New("forbidden")
)

// Authorizer decides whether a request may read project's repository:
// nil allows it, ErrUnauthorized or ErrForbidden refuse it.
type Authorizer func(r *http.Request, project string) error

// Limits of the smart HTTP handler.
const (
	maxGitProcesses = 16
	maxUploadPack   = 64 << 20 // a fetch negotiation body
	gitHTTPTimeout  = 10 * time.Minute
)

// SplitPath splits "/group/name.git/info/refs" into the project path
// ("group/name") and what follows ("info/refs").
func SplitPath(urlPath string) (project, rest string, ok bool) {
	p := strings.TrimPrefix(urlPath, "/")
	i := strings.Index(p, ".git/")
	if i <= 0 {
		return "", "", false
	}
	project, rest = p[:i], p[i+len(".git/"):]
	return project, rest, projectPath.MatchString(project)
}

// Handler serves the store's repositories read-only over git's smart HTTP
// protocol (protocol v0 and v2): GET <project>.git/info/refs?service=git-upload-pack
// and POST <project>.git/git-upload-pack, through `git http-backend`.
// Pushes and the dumb protocol are refused.
func (s *Store) Handler(auth Authorizer, log *slog.Logger) http.Handler {
	if log == nil {
		log = slog.Default()
	}
	sem := make(chan struct{}, maxGitProcesses)
	backend := &cgi.Handler{
		Path: s.g.git,
		Args: []string{"http-backend"},
		Env: []string{
			"GIT_PROJECT_ROOT=" + s.root,
			"GIT_HTTP_EXPORT_ALL=1",
			"GIT_CONFIG_NOSYSTEM=1",
			"GIT_CONFIG_GLOBAL=/dev/null",
			"HOME=" + s.g.home,
		},
		Logger: slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		project, rest, ok := SplitPath(r.URL.Path)
		if !ok {
			http.NotFound(w, r)
			return
		}
		if err := auth(r, project); err != nil {
			if errors.Is(err, ErrForbidden) {
				http.Error(w, "403 Forbidden: this token may not read "+project, http.StatusForbidden)
				return
			}
			w.Header().Set("WWW-Authenticate", `Basic realm="GitLab"`)
			http.Error(w, "HTTP Basic: Access denied", http.StatusUnauthorized)
			return
		}
		if s.Repo(project) == nil {
			http.Error(w, "404 project "+project+" not found", http.StatusNotFound)
			return
		}
		service := r.URL.Query().Get("service")
		switch {
		case rest == "info/refs" && r.Method == http.MethodGet && service == "git-upload-pack":
		case rest == "git-upload-pack" && r.Method == http.MethodPost:
			r.Body = http.MaxBytesReader(w, r.Body, maxUploadPack)
		case rest == "git-receive-pack" || service == "git-receive-pack":
			http.Error(w, "403 Forbidden: the coordinator's repositories are read-only", http.StatusForbidden)
			return
		case rest == "info/refs" && service == "":
			http.Error(w, "403 Forbidden: only git's smart HTTP protocol is served", http.StatusForbidden)
			return
		default:
			http.NotFound(w, r)
			return
		}
		select {
		case sem <- struct{}{}:
			defer func() { <-sem }()
		default:
			w.Header().Set("Retry-After", "1")
			http.Error(w, "503 too many git requests at once", http.StatusServiceUnavailable)
			return
		}
		rc := http.NewResponseController(w)
		deadline := time.Now().Add(gitHTTPTimeout)
		_ = rc.SetReadDeadline(deadline)
		_ = rc.SetWriteDeadline(deadline)
		// http-backend maps PATH_INFO onto GIT_PROJECT_ROOT.
		r2 := r.Clone(r.Context())
		r2.URL.Path = "/" + project + ".git/" + rest
		r2.URL.RawPath = ""
		backend.ServeHTTP(w, r2)
	})
}
