package buildscript

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
	"github.com/mayfly-ci/mayfly/manager/stagerun"
)

// Job statuses given to scripts in CI_JOB_STATUS.
const (
	JobStatusRunning  = "running"
	JobStatusSuccess  = "success"
	JobStatusFailed   = "failed"
	JobStatusCanceled = "canceled"
)

// Outcome is how one stage ended.
type Outcome struct {
	Stage StageName
	// AllowFailure copies Stage.AllowFailure: the outcome cannot fail the job.
	AllowFailure bool
	// ExitCode is the script's exit code when it ran to completion (Err nil).
	ExitCode int
	// TimedOut reports that the stage's own timeout stopped it.
	TimedOut bool
	// Timeout is the stage's own timeout, for the message.
	Timeout time.Duration
	// Err is set when the script did not run to completion for another
	// reason than the stage timeout: the transport or the VM failed, or the
	// job was canceled or timed out.
	Err error
}

// Failed reports whether the stage did not succeed.
func (o Outcome) Failed() bool { return o.Err != nil || o.TimedOut || o.ExitCode != 0 }

// Result is what to report to GitLab in the final PUT /jobs/:id.
type Result struct {
	State         string // runnerapi.StateSuccess or StateFailed
	FailureReason string // empty on success
	ExitCode      int    // the failing script's exit code; 0 when none
	// Message completes "ERROR: Job failed: " in the trace, e.g. "exit code 3".
	Message string
	// Outcomes are the stages that ran, in order.
	Outcomes []Outcome
}

// JobEnd says whether and how the job itself ended early.
type JobEnd struct {
	// TimedOut: the job timeout (or the runner's hard cap) expired.
	TimedOut bool
	// Timeout is the limit that expired, for the message.
	Timeout time.Duration
	// Canceled: GitLab canceled the job, or the manager aborted it.
	Canceled bool
	// FailureReasons are the reasons GitLab accepts (features.failure_reasons).
	FailureReasons []string
}

// alwaysAccepted are the failure reasons every GitLab accepts.
var alwaysAccepted = []string{
	runnerapi.FailureScriptFailure,
	runnerapi.FailureRunnerSystemFailure,
	runnerapi.FailureJobExecutionTimeout,
}

// Decide returns the job's result, following gitlab-runner:
//   - canceled: failed, "canceled", job_canceled if GitLab lists it, else unknown_failure;
//   - job timeout: failed, job_execution_timeout;
//   - otherwise the first stage that failed and does not allow failure decides:
//     a script exit code N is script_failure with exit_code N, a stage timeout
//     is job_execution_timeout, a transport or VM failure is runner_system_failure;
//   - otherwise success. after_script never changes the result.
func Decide(outcomes []Outcome, end JobEnd) Result {
	r := Result{State: runnerapi.StateFailed, Outcomes: outcomes}
	reason := func(s string) string {
		if slices.Contains(alwaysAccepted, s) || slices.Contains(end.FailureReasons, s) {
			return s
		}
		return runnerapi.FailureUnknownFailure
	}
	switch {
	case end.Canceled:
		r.FailureReason = reason(runnerapi.FailureJobCanceled)
		r.Message = "canceled"
		return r
	case end.TimedOut:
		r.FailureReason = runnerapi.FailureJobExecutionTimeout
		r.Message = fmt.Sprintf("execution took longer than %v seconds", end.Timeout)
		return r
	}
	for _, o := range outcomes {
		if o.AllowFailure || !o.Failed() {
			continue
		}
		switch {
		case o.TimedOut:
			r.FailureReason = runnerapi.FailureJobExecutionTimeout
			r.Message = fmt.Sprintf("%s took longer than %v", o.Stage, o.Timeout)
		case o.Err != nil:
			r.FailureReason = runnerapi.FailureRunnerSystemFailure
			var f *stagerun.Failure
			if errors.As(o.Err, &f) {
				r.FailureReason = compatibleReason(f.Reason, reason)
			}
			r.Message = o.Err.Error()
		default:
			r.FailureReason = runnerapi.FailureScriptFailure
			r.ExitCode = o.ExitCode
			r.Message = fmt.Sprintf("exit code %d", o.ExitCode)
		}
		return r
	}
	return Result{State: runnerapi.StateSuccess, Outcomes: outcomes}
}

// reasonFallback maps failure reasons that GitLab may not know to older
// ones, as gitlab-runner's failure reason mapper does.
var reasonFallback = map[string]string{
	runnerapi.FailureImagePullFailure:         runnerapi.FailureRunnerSystemFailure,
	runnerapi.FailureRunnerConfigurationError: runnerapi.FailureScriptFailure,
}

// compatibleReason returns want if GitLab accepts it (accepted maps a
// reason it does not to unknown_failure), else its fallback.
func compatibleReason(want string, accepted func(string) string) string {
	for range 3 {
		if r := accepted(want); r != runnerapi.FailureUnknownFailure {
			return r
		}
		next, ok := reasonFallback[want]
		if !ok {
			break
		}
		want = next
	}
	return runnerapi.FailureUnknownFailure
}

// JobEndFrom reads how a job context ended: its deadline (the job timeout) or
// a cancel. A context that has not ended gives the zero JobEnd.
func JobEndFrom(job context.Context, timeout time.Duration, failureReasons []string) JobEnd {
	end := JobEnd{FailureReasons: failureReasons, Timeout: timeout}
	switch err := job.Err(); {
	case err == nil:
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(context.Cause(job), context.DeadlineExceeded):
		end.TimedOut = true
	default:
		end.Canceled = true
	}
	return end
}
