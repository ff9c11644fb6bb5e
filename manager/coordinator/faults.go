package coordinator

import (
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// Endpoints a Fault can target.
const (
	FaultRequestJob = "request_job" // POST /api/v4/jobs/request
	FaultPatchTrace = "patch_trace" // PATCH /api/v4/jobs/:id/trace
	FaultUpdateJob  = "update_job"  // PUT /api/v4/jobs/:id
)

// Fault makes the next Times calls to Endpoint fail with Status before they
// are handled, so tests can check how a runner copes with a GitLab under load
// or out of step. A 416 on the trace answers with the job's real stored size
// in Range, as GitLab does; a 429 with RetryAfter carries RateLimit-ResetTime.
type Fault struct {
	Endpoint   string
	Status     int
	Times      int
	RetryAfter time.Duration
}

type fault struct {
	Fault
	left int
}

// InjectFault arms f. Faults for one endpoint apply in the order injected.
func (s *Server) InjectFault(f Fault) error {
	switch f.Endpoint {
	case FaultRequestJob, FaultPatchTrace, FaultUpdateJob:
	default:
		return &FieldError{Field: "endpoint", Msg: fmt.Sprintf("%q is not %s, %s or %s", f.Endpoint, FaultRequestJob, FaultPatchTrace, FaultUpdateJob)}
	}
	if f.Status < 400 || f.Status > 599 || f.Times < 1 {
		return &FieldError{Field: "status", Msg: "a fault needs a 4xx/5xx status and Times >= 1"}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = append(s.faults, &fault{Fault: f, left: f.Times})
	return nil
}

// FaultsServed returns how many calls were answered by an injected fault.
func (s *Server) FaultsServed() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.faultsServed
}

// applyFault answers r with the first armed fault for endpoint, if any.
func (s *Server) applyFault(w http.ResponseWriter, r *http.Request, endpoint string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, f := range s.faults {
		if f.Endpoint != endpoint {
			continue
		}
		f.left--
		if f.left <= 0 {
			s.faults = append(s.faults[:i], s.faults[i+1:]...)
		}
		s.faultsServed++
		switch {
		case f.Status == http.StatusRequestedRangeNotSatisfiable && endpoint == FaultPatchTrace:
			size := 0
			if id, ok := pathJobID(r); ok && s.jobs[id] != nil {
				size = len(s.jobs[id].trace)
			}
			w.Header().Set(runnerapi.HeaderRange, "0-"+strconv.Itoa(size))
		case f.Status == http.StatusTooManyRequests && f.RetryAfter > 0:
			w.Header().Set(runnerapi.HeaderRateLimitResetTime, s.now().Add(f.RetryAfter).UTC().Format(http.TimeFormat))
		}
		writeMessage(w, f.Status, fmt.Sprintf("%d injected fault", f.Status))
		return true
	}
	return false
}
