package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/gitlab"
	"github.com/mayfly-ci/mayfly/manager/mask"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
	"github.com/mayfly-ci/mayfly/vmexec"
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

// runJob runs one job on lease and reports it to GitLab. It always ends the
// lease, whatever happens.
func (m *Manager) runJob(r *runner, job *runnerapi.JobResponse, lease Lease, received time.Time) {
	log := m.log.With("runner", r.cfg.Name, "job", job.ID, "instance", lease.ID())
	m.metrics.jobs.WithLabelValues(r.cfg.Name).Inc()
	defer m.metrics.jobs.WithLabelValues(r.cfg.Name).Dec()

	// The trace and final report outlive the job's own context: a timed-out
	// or canceled job still reports how it ended.
	reportCtx, stopReport := context.WithCancel(context.Background())
	defer stopReport()
	tr, err := r.client.StartJobTrace(reportCtx, job.ID, job.Token, gitlab.TraceOptions{OutputLimit: r.cfg.OutputLimitKB * 1024, Interval: m.traceInterval})
	if err != nil {
		log.Error("start job trace", "err", err)
		lease.Release(true)
		return
	}
	plan, planErr := buildscript.Generate(job, buildscript.Options{
		Shell:            r.cfg.Shell,
		BuildsDir:        r.cfg.BuildsDir,
		Environment:      r.cfg.Environment,
		PreCloneScript:   r.cfg.PreCloneScript,
		PreBuildScript:   r.cfg.PreBuildScript,
		PostBuildScript:  r.cfg.PostBuildScript,
		Via:              lease.ID(),
		RunnerVersion:    m.version,
		RunnerShortToken: gitlab.ShortToken(r.cfg.Token),
	})
	sec := secrets(job)
	if planErr == nil {
		sec = append(sec, plan.Secrets...) // expanded masked values
	}
	out := mask.NewWriter(tr, sec)
	fmt.Fprint(out, buildscript.Header("mayfly "+m.version, r.cfg.Name, gitlab.ShortToken(r.cfg.Token)))

	var res jobResult
	if planErr != nil {
		// A payload mayfly cannot run fails that job, never the manager.
		log.Error("bad job payload", "err", planErr)
		res = systemFailure("the job payload cannot be run: %v", planErr)
	} else {
		res = m.execute(r, job, plan, lease, out, tr, received)
	}

	fmt.Fprint(out, res.summaryLine())
	if err := out.Close(); err != nil {
		log.Warn("flush trace", "err", err)
	}
	lease.Release(res.state != runnerapi.StateSuccess)

	fctx, cancel := context.WithTimeout(reportCtx, finalReportTimeout)
	defer cancel()
	if err := tr.Finish(fctx, res.state, res.failureReason, res.exitCode); err != nil && !errors.Is(err, gitlab.ErrJobAborted) {
		log.Error("report job result", "err", err)
	}
	m.metrics.jobsTotal.WithLabelValues(r.cfg.Name, res.state, res.failureReason).Inc()
	if res.failureReason == runnerapi.FailureRunnerSystemFailure {
		m.metrics.systemFailures.WithLabelValues(r.cfg.Name).Inc()
	}
	m.metrics.jobDuration.WithLabelValues(r.cfg.Name).Observe(m.now().Sub(received).Seconds())
	log.Info("job finished", "state", res.state, "failure_reason", res.failureReason, "exit_code", res.exitCode, "duration", m.now().Sub(received).Round(time.Millisecond))
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

// stageExecutor runs buildscript stages on a vmexec.Executor.
type stageExecutor struct{ exec vmexec.Executor }

func (s stageExecutor) Run(ctx context.Context, shell, script string, out io.Writer) (int, error) {
	return s.exec.Run(ctx, vmexec.Command{Script: script, Shell: shell, Stdout: out, Stderr: out})
}

// execute runs the job's stages and decides its result.
func (m *Manager) execute(r *runner, job *runnerapi.JobResponse, plan *buildscript.Plan, lease Lease, out io.Writer, tr *gitlab.JobTrace, received time.Time) jobResult {
	for _, w := range plan.Warnings {
		fmt.Fprint(out, buildscript.WarningLine(w))
	}
	plan.JobTimeout = capTimeout(plan.JobTimeout, r.cfg.MaxJobTimeout)

	// The job's context ends at the job timeout, on a cancel from GitLab, on
	// loss of the VM, or when the whole manager aborts.
	jobCtx, cancel := context.WithCancelCause(m.jobsCtx)
	defer cancel(nil)
	jobCtx, stopTimeout := context.WithTimeout(jobCtx, plan.JobTimeout)
	defer stopTimeout()
	go func() {
		select {
		case <-tr.Canceled():
			cancel(errCanceled)
		case <-lease.Lost():
			cancel(errInstanceLost)
		case <-jobCtx.Done():
		}
	}()

	exec, err := lease.Connect(jobCtx)
	if err != nil {
		if res, ended := endedResult(jobCtx, plan.JobTimeout); ended {
			return res
		}
		return systemFailure("cannot connect to the VM %s: %v", lease.ID(), err)
	}
	defer exec.Close()
	for _, f := range plan.Files {
		if err := exec.Upload(jobCtx, f.Path, f.Content, f.Mode); err != nil {
			if res, ended := endedResult(jobCtx, plan.JobTimeout); ended {
				return res
			}
			return systemFailure("upload %s: %v", f.Path, err)
		}
	}

	startOnce := false
	onStage := func(st buildscript.Stage) {
		if st.User && !startOnce {
			startOnce = true
			m.observeStart(r, job, received)
		}
	}
	res := plan.Run(jobCtx, stageExecutor{exec}, out, m.now, onStage)
	// A lost VM and an abort end the job's context like a cancel does, but
	// they are the runner's failures, not the user's.
	if cause := context.Cause(jobCtx); errors.Is(cause, errInstanceLost) || errors.Is(cause, ErrAborted) {
		r, _ := endedResult(jobCtx, plan.JobTimeout)
		return r
	}
	return jobResult{state: res.State, failureReason: res.FailureReason, exitCode: res.ExitCode, message: res.Message}
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
