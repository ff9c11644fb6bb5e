package coordinator

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// AdminPrefix is where the admin API lives, apart from GitLab's /api/v4.
const AdminPrefix = "/-/mayfly"

// maxAdminBody bounds admin request bodies (pipeline files).
const maxAdminBody = 8 << 20

// maxAdminWait bounds GET /-/mayfly/wait.
const maxAdminWait = 10 * time.Minute

// adminRoutes registers the admin API:
//
//	GET  /-/mayfly/info                    registration token, queue version, counts
//	POST /-/mayfly/groups                  GroupSpec (JSON or YAML) → 201 GroupRecord
//	POST /-/mayfly/projects                ProjectSpec → 201 ProjectRecord
//	GET  /-/mayfly/projects                → []ProjectRecord
//	POST /-/mayfly/projects/{id}/pipelines PipelineSpec → 201 PipelineRecord
//	POST /-/mayfly/pipelines               PipelineFile → 201 ApplyResult
//	GET  /-/mayfly/pipelines/{id}          → PipelineRecord (status, warnings)
//	POST /-/mayfly/pipelines/{id}/cancel   → 200
//	GET  /-/mayfly/jobs[?status=running]   → []JobRecord without trace
//	GET  /-/mayfly/jobs/{id}               → JobRecord with "trace" as a string
//	GET  /-/mayfly/jobs/{id}/trace         → the raw trace bytes, text/plain
//	POST /-/mayfly/jobs/{id}/cancel        → 200 JobRecord (409 if already final)
//	GET  /-/mayfly/runners                 → []RunnerRecord
//	POST /-/mayfly/runners/{id}/pause      → 204 (and /resume)
//	POST /-/mayfly/wait?timeout=60s        → 200 when every job is final, 504 on timeout
//
// With Config.AdminToken set, every call needs it in the Private-Token header.
func (s *Server) adminRoutes(mux *http.ServeMux) {
	h := func(pattern string, f http.HandlerFunc) {
		method, path, _ := strings.Cut(pattern, " ")
		mux.HandleFunc(method+" "+AdminPrefix+path, s.adminAuth(f))
	}
	h("GET /info", s.adminInfo)
	h("POST /groups", adminCreate(s.CreateGroup))
	h("POST /projects", adminCreate(s.CreateProject))
	h("GET /projects", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, http.StatusOK, s.Projects()) })
	h("POST /projects/{id}/pipelines", s.adminEnqueue)
	h("POST /pipelines", s.adminApply)
	h("GET /pipelines/{id}", func(w http.ResponseWriter, r *http.Request) {
		id, ok := pathID(w, r)
		if !ok {
			return
		}
		rec, err := s.Pipeline(id)
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, http.StatusOK, rec)
	})
	h("POST /pipelines/{id}/cancel", s.adminCancelPipeline)
	h("GET /jobs", s.adminJobs)
	h("GET /jobs/{id}", s.adminJob)
	h("GET /jobs/{id}/trace", s.adminTrace)
	h("GET /jobs/{id}/artifacts", s.adminArtifacts)
	h("GET /jobs/{id}/artifacts/{type}", s.adminArtifactFile)
	h("POST /jobs/{id}/cancel", s.adminCancel)
	h("GET /runners", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, http.StatusOK, s.Runners()) })
	h("POST /runners/{id}/pause", s.adminPause(true))
	h("POST /runners/{id}/resume", s.adminPause(false))
	h("POST /wait", s.adminWait)
	mux.HandleFunc(AdminPrefix+"/", s.adminAuth(func(w http.ResponseWriter, r *http.Request) {
		writeMessage(w, http.StatusNotFound, "404 Not Found")
	}))
}

func (s *Server) adminAuth(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if s.cfg.AdminToken != "" && !tokenEqual(r.Header.Get("Private-Token"), s.cfg.AdminToken) {
			writeMessage(w, http.StatusUnauthorized, "401 Unauthorized")
			return
		}
		next(w, r)
	}
}

func pathID(w http.ResponseWriter, r *http.Request) (int64, bool) {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil || id <= 0 {
		writeMessage(w, http.StatusBadRequest, "400 id must be a positive integer")
		return 0, false
	}
	return id, true
}

// decodeSpec reads a JSON or YAML admin body into v via the pipeline-file decoder.
func decodeSpec(w http.ResponseWriter, r *http.Request, v any) bool {
	b, ok := readBody(w, r, maxAdminBody)
	if !ok {
		return false
	}
	if err := decodeStrict("request body", r.Header.Get("Content-Type"), b, v); err != nil {
		writeErr(w, err)
		return false
	}
	return true
}

func (s *Server) adminInfo(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	info := map[string]any{
		"registration_token": s.cfg.RegistrationToken,
		"queue_version":      s.versionString(),
		"projects":           len(s.projects),
		"runners":            len(s.runners),
		"jobs":               len(s.jobs),
		"held_long_polls":    s.held.Load(),
		"push_token":         s.cfg.PushToken,
		"external_url":       s.cfg.ExternalURL,
		"registry":           s.registry != nil,
	}
	if s.registry != nil {
		info["registry_used_bytes"] = s.registry.UsedBytes()
	}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, info)
}

// adminCreate decodes a spec, creates it and answers 201 with the record.
func adminCreate[S, R any](create func(S) (R, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var spec S
		if !decodeSpec(w, r, &spec) {
			return
		}
		rec, err := create(spec)
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, http.StatusCreated, rec)
	}
}

func (s *Server) adminEnqueue(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	var spec PipelineSpec
	if !decodeSpec(w, r, &spec) {
		return
	}
	rec, err := s.EnqueuePipeline(id, spec)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, rec)
}

func (s *Server) adminApply(w http.ResponseWriter, r *http.Request) {
	var f PipelineFile
	if !decodeSpec(w, r, &f) {
		return
	}
	if err := f.Validate("request body"); err != nil {
		writeErr(w, err)
		return
	}
	res, err := s.apply(&f, "request body")
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, res)
}

func (s *Server) adminCancelPipeline(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	if err := s.CancelPipeline(id); err != nil {
		writeErr(w, err)
		return
	}
	writeMessage(w, http.StatusOK, "200")
}

func (s *Server) adminJobs(w http.ResponseWriter, r *http.Request) {
	status := r.URL.Query().Get("status")
	out := []JobRecord{}
	for _, j := range s.Jobs() {
		if status == "" || j.Status == status {
			j.Patches, j.Updates = nil, nil
			out = append(out, j)
		}
	}
	writeJSON(w, http.StatusOK, out)
}

// jobWithTrace is JobRecord as the admin API shows it, trace as text.
type jobWithTrace struct {
	JobRecord
	TraceText string `json:"trace"`
}

func (s *Server) adminJob(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	rec, err := s.Job(id)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, jobWithTrace{JobRecord: rec, TraceText: string(rec.Trace)})
}

func (s *Server) adminTrace(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	rec, err := s.Job(id)
	if err != nil {
		writeErr(w, err)
		return
	}
	rp := &reply{status: http.StatusOK, body: rec.Trace, ctype: "text/plain; charset=utf-8"}
	if rp.body == nil {
		rp.body = []byte{}
	}
	rp.set(runnerapi.HeaderJobStatus, rec.Status)
	rp.write(w)
}

func (s *Server) adminCancel(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	rec, err := s.Cancel(id)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, rec)
}

func (s *Server) adminPause(paused bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id, ok := pathID(w, r)
		if !ok {
			return
		}
		if err := s.SetRunnerPaused(id, paused); err != nil {
			writeErr(w, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}
}

func (s *Server) adminWait(w http.ResponseWriter, r *http.Request) {
	timeout := time.Minute
	if v := r.URL.Query().Get("timeout"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 || d > maxAdminWait {
			writeMessage(w, http.StatusBadRequest, "400 timeout must be a duration between 0 and 10m")
			return
		}
		timeout = d
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeout)
	defer cancel()
	if err := s.WaitAllFinished(ctx); err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			writeMessage(w, http.StatusGatewayTimeout, "504 "+err.Error())
			return
		}
		writeMessage(w, http.StatusServiceUnavailable, "503 "+err.Error())
		return
	}
	writeMessage(w, http.StatusOK, "200 all jobs finished")
}
