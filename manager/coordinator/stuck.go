package coordinator

import (
	"context"
	"fmt"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// Stuck running jobs, as GitLab drops them. GitLab's
// Ci::StuckBuilds::DropRunningService fails every running job whose
// updated_at is older than BUILD_RUNNING_OUTDATED_TIMEOUT (1 hour) with
// failure_reason stuck_or_timeout_failure. A runner moves updated_at with
// a trace PATCH that GitLab applied and with PUT state=running, but only
// when it is older than 15 minutes (Ci::Build#needs_touch?); taking the job
// moves it too. So a job whose runner died (a manager killed after GitLab
// handed it the job, before it read the answer) ends failed after about an
// hour instead of running for ever.
const (
	// DefaultStuckJobTimeout is GitLab's BUILD_RUNNING_OUTDATED_TIMEOUT.
	DefaultStuckJobTimeout = time.Hour
	// stuckTouchShare: a runner call moves a job's updated_at when it is
	// older than the stuck timeout divided by this (GitLab: 15 minutes of 1 hour).
	stuckTouchShare = 4
	// stuckSweepShare: the sweep runs every stuck timeout divided by this,
	// at most every maxStuckSweep (GitLab's worker runs hourly).
	stuckSweepShare = 12
	maxStuckSweep   = 5 * time.Minute
	minStuckSweep   = 10 * time.Millisecond
)

// StuckJobMessage is the line a job dropped as stuck gets at the end of its
// trace: GitLab's text for stuck_or_timeout_failure, as its job page shows it.
const StuckJobMessage = "There has been a timeout failure or the job got stuck. Check your timeout limits or try again"

// stuckSettings derives the stuck-job clean-up's timeout, touch
// granularity and sweep interval from the config (already validated).
func stuckSettings(cfg Config) (timeout, touch, sweep time.Duration) {
	timeout = cfg.StuckJobTimeout
	if timeout == 0 {
		timeout = DefaultStuckJobTimeout
	}
	if timeout < 0 {
		return 0, 0, 0
	}
	touch = cfg.StuckJobTouch
	switch {
	case touch == 0:
		touch = timeout / stuckTouchShare
	case touch < 0:
		touch = 0
	}
	sweep = min(max(timeout/stuckSweepShare, minStuckSweep), maxStuckSweep)
	return timeout, touch, sweep
}

// touch moves j's updated_at to now when it is older than the touch
// granularity (Ci::Build#needs_touch?), under s.mu.
func (s *Server) touch(j *job, now time.Time) {
	if now.Sub(j.touchedAt) > s.stuckTouch {
		j.touchedAt = now
	}
}

// DropStuckJobs fails every running job no runner call touched for the
// stuck-job timeout (Config.StuckJobTimeout) with stuck_or_timeout_failure,
// appends StuckJobMessage to its trace, and returns the ids of the jobs it
// dropped. RunStuckJobSweep calls it periodically; it does nothing when
// the clean-up is off.
func (s *Server) DropStuckJobs() []int64 {
	if s.stuckTimeout <= 0 {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	var dropped []*job
	for _, j := range s.jobOrder {
		// GitLab: Ci::Build.running.updated_at_before(timeout.ago); a
		// canceling job is not running.
		if j.status == StatusRunning && j.touchedAt.Before(now.Add(-s.stuckTimeout)) {
			dropped = append(dropped, j)
		}
	}
	ids := make([]int64, 0, len(dropped))
	for _, j := range dropped {
		idle := now.Sub(j.touchedAt)
		j.failureReason = runnerapi.FailureStuckOrTimeout
		j.trace = append(j.trace, []byte(fmt.Sprintf("\nERROR: Job failed (stuck_or_timeout_failure): %s (no runner call for %s; stuck-job timeout %s)\n",
			StuckJobMessage, idle.Round(time.Second), s.stuckTimeout))...)
		s.finish(j, StatusFailed)
		s.log.Warn("job dropped as stuck", "job_id", j.id, "runner_id", runnerID(j), "idle", idle.Round(time.Second), "failure_reason", j.failureReason)
		ids = append(ids, j.id)
	}
	return ids
}

func runnerID(j *job) int64 {
	if j.runner == nil {
		return 0
	}
	return j.runner.id
}

// RunStuckJobSweep calls DropStuckJobs every twelfth of the stuck-job
// timeout (at most every 5 minutes) until ctx ends. Serve runs it; a
// caller serving the Server through its own http.Server runs it itself.
// It returns at once when the clean-up is off.
func (s *Server) RunStuckJobSweep(ctx context.Context) {
	if s.stuckTimeout <= 0 {
		return
	}
	t := time.NewTicker(s.stuckSweep)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.DropStuckJobs()
		}
	}
}
