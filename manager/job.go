package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
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

// instanceWaitTimeout bounds how long a job waits for the instance it was
// promised (taskscaler's instance_acquire_timeout has the same default).
const instanceWaitTimeout = 15 * time.Minute

// runJob takes the instance res promised, runs one job on it and reports
// the job to GitLab. It always ends the reservation and the lease, whatever
// happens.
func (m *Manager) runJob(r *runner, job *runnerapi.JobResponse, res Reservation, wait time.Duration, received time.Time, phases *phaseLog) {
	log := m.log.With("runner", r.cfg.Name, "job", job.ID)
	defer phases.log(log)
	m.metrics.jobs.WithLabelValues(r.cfg.Name).Inc()
	defer m.metrics.jobs.WithLabelValues(r.cfg.Name).Dec()

	// The trace and final report outlive the job's own context: a timed-out
	// or canceled job still reports how it ended.
	reportCtx, stopReport := context.WithCancel(context.Background())
	defer stopReport()
	tr, err := r.client.StartJobTrace(reportCtx, job.ID, job.Token, gitlab.TraceOptions{
		OutputLimit:  r.cfg.OutputLimitKB * 1024,
		Interval:     m.traceInterval,
		ObservePatch: func(d time.Duration) { phases.add(PhaseTraceFlush, d) },
	})
	if err != nil {
		log.Error("start job trace", "err", err)
		res.Cancel()
		return
	}
	// Nothing secret is written before the build plan exists; the writer
	// of the rest of the trace also masks the plan's expanded values.
	head := mask.NewWriter(tr, secrets(job))
	fmt.Fprint(head, buildscript.Header("mayfly "+m.version, r.cfg.Name, gitlab.ShortToken(r.cfg.Token)))

	// A payload mayfly cannot run fails that job, never the manager, and
	// before it takes a VM: a bad payload must not cost an instance.
	var lease Lease
	_, err = m.plan(r, job, "")
	if err != nil {
		res.Cancel()
		log.Error("bad job payload", "err", err)
		err = &payloadError{err}
	} else {
		acquireStart := m.now()
		lease, err = m.acquire(r, res, wait, tr, head)
		phases.since(PhaseAcquire, acquireStart)
	}
	if cerr := head.Close(); cerr != nil {
		log.Warn("flush trace", "err", cerr)
	}

	var result jobResult
	out := mask.NewWriter(tr, secrets(job))
	var perr *payloadError
	switch {
	case errors.As(err, &perr):
		result = systemFailure("the job payload cannot be run: %v", perr.err)
	case err != nil:
		result = waitResult(err)
		log.Warn("no instance for the job", "err", err)
	default:
		var exec vmexec.Executor
		lease, exec, err = m.connectJob(r, lease, tr, out, phases, log)
		if err != nil {
			result = connectResult(err)
			break
		}
		defer exec.Close()
		log = log.With("instance", lease.ID())
		plan, err := m.plan(r, job, lease.ID())
		if err != nil { // the payload was checked above; only Via differs
			result = systemFailure("the job payload cannot be run: %v", err)
			break
		}
		if err := out.Close(); err != nil {
			log.Warn("flush trace", "err", err)
		}
		out = mask.NewWriter(tr, append(secrets(job), plan.Secrets...)) // plus the expanded masked values
		result = m.execute(r, job, plan, lease, exec, out, tr, received, phases)
	}

	fmt.Fprint(out, result.summaryLine())
	if err := out.Close(); err != nil {
		log.Warn("flush trace", "err", err)
	}
	if lease != nil {
		releaseStart := m.now()
		if result.failureReason == runnerapi.FailureRunnerSystemFailure {
			discard(lease) // whatever its uses left: it may be broken
		} else {
			lease.Release(result.state != runnerapi.StateSuccess)
		}
		phases.since(PhaseRelease, releaseStart)
	}

	fctx, cancel := context.WithTimeout(reportCtx, finalReportTimeout)
	defer cancel()
	finalStart := m.now()
	if err := tr.Finish(fctx, result.state, result.failureReason, result.exitCode); err != nil && !errors.Is(err, gitlab.ErrJobAborted) {
		log.Error("report job result", "err", err)
	}
	phases.since(PhaseFinalUpdate, finalStart)
	m.metrics.jobsTotal.WithLabelValues(r.cfg.Name, result.state, result.failureReason).Inc()
	if result.failureReason == runnerapi.FailureRunnerSystemFailure {
		m.metrics.systemFailures.WithLabelValues(r.cfg.Name).Inc()
	}
	m.metrics.jobDuration.WithLabelValues(r.cfg.Name).Observe(m.now().Sub(received).Seconds())
	log.Info("job finished", "state", result.state, "failure_reason", result.failureReason, "exit_code", result.exitCode, "duration", m.now().Sub(received).Round(time.Millisecond))
}

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

// plan generates the job's build plan for the instance named via ("" to
// check the payload before an instance is taken).
func (m *Manager) plan(r *runner, job *runnerapi.JobResponse, via string) (*buildscript.Plan, error) {
	return buildscript.Generate(job, buildscript.Options{
		Shell:               r.cfg.Shell,
		BuildsDir:           r.cfg.BuildsDir,
		Environment:         r.cfg.Environment,
		PreCloneScript:      r.cfg.PreCloneScript,
		PostCloneScript:     r.cfg.PostCloneScript,
		PreBuildScript:      r.cfg.PreBuildScript,
		PostBuildScript:     r.cfg.PostBuildScript,
		Via:                 via,
		UseHelper:           m.helpers.available(r.cfg.Fleet.Connector.OS, r.cfg.Fleet.Connector.Arch),
		ServerURL:           r.cfg.URL,
		Cache:               m.caches[r.cfg.Name],
		MaxCacheArchiveSize: maxCacheArchiveSize(r.cfg),
		RunnerVersion:       m.version,
		RunnerShortToken:    gitlab.ShortToken(r.cfg.Token),
	})
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

// execute runs the job's stages and decides its result.
func (m *Manager) execute(r *runner, job *runnerapi.JobResponse, plan *buildscript.Plan, lease Lease, exec vmexec.Executor, out io.Writer, tr *gitlab.JobTrace, received time.Time, phases *phaseLog) jobResult {
	plan.Warnings = append(plan.Warnings, imageIgnored(r, job)...)
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

	// Connections opened to follow the stages after this one broke.
	var (
		redialMu sync.Mutex
		redialed []vmexec.Executor
	)
	defer func() {
		redialMu.Lock()
		defer redialMu.Unlock()
		for _, e := range redialed {
			e.Close()
		}
	}()
	redial := func(ctx context.Context) (vmexec.Executor, error) {
		e, err := lease.Connect(ctx)
		if err == nil {
			redialMu.Lock()
			redialed = append(redialed, e)
			redialMu.Unlock()
		}
		return e, err
	}
	if err := m.uploadHelper(jobCtx, r, plan, exec, phases); err != nil {
		if res, ended := endedResult(jobCtx, plan.JobTimeout); ended {
			return res
		}
		return systemFailure("%v", err)
	}
	stages, closeStages, err := m.newStageRunner(plan, jobDir(plan, job.ID), exec, redial)
	if err != nil {
		return systemFailure("the job's stages cannot run: %v", err)
	}
	defer closeStages()
	stages, closeContainers, err := m.containerStages(r, job, plan, exec, stages)
	if err != nil {
		return systemFailure("the job's containers cannot run: %v", err)
	}
	defer closeContainers()
	if !detachable(plan.Shell) {
		// Detached runners write the files with the first stage.
		uploadStart := m.now()
		for _, f := range plan.Files {
			if err := exec.Upload(jobCtx, f.Path, f.Content, f.Mode); err != nil {
				if res, ended := endedResult(jobCtx, plan.JobTimeout); ended {
					return res
				}
				return systemFailure("upload %s: %v", f.Path, err)
			}
		}
		if len(plan.Files) > 0 {
			phases.since(PhaseUpload, uploadStart)
		}
	}

	startOnce := false
	onStage := func(st buildscript.Stage) {
		if st.User && !startOnce {
			startOnce = true
			m.observeStart(r, job, received)
		}
	}
	runner := jobRunner{Runner: stages, now: m.now, phases: phases, lost: lease.Lost(), firstOutput: new(sync.Once), flush: tr.FlushSoon}
	res := plan.Run(jobCtx, runner, out, buildscript.RunOptions{Now: m.now, OnStage: onStage})
	// A lost VM and an abort end the job's context like a cancel does, but
	// they are the runner's failures, not the user's.
	if cause := context.Cause(jobCtx); errors.Is(cause, errInstanceLost) || errors.Is(cause, ErrAborted) {
		r, _ := endedResult(jobCtx, plan.JobTimeout)
		return r
	}
	return jobResult{state: res.State, failureReason: res.FailureReason, exitCode: res.ExitCode, message: res.Message}
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
