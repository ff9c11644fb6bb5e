package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/gitlab"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// finalReportTimeout bounds sending the final trace and status of a job.
const finalReportTimeout = 5 * time.Minute

// errCanceled and errInstanceLost are causes that end a job's context early.
var (
	errCanceled     = errors.New("job canceled in GitLab")
	errInstanceLost = errors.New("the job's VM disappeared")
)

// capTimeout is the job's own timeout capped by the runner's hard cap.
func capTimeout(jobTimeout, hardCap time.Duration) time.Duration {
	if hardCap > 0 && jobTimeout > hardCap {
		return hardCap
	}
	return jobTimeout
}

// secrets lists what must never appear in a trace: masked variable values
// and the job token.
func secrets(job *runnerapi.JobResponse) []string {
	out := []string{job.Token}
	for _, v := range job.Variables {
		if v.Masked && v.Value != "" {
			out = append(out, v.Value)
		}
	}
	return out
}

// instanceWaitTimeout bounds how long a job waits for the instance it was
// promised (taskscaler's instance_acquire_timeout has the same default).
const instanceWaitTimeout = 15 * time.Minute

// errNoInstance is the cause of an instance wait that timed out.
var errNoInstance = errors.New("no instance became ready in time")

// acquire takes the instance res promised. A job taken on demand says in
// its trace that it waits for a booting VM, and how long that should take.
// The wait ends early when GitLab cancels the job or the manager aborts.
func (m *Manager) acquire(r *runner, res Reservation, wait time.Duration, tr *gitlab.JobTrace, out io.Writer) (Lease, error) {
	if wait > 0 {
		m.metrics.onDemand.WithLabelValues(r.cfg.Name).Inc()
		fmt.Fprint(out, buildscript.LogLine(fmt.Sprintf("Waiting for a VM: none was idle, one is expected in about %s", wait.Round(time.Second))))
	}
	ctx, cancel := context.WithCancelCause(m.jobsCtx)
	defer cancel(nil)
	ctx, stop := context.WithTimeoutCause(ctx, instanceWaitTimeout, errNoInstance)
	defer stop()
	go func() {
		select {
		case <-tr.Canceled():
			cancel(errCanceled)
		case <-ctx.Done():
		}
	}()
	start := m.now()
	lease, err := res.Acquire(ctx)
	if err != nil {
		if cause := context.Cause(ctx); cause != nil {
			return nil, cause
		}
		return nil, err
	}
	if wait > 0 {
		fmt.Fprint(out, buildscript.LogLine(fmt.Sprintf("Got VM %s after %s", lease.ID(), m.now().Sub(start).Round(100*time.Millisecond))))
	}
	return lease, nil
}

// waitResult is the result of a job whose instance never came.
func waitResult(err error) jobResult {
	switch {
	case errors.Is(err, errCanceled):
		return jobResult{state: runnerapi.StateFailed, failureReason: runnerapi.FailureUnknownFailure, message: "canceled"}
	case errors.Is(err, errNoInstance):
		return systemFailure("no VM became ready within %v", instanceWaitTimeout)
	default:
		return systemFailure("no VM for the job: %v", err)
	}
}

// payloadError is a job payload that cannot be run.
type payloadError struct{ err error }

func (e *payloadError) Error() string { return e.err.Error() }

// scriptOptions are the runner settings a job's scripts are made with. A
// job keeps those it started with (they are journaled) when the manager is
// replaced by one with another configuration or version.
func (m *Manager) scriptOptions(r *runner) buildscript.Options {
	return buildscript.Options{
		Shell:            r.cfg.Shell,
		BuildsDir:        r.cfg.BuildsDir,
		Environment:      r.cfg.Environment,
		PreCloneScript:   r.cfg.PreCloneScript,
		PostCloneScript:  r.cfg.PostCloneScript,
		PreBuildScript:   r.cfg.PreBuildScript,
		PostBuildScript:  r.cfg.PostBuildScript,
		RunnerVersion:    m.version,
		RunnerShortToken: gitlab.ShortToken(r.cfg.Token),

		UseHelper:           m.helpers.available(r.cfg.Fleet.Connector.OS, r.cfg.Fleet.Connector.Arch),
		ServerURL:           r.cfg.URL,
		Cache:               m.caches[r.cfg.Name],
		MaxCacheArchiveSize: maxCacheArchiveSize(r.cfg),
	}
}

// journaledOptions is opts as the job journal keeps them: the cache's
// signer is this process's, taken again by a resumed job (cacheOf).
func journaledOptions(opts buildscript.Options) *buildscript.Options {
	opts.Cache = nil
	return &opts
}

// plan generates a job's build plan with opts for the instance named via
// ("" to check the payload before an instance is taken).
func plan(job *runnerapi.JobResponse, opts buildscript.Options, via string) (*buildscript.Plan, error) {
	opts.Via = via
	return buildscript.Generate(job, opts)
}

// jobResult is how a job ended.
type jobResult struct {
	state         string
	failureReason string
	exitCode      int
	message       string // why it failed, for the trace
}

func (r jobResult) summaryLine() string {
	if r.state == runnerapi.StateSuccess {
		return buildscript.JobSucceeded()
	}
	return buildscript.JobFailed(r.message)
}

func systemFailure(format string, args ...any) jobResult {
	return jobResult{state: runnerapi.StateFailed, failureReason: runnerapi.FailureRunnerSystemFailure, message: "(system failure) " + fmt.Sprintf(format, args...)}
}

// connectResult is the result of a job whose VM could not be reached.
func connectResult(err error) jobResult {
	if errors.Is(err, errCanceled) {
		return jobResult{state: runnerapi.StateFailed, failureReason: runnerapi.FailureUnknownFailure, message: "canceled"}
	}
	return systemFailure("%v", err)
}

// endedResult turns a job context that ended early into the job's result.
func endedResult(ctx context.Context, timeout time.Duration) (jobResult, bool) {
	if ctx.Err() == nil {
		return jobResult{}, false
	}
	switch cause := context.Cause(ctx); {
	case errors.Is(cause, context.DeadlineExceeded):
		return jobResult{state: runnerapi.StateFailed, failureReason: runnerapi.FailureJobExecutionTimeout, message: fmt.Sprintf("execution took longer than %v seconds", timeout)}, true
	case errors.Is(cause, errCanceled):
		return jobResult{state: runnerapi.StateFailed, failureReason: runnerapi.FailureUnknownFailure, message: "canceled"}, true
	case errors.Is(cause, errInstanceLost):
		return systemFailure("the VM running the job disappeared (preempted or deleted)"), true
	default:
		return systemFailure("%v", cause), true
	}
}

// observeStart records the queue-to-start and pickup-to-start times of a job
// whose script is about to start.
func (m *Manager) observeStart(r *runner, job *runnerapi.JobResponse, received time.Time) {
	pickup := m.now().Sub(received).Seconds()
	m.log.Info("job script starting", "runner", r.cfg.Name, "job", job.ID, "pickup_to_start_seconds", pickup, "time_in_queue_seconds", job.JobInfo.TimeInQueueSeconds)
	m.metrics.pickupToStart.WithLabelValues(r.cfg.Name).Observe(pickup)
	m.metrics.queueToStart.WithLabelValues(r.cfg.Name).Observe(job.JobInfo.TimeInQueueSeconds + pickup)
}
