package coordinator

import (
	"cmp"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/manager/coordinator/registry"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// Request body bounds of the runner API.
const (
	maxJSONBody   = 1 << 20
	maxTraceChunk = 8 << 20
)

func (s *Server) routes() {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /api/v4/runners", s.handleRegister)
	mux.HandleFunc("DELETE /api/v4/runners", s.handleUnregister)
	mux.HandleFunc("POST /api/v4/runners/verify", s.handleVerify)
	mux.HandleFunc("POST /api/v4/jobs/request", s.handleJobRequest)
	mux.HandleFunc("PATCH /api/v4/jobs/{id}/trace", s.handleTrace)
	mux.HandleFunc("PUT /api/v4/jobs/{id}", s.handleUpdate)
	mux.HandleFunc("POST /api/v4/jobs/{id}/artifacts", s.handleUploadArtifacts)
	mux.HandleFunc("GET /api/v4/jobs/{id}/artifacts", s.handleDownloadArtifacts)
	mux.HandleFunc("POST /api/v4/projects/{id}/pipeline", s.handleCreatePipeline)
	mux.HandleFunc("GET /api/v4/projects/{id}/pipelines/{pid}", s.handleGetPipeline)
	mux.HandleFunc("/", s.serveRoot)
	if s.registry != nil {
		mux.Handle("/v2/", s.registry)
		mux.Handle("/v2", s.registry)
		mux.Handle(registry.TokenPath, s.registry)
	}
	mux.HandleFunc("/api/v4/", func(w http.ResponseWriter, r *http.Request) {
		writeMessage(w, http.StatusNotFound, "404 Not Found")
	})
	s.adminRoutes(mux)
	s.mux = mux
}

// reply is an HTTP answer computed under s.mu and written after unlocking.
type reply struct {
	status  int
	headers [][2]string
	body    []byte
	ctype   string
}

func (rp *reply) set(k, v string) { rp.headers = append(rp.headers, [2]string{k, v}) }

func (rp *reply) write(w http.ResponseWriter) {
	for _, h := range rp.headers {
		w.Header().Set(h[0], h[1])
	}
	if rp.body != nil {
		w.Header().Set("Content-Type", cmp.Or(rp.ctype, "application/json"))
	}
	w.WriteHeader(rp.status)
	if rp.body != nil {
		_, _ = w.Write(rp.body)
	}
}

func message(status int, msg string) *reply {
	b, _ := json.Marshal(map[string]string{"message": msg})
	return &reply{status: status, body: b}
}

func writeMessage(w http.ResponseWriter, status int, msg string) { message(status, msg).write(w) }

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeMessage(w, http.StatusInternalServerError, "500 encode response: "+err.Error())
		return
	}
	(&reply{status: status, body: b}).write(w)
}

// readBody reads at most limit bytes of the request body, answering 413/400 itself on failure.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, bool) {
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeMessage(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("413 body larger than %d bytes", limit))
		} else {
			writeMessage(w, http.StatusBadRequest, "400 read body: "+err.Error())
		}
		return nil, false
	}
	return b, true
}

// decodeJSON reads and decodes a JSON body (unknown keys allowed, as in GitLab).
func decodeJSON(w http.ResponseWriter, r *http.Request, v any) ([]byte, bool) {
	b, ok := readBody(w, r, maxJSONBody)
	if !ok {
		return nil, false
	}
	if err := json.Unmarshal(b, v); err != nil {
		writeMessage(w, http.StatusBadRequest, "400 Bad request - body: "+err.Error())
		return nil, false
	}
	return b, true
}

// writeErr maps the package's typed errors to GitLab-style replies.
func writeErr(w http.ResponseWriter, err error) {
	var fe *FieldError
	switch {
	case errors.As(err, &fe):
		field := cmp.Or(fe.Field, "base")
		writeJSON(w, http.StatusBadRequest, map[string]any{"message": map[string][]string{field: {fe.Msg}}, "error": err.Error()})
	case errors.Is(err, ErrForbidden):
		writeMessage(w, http.StatusForbidden, "403 Forbidden")
	case errors.Is(err, ErrNotFound):
		writeMessage(w, http.StatusNotFound, "404 "+err.Error())
	case errors.Is(err, ErrJobState), errors.Is(err, ErrLocked):
		writeMessage(w, http.StatusConflict, "409 "+err.Error())
	default:
		writeMessage(w, http.StatusInternalServerError, "500 "+err.Error())
	}
}

func (s *Server) handleRegister(w http.ResponseWriter, r *http.Request) {
	var req runnerapi.RegisterRunnerRequest
	body, ok := decodeJSON(w, r, &req)
	if !ok {
		return
	}
	// runnerapi.RegisterRunnerRequest.Active cannot tell "false" from "absent".
	var flags struct {
		Active *bool `json:"active"`
		Paused *bool `json:"paused"`
	}
	_ = json.Unmarshal(body, &flags)
	// GitLab rejects both keys together. runnerapi.RegisterRunnerRequest always
	// sends active, so a client setting Paused sends both: accept them when
	// they agree and refuse only a contradiction.
	if flags.Active != nil && flags.Paused != nil && *flags.Active == !*flags.Paused {
		flags.Active = nil
	}
	if flags.Active != nil && flags.Paused != nil {
		writeMessage(w, http.StatusBadRequest, "400 Bad request - active, paused are mutually exclusive")
		return
	}
	paused := (flags.Paused != nil && *flags.Paused) || (flags.Active != nil && !*flags.Active)
	rec, err := s.RegisterRunner(RunnerOptions{
		RegistrationToken: req.Token,
		Description:       req.Description,
		Tags:              parseTags(req.TagList),
		RunUntagged:       req.RunUntagged,
		Locked:            req.Locked,
		Paused:            paused,
		AccessLevel:       req.AccessLevel,
		MaximumTimeout:    req.MaximumTimeout,
	})
	if err != nil {
		s.log.Warn("runner registration refused", "err", err)
		writeErr(w, err)
		return
	}
	s.mu.Lock()
	if rn := s.runners[rec.ID]; rn != nil {
		rn.info = req.Info
	}
	s.mu.Unlock()
	writeJSON(w, http.StatusCreated, runnerapi.RegisterRunnerResponse{ID: rec.ID, Token: rec.Token})
}

func (s *Server) handleVerify(w http.ResponseWriter, r *http.Request) {
	var req runnerapi.RunnerTokenRequest
	if _, ok := decodeJSON(w, r, &req); !ok {
		return
	}
	s.mu.Lock()
	rn := s.runnersByToken[req.Token]
	var id int64
	if rn != nil {
		rn.contactedAt = s.now()
		id = rn.id
	}
	s.mu.Unlock()
	if rn == nil {
		writeMessage(w, http.StatusForbidden, "403 Forbidden")
		return
	}
	writeJSON(w, http.StatusOK, runnerapi.RegisterRunnerResponse{ID: id, Token: req.Token})
}

func (s *Server) handleUnregister(w http.ResponseWriter, r *http.Request) {
	var req runnerapi.RunnerTokenRequest
	if _, ok := decodeJSON(w, r, &req); !ok {
		return
	}
	if err := s.UnregisterRunner(req.Token); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// baseURL is the URL jobs see for this coordinator.
func (s *Server) baseURL(r *http.Request) string {
	if s.cfg.ExternalURL != "" {
		return s.cfg.ExternalURL
	}
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return scheme + "://" + r.Host
}

func noContent(lastUpdate string) *reply {
	rp := &reply{status: http.StatusNoContent}
	rp.set(runnerapi.HeaderLastUpdate, lastUpdate)
	return rp
}

// handleJobRequest is POST /api/v4/jobs/request. Every reply carries
// X-GitLab-Last-Update. On 204 it is the queue version the runner has now
// seen; a request presenting the current version is answered 204 at once
// (or held up to Config.LongPoll for a change). On 201 it is the version
// with the job id appended, which never equals a current version, so the
// runner's next request looks at the queue again.
func (s *Server) handleJobRequest(w http.ResponseWriter, r *http.Request) {
	if s.applyFault(w, r, FaultRequestJob) {
		return
	}
	s.mu.Lock()
	w.Header().Set(runnerapi.HeaderLastUpdate, s.versionString()) // also on 400/413
	s.mu.Unlock()
	var req runnerapi.JobRequest
	if _, ok := decodeJSON(w, r, &req); !ok {
		return
	}
	rp := s.requestJob(r, &req)
	rp.write(w)
}

func (s *Server) requestJob(r *http.Request, req *runnerapi.JobRequest) *reply {
	s.mu.Lock()
	rn := s.runnersByToken[req.Token]
	if rn == nil {
		v := s.versionString()
		s.mu.Unlock()
		rp := message(http.StatusForbidden, "403 Forbidden")
		rp.set(runnerapi.HeaderLastUpdate, v)
		return rp
	}
	rn.contactedAt = s.now()
	rn.info = req.Info
	if rn.paused {
		v := s.versionString()
		s.mu.Unlock()
		return noContent(v)
	}
	if req.LastUpdate != "" && req.LastUpdate == s.versionString() {
		if s.cfg.LongPoll <= 0 {
			s.mu.Unlock()
			return noContent(req.LastUpdate)
		}
		changed := s.queueChanged
		s.mu.Unlock()
		s.held.Add(1)
		defer s.held.Add(-1)
		t := time.NewTimer(s.cfg.LongPoll)
		defer t.Stop()
		select {
		case <-changed:
		case <-t.C:
			return noContent(req.LastUpdate)
		case <-r.Context().Done():
			return noContent(req.LastUpdate)
		}
		s.mu.Lock()
		if rn = s.runnersByToken[req.Token]; rn == nil || rn.paused {
			v := s.versionString()
			s.mu.Unlock()
			if rn == nil {
				return message(http.StatusForbidden, "403 Forbidden")
			}
			return noContent(v)
		}
	}
	j := s.pickJob(rn)
	if j == nil {
		v := s.versionString()
		s.mu.Unlock()
		return noContent(v)
	}
	s.assign(j, rn)
	j.payload = s.payload(j, rn, s.baseURL(r))
	lastUpdate := s.versionString() + "-" + strconv.FormatInt(j.id, 10)
	resp, id, runnerID := j.payload, j.id, rn.id
	s.mu.Unlock()

	body, err := json.Marshal(resp)
	if err != nil { // cannot happen with these types; never leave the job running unseen
		s.mu.Lock()
		if j := s.jobs[id]; j != nil && j.processing() {
			j.failureReason = runnerapi.FailureRunnerSystemFailure
			s.finish(j, StatusFailed)
		}
		s.mu.Unlock()
		return message(http.StatusInternalServerError, "500 encode job: "+err.Error())
	}
	s.log.Info("job assigned", "job_id", id, "runner_id", runnerID, "runner_type", rn.typ)
	rp := &reply{status: http.StatusCreated, body: body}
	rp.set(runnerapi.HeaderLastUpdate, lastUpdate)
	return rp
}

func pathJobID(r *http.Request) (int64, bool) {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	return id, err == nil && id > 0
}

func tokenEqual(a, b string) bool { return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1 }

// authJob checks a job token under s.mu the way GitLab does: unknown job or
// wrong token → 403; a job not running (or canceling) → 403 with Job-Status.
// On refusal it still returns the job when it exists, with the reply, so the
// caller can record the refused call; ok tells whether the call may proceed.
func (s *Server) authJob(id int64, token string) (j *job, rp *reply, ok bool) {
	j = s.jobs[id]
	if j == nil {
		return nil, message(http.StatusForbidden, "403 Forbidden"), false
	}
	if token == "" || !tokenEqual(j.token, token) {
		return j, message(http.StatusForbidden, "403 Forbidden"), false
	}
	if !j.processing() {
		rp := message(http.StatusForbidden, "403 Forbidden - Job is not running")
		rp.set(runnerapi.HeaderJobStatus, j.status)
		return j, rp, false
	}
	return j, nil, true
}

// maxRecordedCalls bounds the trace patches and updates kept per job record;
// calls beyond it are counted in JobRecord.DroppedCalls.
const maxRecordedCalls = 10000

func (j *job) recordPatch(p TracePatch) {
	if len(j.patches) >= maxRecordedCalls {
		j.droppedCalls++
		return
	}
	j.patches = append(j.patches, p)
}

func (j *job) recordUpdate(u JobUpdate) {
	if len(j.updates) >= maxRecordedCalls {
		j.droppedCalls++
		return
	}
	j.updates = append(j.updates, u)
}

// refusal is the text of a refused reply, for the job record.
func refusal(rp *reply) string {
	var m struct {
		Message string `json:"message"`
	}
	if json.Unmarshal(rp.body, &m) == nil && m.Message != "" {
		return m.Message
	}
	return http.StatusText(rp.status)
}

// parseContentRange parses the runner's "start-end" (inclusive end; a
// "bytes " prefix is tolerated).
func parseContentRange(v string) (start, end int64, err error) {
	v = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), "bytes "))
	a, b, ok := strings.Cut(v, "-")
	if ok {
		start, err = strconv.ParseInt(a, 10, 64)
		if err == nil {
			end, err = strconv.ParseInt(b, 10, 64)
		}
	}
	if !ok || err != nil || start < 0 || end < start-1 {
		return 0, 0, fmt.Errorf("Content-Range %q is not start-end", v)
	}
	return start, end, nil
}

// handleTrace is PATCH /api/v4/jobs/:id/trace.
func (s *Server) handleTrace(w http.ResponseWriter, r *http.Request) {
	if s.applyFault(w, r, FaultPatchTrace) {
		return
	}
	id, ok := pathJobID(r)
	if !ok {
		writeMessage(w, http.StatusNotFound, "404 Job Not Found")
		return
	}
	token := r.Header.Get(runnerapi.HeaderJobToken)
	if token == "" {
		token = r.URL.Query().Get("token")
	}
	// Runners send chunks of at most 1 MiB; anything beyond the trace limit is dropped below.
	body, ok := readBody(w, r, int64(min(s.cfg.MaxTraceBytes, maxTraceChunk))+1)
	if !ok {
		return
	}
	s.mu.Lock()
	rp := s.appendTrace(id, token, r.Header.Get(runnerapi.HeaderContentRange), body)
	s.mu.Unlock()
	rp.write(w)
}

// appendTrace applies one PATCH under s.mu. Every call on an existing job is
// recorded in its Patches, refused ones (403, 400) included, with the reason.
func (s *Server) appendTrace(id int64, token, contentRange string, body []byte) *reply {
	j, rp, ok := s.authJob(id, token)
	if j == nil {
		return rp
	}
	now := s.now()
	patch := TracePatch{Time: now, Start: -1, ClaimedEnd: -1, Bytes: len(body)}
	start, end, rangeErr := parseContentRange(contentRange)
	if rangeErr == nil {
		patch.Start, patch.ClaimedEnd = start, end
	}
	switch {
	case !ok:
	case contentRange == "":
		rp = message(http.StatusBadRequest, "400 Missing header Content-Range")
	case rangeErr != nil:
		rp = message(http.StatusBadRequest, "400 "+rangeErr.Error())
	}
	if rp != nil {
		patch.Status, patch.Size, patch.Refused = rp.status, len(j.trace), refusal(rp)
		j.recordPatch(patch)
		return rp
	}
	j.lastSeenAt = now
	size := int64(len(j.trace))
	switch {
	case start != size:
		// GitLab appends only at the current end and reports where that is.
		rp = message(http.StatusRequestedRangeNotSatisfiable, "416 Range Not Satisfiable")
	case len(j.trace)+len(body) > s.cfg.MaxTraceBytes:
		j.failureReason = "trace_size_exceeded"
		s.finish(j, StatusFailed)
		s.log.Warn("job dropped: trace too large", "job_id", j.id, "limit", s.cfg.MaxTraceBytes)
		rp = message(http.StatusForbidden, "403 Forbidden - trace size exceeded")
	default:
		// The end the server computes is start+len(body), whatever the header says.
		j.trace = append(j.trace, body...)
		s.touch(j, now) // GitLab touches the job after a trace write
		rp = &reply{status: http.StatusAccepted}
	}
	patch.Status = rp.status
	patch.Size = len(j.trace)
	if rp.status != http.StatusAccepted {
		patch.Refused = refusal(rp)
	}
	j.recordPatch(patch)
	rp.set(runnerapi.HeaderRange, fmt.Sprintf("0-%d", len(j.trace)))
	rp.set(runnerapi.HeaderJobStatus, j.status)
	rp.set(runnerapi.HeaderTraceUpdateInterval, s.interval)
	return rp
}

// handleUpdate is PUT /api/v4/jobs/:id.
func (s *Server) handleUpdate(w http.ResponseWriter, r *http.Request) {
	if s.applyFault(w, r, FaultUpdateJob) {
		return
	}
	id, ok := pathJobID(r)
	if !ok {
		writeMessage(w, http.StatusNotFound, "404 Job Not Found")
		return
	}
	var req runnerapi.UpdateJobRequest
	if _, ok := decodeJSON(w, r, &req); !ok {
		return
	}
	if req.Token == "" {
		req.Token = r.Header.Get(runnerapi.HeaderJobToken)
	}
	s.mu.Lock()
	rp := s.updateJob(id, &req)
	s.mu.Unlock()
	rp.write(w)
}

// updateJob applies one PUT under s.mu. Every call on an existing job is
// recorded in its Updates, refused ones (403, 400) included, with the reason.
func (s *Server) updateJob(id int64, req *runnerapi.UpdateJobRequest) *reply {
	j, rp, ok := s.authJob(id, req.Token)
	if j == nil {
		return rp
	}
	now := s.now()
	upd := JobUpdate{
		Time:          now,
		State:         req.State,
		FailureReason: req.FailureReason,
		ExitCode:      req.ExitCode,
		Checksum:      cmp.Or(req.Output.Checksum, req.Checksum),
		Bytesize:      req.Output.Bytesize,
	}
	if !ok {
		upd.Status, upd.Refused = rp.status, refusal(rp)
		j.recordUpdate(upd)
		return rp
	}
	j.lastSeenAt = now
	switch req.State {
	case runnerapi.StateRunning:
		s.touch(j, now)
		rp = message(http.StatusOK, "200")
		if j.status == StatusCanceling {
			rp.set(runnerapi.HeaderJobStatus, j.status)
		}
	case runnerapi.StateSuccess, runnerapi.StateFailed:
		if upd.Bytesize > len(j.trace) && j.deferrals < maxFinalDeferrals {
			// Not all of the trace has arrived: ask the runner to send the
			// rest and update again, as GitLab does while it persists a trace.
			j.deferrals++
			rp = message(http.StatusAccepted, "202")
			break
		}
		j.runnerState = req.State
		j.exitCode = req.ExitCode
		if req.State == runnerapi.StateFailed {
			j.failureReason = runnerapi.FailureUnknownFailure
			if slices.Contains(failureReasons, req.FailureReason) {
				j.failureReason = req.FailureReason
			}
		}
		j.outChecksum, j.outBytesize = upd.Checksum, upd.Bytesize
		if upd.Checksum != "" || upd.Bytesize != 0 {
			ok := upd.Bytesize == len(j.trace) && (upd.Checksum == "" || upd.Checksum == runnerapi.TraceChecksum(j.trace))
			j.traceVerified = &ok
		}
		final := req.State
		if j.status == StatusCanceling {
			final = StatusCanceled
		}
		s.finish(j, final)
		s.log.Info("job finished", "job_id", j.id, "status", final, "failure_reason", j.failureReason, "exit_code", j.exitCode, "trace_bytes", len(j.trace))
		rp = message(http.StatusOK, "200")
	default:
		rp = message(http.StatusBadRequest, "400 Bad request - state does not have a valid value")
	}
	upd.Status = rp.status
	if rp.status == http.StatusBadRequest {
		upd.Refused = refusal(rp)
	}
	j.recordUpdate(upd)
	rp.set(runnerapi.HeaderTraceUpdateInterval, s.interval)
	return rp
}
