package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/manager/coordinator/gitlabci"
	"github.com/mayfly-ci/mayfly/manager/coordinator/gitrepo"
)

// repoPipelineTimeout bounds creating a pipeline from a repository (git commands).
const repoPipelineTimeout = 2 * time.Minute

// serveRoot handles what no other route takes: git's smart HTTP at
// /<namespace>/<project>.git/…, else 404.
func (s *Server) serveRoot(w http.ResponseWriter, r *http.Request) {
	if _, _, ok := gitrepo.SplitPath(r.URL.Path); ok {
		s.mu.Lock()
		h := s.gitHandler
		s.mu.Unlock()
		if h != nil {
			h.ServeHTTP(w, r)
			return
		}
	}
	writeMessage(w, http.StatusNotFound, "404 Not Found")
}

// adminCredential reports whether password is the push token or the admin token.
func (s *Server) adminCredential(password string) bool {
	return password != "" && (tokenEqual(password, s.cfg.PushToken) || (s.cfg.AdminToken != "" && tokenEqual(password, s.cfg.AdminToken)))
}

// authorizeGit lets a request read a project's repository as GitLab does:
// HTTP basic gitlab-ci-token:<job token> while that job runs, for its own
// project and the projects its submodules name; or any user name with the
// push (or admin) token, for every project.
func (s *Server) authorizeGit(r *http.Request, project string) error {
	user, pass, ok := r.BasicAuth()
	if !ok {
		return gitrepo.ErrUnauthorized
	}
	if s.adminCredential(pass) {
		return nil
	}
	if user != "gitlab-ci-token" {
		return gitrepo.ErrUnauthorized
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	j := s.jobsByToken[pass]
	if j == nil || !j.processing() {
		return gitrepo.ErrUnauthorized
	}
	if !slices.Contains(j.pipeline.readable, project) {
		return gitrepo.ErrForbidden
	}
	return nil
}

// projectByIDOrPath finds a project by numeric id or full path ("root/app"), under s.mu.
func (s *Server) projectByIDOrPath(v string) *project {
	if id, err := strconv.ParseInt(v, 10, 64); err == nil {
		return s.projects[id]
	}
	return s.projectsByPath[v]
}

// apiPipeline is GitLab's pipeline JSON (the fields a client reads).
type apiPipeline struct {
	ID        int64     `json:"id"`
	IID       int       `json:"iid"`
	ProjectID int64     `json:"project_id"`
	SHA       string    `json:"sha"`
	Ref       string    `json:"ref"`
	Status    string    `json:"status"`
	Source    string    `json:"source"`
	Name      string    `json:"name,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	WebURL    string    `json:"web_url"`
}

// handleCreatePipeline is GitLab's POST /api/v4/projects/:id/pipeline?ref=…
// (ref also in a JSON body), authenticated with PRIVATE-TOKEN: the push or
// admin token. It refreshes the repository from its directory first.
func (s *Server) handleCreatePipeline(w http.ResponseWriter, r *http.Request) {
	tok := r.Header.Get("Private-Token")
	if tok == "" {
		tok = r.URL.Query().Get("private_token")
	}
	if !s.adminCredential(tok) {
		writeMessage(w, http.StatusUnauthorized, "401 Unauthorized")
		return
	}
	ref := r.URL.Query().Get("ref")
	if r.ContentLength != 0 && strings.Contains(r.Header.Get("Content-Type"), "json") {
		var body struct {
			Ref       string            `json:"ref"`
			Variables []json.RawMessage `json:"variables"`
		}
		if _, ok := decodeJSON(w, r, &body); !ok {
			return
		}
		if body.Ref != "" {
			ref = body.Ref
		}
		if len(body.Variables) > 0 {
			writeJSON(w, http.StatusBadRequest, map[string]any{"message": map[string][]string{"variables": {"pipeline variables are not supported by mayfly's coordinator"}}})
			return
		}
	}
	if ref == "" && strings.Contains(r.Header.Get("Content-Type"), "form") {
		ref = r.PostFormValue("ref")
	}
	if ref == "" {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "ref is missing"})
		return
	}
	s.mu.Lock()
	p := s.projectByIDOrPath(r.PathValue("id"))
	s.mu.Unlock()
	if p == nil {
		writeMessage(w, http.StatusNotFound, "404 Project Not Found")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), repoPipelineTimeout)
	defer cancel()
	rec, err := s.CreateRepoPipeline(ctx, p.id, ref, "api")
	var cfgErr *gitlabci.Error
	var noPipeline *gitlabci.NoPipelineError
	switch {
	case errors.As(err, &noPipeline):
		writeJSON(w, http.StatusBadRequest, map[string]any{"message": map[string][]string{"base": {"Pipeline will not run for the selected trigger. " + noPipeline.Reason}}})
		return
	case errors.As(err, &cfgErr):
		writeJSON(w, http.StatusBadRequest, map[string]any{"message": map[string][]string{"base": {cfgErr.Error()}}})
		return
	case err != nil:
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, s.apiPipeline(r, rec.ID))
}

// apiPipeline renders pipeline id as GitLab's API does.
func (s *Server) apiPipeline(r *http.Request, id int64) apiPipeline {
	s.mu.Lock()
	defer s.mu.Unlock()
	pl := s.pipelines[id]
	return apiPipeline{ID: pl.id, IID: pl.iid, ProjectID: pl.project.id, SHA: pl.sha, Ref: pl.ref,
		Status: pipelineStatus(pl), Source: pl.source, Name: pl.name, CreatedAt: pl.createdAt.UTC(),
		WebURL: s.baseURL(r) + "/" + pl.project.fullPath() + "/-/pipelines/" + strconv.FormatInt(pl.id, 10)}
}

// handleGetPipeline is GitLab's GET /api/v4/projects/:id/pipelines/:pipeline_id
// (PRIVATE-TOKEN: the push or admin token).
func (s *Server) handleGetPipeline(w http.ResponseWriter, r *http.Request) {
	tok := r.Header.Get("Private-Token")
	if tok == "" {
		tok = r.URL.Query().Get("private_token")
	}
	if !s.adminCredential(tok) {
		writeMessage(w, http.StatusUnauthorized, "401 Unauthorized")
		return
	}
	id, err := strconv.ParseInt(r.PathValue("pid"), 10, 64)
	s.mu.Lock()
	p := s.projectByIDOrPath(r.PathValue("id"))
	pl := s.pipelines[id]
	found := err == nil && p != nil && pl != nil && pl.project == p
	s.mu.Unlock()
	if !found {
		writeMessage(w, http.StatusNotFound, "404 Not found")
		return
	}
	writeJSON(w, http.StatusOK, s.apiPipeline(r, id))
}

// pipelineStatus is the pipeline's status as GitLab sums it up (simplified).
func pipelineStatus(pl *pipeline) string {
	running, pending, failed, allFinal := false, false, false, true
	for _, j := range pl.jobs {
		if j.retried {
			continue
		}
		switch j.status {
		case StatusRunning, StatusCanceling:
			running = true
		case StatusPending:
			pending = true
		case StatusFailed:
			failed = failed || !j.failureAllowed()
		}
		allFinal = allFinal && IsFinal(j.status)
	}
	switch {
	case running:
		return "running"
	case pending:
		return "pending"
	case !allFinal:
		return "created"
	case failed:
		return "failed"
	}
	return "success"
}
