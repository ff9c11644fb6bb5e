package gitlab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// JobRequestOutcome classifies the answer to POST /jobs/request.
type JobRequestOutcome int

// Outcomes of RequestJob.
const (
	// JobRequestFailed: no usable answer (transport error, unexpected status,
	// bad payload); the error says why. The runner stays healthy.
	JobRequestFailed JobRequestOutcome = iota
	// JobReceived: 201 with a decoded job.
	JobReceived
	// NoJob: 204, nothing to do.
	NoJob
	// JobConflict: 409, another request won the job; no job, healthy.
	JobConflict
	// RunnerForbidden: 403, GitLab rejects the runner token; unhealthy.
	RunnerForbidden
	// RateLimited: 429 without a usable RateLimit-ResetTime, or still 429 after the retries.
	RateLimited
)

var outcomeNames = [...]string{"failed", "job", "no_job", "conflict", "forbidden", "rate_limited"}

// String returns a short name for logs.
func (o JobRequestOutcome) String() string {
	if o >= 0 && int(o) < len(outcomeNames) {
		return outcomeNames[o]
	}
	return "outcome(" + strconv.Itoa(int(o)) + ")"
}

// JobRequestResult is what RequestJob returns.
type JobRequestResult struct {
	Outcome JobRequestOutcome
	// Job is set for JobReceived.
	Job *runnerapi.JobResponse
	// StatusCode is the HTTP status (0 when none arrived).
	StatusCode int
	// RetryAfter is the server's Retry-After (seconds form), 0 when absent.
	RetryAfter time.Duration
}

// Healthy reports whether the answer leaves the runner healthy; only a 403 does not.
func (r JobRequestResult) Healthy() bool { return r.Outcome != RunnerForbidden }

// RequestOptions are the optional parts of a job request.
type RequestOptions struct {
	// SystemID identifies this machine to GitLab (runner managers, GitLab >= 15.8).
	SystemID string
	// Session advertises an interactive terminal session endpoint.
	Session *runnerapi.SessionInfo
}

// JobPayloadError is returned when GitLab answered 201 but the job cannot be
// used (wrong content type, undecodable JSON, missing id/token). GitLab has
// already marked the job running, so the caller should fail it with
// runner_system_failure when JobID and Token could be read.
type JobPayloadError struct {
	// JobID is the job's id if it could be read from the body, else 0.
	JobID int64
	// Token is the job token if it could be read; never printed by Error.
	Token string
	// Err is the cause.
	Err error
}

// Error describes the problem and names the job when known.
func (e *JobPayloadError) Error() string {
	if e.JobID != 0 {
		return fmt.Sprintf("job %d: bad job payload: %v", e.JobID, e.Err)
	}
	return fmt.Sprintf("bad job payload: %v", e.Err)
}

// Unwrap returns the cause.
func (e *JobPayloadError) Unwrap() error { return e.Err }

// RequestJob calls POST /jobs/request for the runner token, sending the
// client's info and the last X-GitLab-Last-Update seen for that token. It is
// bounded by ctx and the HTTP client's timeouts only, so long polling works.
// err is non-nil exactly when the outcome is JobRequestFailed.
func (c *Client) RequestJob(ctx context.Context, token string, opts RequestOptions) (JobRequestResult, error) {
	if token == "" {
		return JobRequestResult{}, errors.New("request job: token is empty")
	}
	body, err := json.Marshal(runnerapi.JobRequest{
		Info:       c.info,
		Token:      token,
		SystemID:   opts.SystemID,
		LastUpdate: c.LastUpdate(token),
		Session:    opts.Session,
	})
	if err != nil {
		return JobRequestResult{}, fmt.Errorf("request job: encode: %w", err)
	}
	runner := ShortToken(token)
	resp, err := c.do(ctx, call{
		endpoint: EndpointRequestJob, method: http.MethodPost, path: "jobs/request",
		runner: runner, backoffKey: runnerBackoffKey(http.MethodPost, "jobs/request", token),
		body: body, contentType: "application/json", accept: true,
		lastUpdateToken: token, noCallTimeout: true,
	})
	if err != nil {
		return JobRequestResult{}, fmt.Errorf("request job for runner %s: %w", runner, err)
	}
	res := JobRequestResult{StatusCode: resp.status}
	switch resp.status {
	case http.StatusCreated:
		job, err := decodeJob(resp)
		if err != nil {
			return res, fmt.Errorf("request job for runner %s: %w", runner, err)
		}
		res.Outcome, res.Job = JobReceived, job
		c.rememberJob(job.ID, runner)
		c.log.Info("received job", "runner", runner, "job", job.ID)
		return res, nil
	case http.StatusNoContent:
		res.Outcome = NoJob
		return res, nil
	case http.StatusConflict:
		res.Outcome = JobConflict
		c.log.Warn("request job: conflict", "runner", runner)
		return res, nil
	case http.StatusForbidden:
		res.Outcome = RunnerForbidden
		c.log.Error("request job: runner token forbidden", "runner", runner)
		return res, nil
	case http.StatusTooManyRequests:
		res.Outcome, res.RetryAfter = RateLimited, parseRetryAfter(resp.header)
		c.log.Warn("request job: rate limited", "runner", runner, "retry_after", res.RetryAfter)
		return res, nil
	default:
		return res, fmt.Errorf("request job for runner %s: unexpected status %d", runner, resp.status)
	}
}

// decodeJob checks and decodes a 201 job payload.
func decodeJob(resp *response) (*runnerapi.JobResponse, error) {
	// Read what we can of the job's identity first, so errors can name it.
	var ident struct {
		ID    json.RawMessage `json:"id"`
		Token json.RawMessage `json:"token"`
	}
	perr := &JobPayloadError{}
	if json.Unmarshal(resp.body, &ident) == nil {
		_ = json.Unmarshal(ident.ID, &perr.JobID)
		_ = json.Unmarshal(ident.Token, &perr.Token)
	}
	if !isJSON(resp.header) {
		perr.Err = fmt.Errorf("server should return application/json, got %q", resp.header.Get("Content-Type"))
		return nil, perr
	}
	var job runnerapi.JobResponse
	if err := json.Unmarshal(resp.body, &job); err != nil {
		perr.Err = fmt.Errorf("decode: %w", err)
		return nil, perr
	}
	// Every field that reaches a header, a path, a command line or the
	// environment is checked here, once, before anything runs.
	if err := job.Validate(); err != nil {
		perr.Err = err
		return nil, perr
	}
	return &job, nil
}

// UpdateState classifies the answer to PUT /jobs/:id.
type UpdateState int

// States of UpdateJob.
const (
	// UpdateRetryLater: 5xx, other statuses or no answer; send again after the interval.
	UpdateRetryLater UpdateState = iota
	// UpdateSucceeded: 200.
	UpdateSucceeded
	// UpdateNotYet: 202, accepted but not completed; re-send the trace remainder and retry after the interval.
	UpdateNotYet
	// UpdateTraceValidationFailed: 412; re-send the whole trace, then the update.
	UpdateTraceValidationFailed
	// UpdateAborted: 403, 404, or Job-Status canceled/failed; stop updating the job.
	UpdateAborted
)

var updateNames = [...]string{"retry_later", "succeeded", "not_yet", "trace_validation_failed", "aborted"}

// String returns a short name for logs.
func (s UpdateState) String() string {
	if s >= 0 && int(s) < len(updateNames) {
		return updateNames[s]
	}
	return "update(" + strconv.Itoa(int(s)) + ")"
}

// UpdateResult is what UpdateJob returns.
type UpdateResult struct {
	State UpdateState
	// CancelRequested is set when the answer carried Job-Status: canceling.
	CancelRequested bool
	// UpdateInterval is X-GitLab-Trace-Update-Interval, 0 when absent or unusable.
	UpdateInterval time.Duration
	// StatusCode is the HTTP status (0 when none arrived).
	StatusCode int
	// JobStatus is the Job-Status header, if any.
	JobStatus string
}

// UpdateJob calls PUT /jobs/:id with req (job token in req.Token). A zero
// req.Info is replaced by the client's info.
func (c *Client) UpdateJob(ctx context.Context, id int64, req runnerapi.UpdateJobRequest) (UpdateResult, error) {
	switch {
	case id <= 0:
		return UpdateResult{}, fmt.Errorf("update job: id must be positive, got %d", id)
	case req.Token == "":
		return UpdateResult{}, fmt.Errorf("update job %d: token (job token) is empty", id)
	case req.State == "":
		return UpdateResult{}, fmt.Errorf("update job %d: state is empty", id)
	}
	if req.Info == (runnerapi.VersionInfo{}) {
		req.Info = c.info
	}
	body, err := json.Marshal(req)
	if err != nil {
		return UpdateResult{}, fmt.Errorf("update job %d: encode: %w", id, err)
	}
	path := "jobs/" + strconv.FormatInt(id, 10)
	resp, err := c.do(ctx, call{
		endpoint: EndpointUpdateJob, method: http.MethodPut, path: path,
		runner: c.runnerOfJob(id), backoffKey: jobBackoffKey(http.MethodPut, id),
		body: body, contentType: "application/json",
	})
	if err != nil {
		return UpdateResult{}, fmt.Errorf("update job %d (state %s): %w", id, req.State, err)
	}
	js := jobStatus(resp.header)
	res := UpdateResult{
		StatusCode:      resp.status,
		JobStatus:       js,
		CancelRequested: js == runnerapi.StateCanceling,
		UpdateInterval:  parseUpdateInterval(resp.header),
	}
	switch {
	case resp.status == http.StatusForbidden || js == runnerapi.StateCanceled || js == runnerapi.StateFailed:
		res.State = UpdateAborted
	case resp.status == http.StatusOK:
		res.State = UpdateSucceeded
	case resp.status == http.StatusAccepted:
		res.State = UpdateNotYet
	case resp.status == http.StatusPreconditionFailed:
		res.State = UpdateTraceValidationFailed
	case resp.status == http.StatusNotFound:
		res.State = UpdateAborted
	default:
		res.State = UpdateRetryLater
	}
	return res, nil
}

// PatchState classifies the answer to PATCH /jobs/:id/trace.
type PatchState int

// States of PatchTrace.
const (
	// PatchFailed: 5xx, other statuses or no answer; retry later from the same offset.
	PatchFailed PatchState = iota
	// PatchSucceeded: 202; continue from NewOffset.
	PatchSucceeded
	// PatchRangeMismatch: 416; resume from NewOffset (the server's trace size).
	PatchRangeMismatch
	// PatchNotFound: 404; the job keeps going.
	PatchNotFound
	// PatchAborted: 403 or Job-Status canceled/failed; stop the job.
	PatchAborted
)

var patchNames = [...]string{"failed", "succeeded", "range_mismatch", "not_found", "aborted"}

// String returns a short name for logs.
func (s PatchState) String() string {
	if s >= 0 && int(s) < len(patchNames) {
		return patchNames[s]
	}
	return "patch(" + strconv.Itoa(int(s)) + ")"
}

// PatchResult is what PatchTrace returns.
type PatchResult struct {
	State PatchState
	// NewOffset is where the next chunk starts: offset+len(chunk) on success,
	// the server's size from "Range: 0-N" on 416 (0 if the header is unusable,
	// which re-sends the whole trace), else the offset sent.
	NewOffset int
	// CancelRequested is set when the answer carried Job-Status: canceling.
	CancelRequested bool
	// UpdateInterval is X-GitLab-Trace-Update-Interval, 0 when absent or unusable.
	UpdateInterval time.Duration
	// StatusCode is the HTTP status (0 when none arrived).
	StatusCode int
	// JobStatus is the Job-Status header, if any.
	JobStatus string
}

// PatchTrace calls PATCH /jobs/:id/trace with chunk placed at offset
// (Content-Range "offset-end" with an inclusive end). An empty chunk is not
// sent and succeeds at once; chunks larger than MaxTraceChunk are refused.
func (c *Client) PatchTrace(ctx context.Context, id int64, jobToken string, offset int, chunk []byte) (PatchResult, error) {
	res := PatchResult{NewOffset: offset}
	switch {
	case id <= 0:
		return res, fmt.Errorf("patch trace: id must be positive, got %d", id)
	case jobToken == "":
		return res, fmt.Errorf("patch trace of job %d: job token is empty", id)
	case offset < 0:
		return res, fmt.Errorf("patch trace of job %d: offset must not be negative, got %d", id, offset)
	case len(chunk) > MaxTraceChunk:
		return res, fmt.Errorf("patch trace of job %d: chunk of %d bytes exceeds %d", id, len(chunk), MaxTraceChunk)
	case len(chunk) == 0:
		res.State = PatchSucceeded
		return res, nil
	}
	end := offset + len(chunk) - 1
	resp, err := c.do(ctx, call{
		endpoint: EndpointPatchTrace, method: http.MethodPatch,
		path:   "jobs/" + strconv.FormatInt(id, 10) + "/trace",
		runner: c.runnerOfJob(id), backoffKey: jobBackoffKey(http.MethodPatch, id),
		body: chunk, contentType: "text/plain", jobToken: jobToken,
		extra: http.Header{runnerapi.HeaderContentRange: {strconv.Itoa(offset) + "-" + strconv.Itoa(end)}},
	})
	if err != nil {
		return res, fmt.Errorf("patch trace of job %d at %d: %w", id, offset, err)
	}
	js := jobStatus(resp.header)
	res.StatusCode = resp.status
	res.JobStatus = js
	res.CancelRequested = js == runnerapi.StateCanceling
	res.UpdateInterval = parseUpdateInterval(resp.header)
	switch {
	case resp.status == http.StatusForbidden || js == runnerapi.StateCanceled || js == runnerapi.StateFailed:
		res.State = PatchAborted
	case resp.status == http.StatusAccepted:
		res.State, res.NewOffset = PatchSucceeded, end+1
	case resp.status == http.StatusNotFound:
		res.State = PatchNotFound
	case resp.status == http.StatusRequestedRangeNotSatisfiable:
		res.State = PatchRangeMismatch
		n, ok := parseRangeEnd(resp.header.Get(runnerapi.HeaderRange))
		if !ok {
			c.log.Warn("patch trace: 416 without a usable Range, re-sending the whole trace",
				"job", id, "range", resp.header.Get(runnerapi.HeaderRange))
			n = 0
		}
		res.NewOffset = n
	default:
		res.State = PatchFailed
	}
	return res, nil
}

// jobStatus returns the Job-Status header, trimmed and lower-cased.
func jobStatus(h http.Header) string {
	return strings.ToLower(strings.TrimSpace(h.Get(runnerapi.HeaderJobStatus)))
}

// parseRangeEnd reads N from a "0-N" Range header.
func parseRangeEnd(v string) (int, bool) {
	v = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), "bytes="))
	_, end, ok := strings.Cut(v, "-")
	if !ok {
		return 0, false
	}
	n, err := strconv.Atoi(strings.TrimSpace(end))
	if err != nil || n < 0 {
		return 0, false
	}
	return n, true
}
