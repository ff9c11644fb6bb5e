package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/gitlab"
	"github.com/mayfly-ci/mayfly/manager/mask"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/vmexec"
)

// jobRun is one job the manager runs: taken from GitLab by this process,
// or resumed from the journal of one that died or handed over.
type jobRun struct {
	m        *Manager
	r        *runner
	job      *runnerapi.JobResponse
	opts     buildscript.Options // the scripts' settings, journaled
	log      *slog.Logger
	phases   *phaseLog
	received time.Time

	j    *jobJournal   // nil: no state dir, or it could not be written
	copy *traceCopy    // the trace as GitLab gets it, beside the journal
	st   *journalState // what the journal said, when resumed
	tr   *gitlab.JobTrace
	out  *mask.Writer // the trace, masked
	dst  io.Writer    // where out writes: the trace and its copy
	// summaryDone: the trace has the summary line already (a resumed job
	// that ends with its trace copy)
	summaryDone bool

	lease Lease
	exec  vmexec.Executor
	ci    *providers.ConnectInfo // how to reach the instance, when known
	dir   string                 // the job's directory on the VM

	abandonOnce sync.Once
}

// Write writes a line of the manager's own to the trace, journaled first,
// so that a resumed job writes the same trace again.
func (jr *jobRun) Write(p []byte) (int, error) {
	jr.j.text(string(p))
	return jr.out.Write(p)
}

// startTrace starts the job's trace upload and its masking writer.
func (jr *jobRun) startTrace(ctx context.Context, secrets []string) error {
	tr, err := jr.r.client.StartJobTrace(ctx, jr.job.ID, jr.job.Token, gitlab.TraceOptions{
		OutputLimit:  jr.r.cfg.OutputLimitKB * 1024,
		Interval:     jr.m.traceInterval,
		ObservePatch: func(d time.Duration) { jr.phases.add(PhaseTraceFlush, d) },
		Acked:        jr.acked,
	})
	if err != nil {
		return err
	}
	jr.tr = tr
	var dst io.Writer = tr
	if jr.copy != nil {
		dst = teeTrace{copy: jr.copy, trace: tr}
	}
	jr.dst, jr.out = dst, mask.NewWriter(dst, secrets)
	return nil
}

// acked journals the trace offset GitLab acknowledged, now and then.
func (jr *jobRun) acked(offset int) {
	if jr.j != nil && offset-jr.j.ackedOffset() >= 64<<10 {
		jr.j.acked(offset)
	}
}

// abandon leaves the job to the next manager (a hand-over): the trace
// stops without a word to GitLab, then the journal takes no more records,
// in that order, so that no byte reaches GitLab that the journal cannot
// write again. The VM and its stages are left running.
func (jr *jobRun) abandon() {
	jr.abandonOnce.Do(func() {
		if jr.tr != nil {
			jr.tr.Abandon()
		}
		jr.j.freeze()
	})
}

// handingOver reports whether the manager is leaving its jobs to the next.
func (m *Manager) handingOver() bool { return m.handover.Load() }

// journalJob writes the journal of a job GitLab just handed out, with the
// script options it will run with, before anything else is done with it:
// the request path calls it before the job goes to its goroutine, so that
// a manager killed from then on leaves a journal the next one finishes the
// job from. Only the time GitLab's answer takes to reach this call is
// left (the runner API's pick-up window). It returns nil without a state
// directory or when the journal cannot be written (the job then runs
// without surviving a restart, and says so in the log).
func (m *Manager) journalJob(r *runner, job *runnerapi.JobResponse, opts buildscript.Options, received time.Time) *jobJournal {
	if m.stateDir == "" {
		return nil
	}
	payload, err := json.Marshal(job)
	var j *jobJournal
	if err == nil {
		j, err = createJobJournal(journalDir(m.stateDir), journalRecord{
			Runner: r.cfg.Name, URL: r.cfg.URL, JobID: job.ID, Token: job.Token, Payload: payload,
			Options: journaledOptions(opts), Version: m.version, At: received,
		}, m.now)
	}
	if err != nil {
		m.log.Error("job journal: the job will not survive a restart of the manager", "runner", r.cfg.Name, "job", job.ID, "err", err)
		return nil
	}
	m.log.Info("job journaled", "runner", r.cfg.Name, "job", job.ID, "journal", j.path)
	return j
}

// runJob takes the instance res promised, runs one job on it and reports
// the job to GitLab. It always ends the reservation and the lease, whatever
// happens, unless the manager hands its jobs over. j is the job's journal
// (journalJob), nil when there is none.
func (m *Manager) runJob(r *runner, job *runnerapi.JobResponse, opts buildscript.Options, j *jobJournal, res Reservation, wait time.Duration, received time.Time, phases *phaseLog) {
	jr := &jobRun{m: m, r: r, job: job, opts: opts, j: j, log: m.log.With("runner", r.cfg.Name, "job", job.ID), phases: phases, received: received}
	defer phases.log(jr.log)
	m.metrics.jobs.WithLabelValues(r.cfg.Name).Inc()
	defer m.metrics.jobs.WithLabelValues(r.cfg.Name).Dec()
	if jr.j != nil {
		var err error
		if jr.copy, err = createTraceCopy(traceCopyPath(jr.j.path), r.cfg.OutputLimitKB*1024); err != nil {
			jr.log.Error("job journal: a restarted manager that cannot reach the job's VM will not say why in its trace", "err", err)
		}
	}
	if !m.track(jr) {
		// Taken as the manager hands over: the next one runs it.
		res.Cancel()
		jr.j.close()
		jr.copy.close()
		return
	}
	defer m.untrack(jr)
	defer jr.copy.close()

	// The trace and final report outlive the job's own context: a timed-out
	// or canceled job still reports how it ended.
	plan0, perr := plan(job, jr.opts, "")
	sec := secrets(job)
	if perr == nil {
		sec = append(sec, plan0.Secrets...)
	}
	if err := jr.startTrace(context.Background(), sec); err != nil {
		jr.log.Error("start job trace", "err", err)
		res.Cancel()
		jr.j.remove()
		return
	}
	fmt.Fprint(jr, buildscript.Header("mayfly "+m.version, r.cfg.Name, gitlab.ShortToken(r.cfg.Token)))

	// A payload mayfly cannot run fails that job, never the manager, and
	// before it takes a VM: a bad payload must not cost an instance.
	if perr != nil {
		res.Cancel()
		jr.log.Error("bad job payload", "err", perr)
		jr.finish(systemFailure("the job payload cannot be run: %v", perr))
		return
	}
	acquireStart := m.now()
	lease, err := m.acquire(r, res, wait, jr.tr, jr)
	phases.since(PhaseAcquire, acquireStart)
	if err != nil {
		if !m.handingOver() {
			jr.log.Warn("no instance for the job", "err", err)
		}
		jr.finish(waitResult(err))
		return
	}
	jr.dir = jobDir(plan0, job.ID)
	jr.runOn(lease)
}

// runOn runs the job on lease's instance: connect (taking another VM, once,
// when it cannot be reached), journal the instance, run the stages, finish.
func (jr *jobRun) runOn(lease Lease) {
	lease, exec, err := jr.m.connectJob(jr.r, lease, jr.tr, jr, jr.phases, jr.log)
	jr.lease = lease
	if err != nil {
		jr.finish(connectResult(err))
		return
	}
	jr.exec = exec
	defer exec.Close()
	ci := leaseConnectInfo(lease)
	if err := jr.j.leased(lease.ID(), ci, jr.dir); err != nil {
		jr.log.Error("job journal: the job will not survive a restart of the manager", "err", err)
	}
	jr.finish(jr.execute())
}

// leaseConnectInfo returns how to reach a lease's instance, if it says.
func leaseConnectInfo(l Lease) providers.ConnectInfo {
	if c, ok := l.(interface{ ConnectInfo() providers.ConnectInfo }); ok {
		return c.ConnectInfo()
	}
	return providers.ConnectInfo{}
}

// execute runs the job's stages on jr.lease over jr.exec and decides its
// result.
func (jr *jobRun) execute() jobResult {
	m, r, job, lease, exec := jr.m, jr.r, jr.job, jr.lease, jr.exec
	jr.log = jr.log.With("instance", lease.ID())
	p, err := plan(job, jr.opts, lease.ID())
	if err != nil { // the payload was checked; only Via differs
		return systemFailure("the job payload cannot be run: %v", err)
	}
	p.Warnings = append(p.Warnings, imageIgnored(r, job)...)
	p.JobTimeout = capTimeout(p.JobTimeout, r.cfg.MaxJobTimeout)

	// The job's context ends at its deadline (the job timeout, capped by
	// the runner's hard cap, from the job's first start: journaled, so it
	// holds across restarts), on a cancel from GitLab (journaled too), on
	// loss of the VM, or when the whole manager aborts or hands over. The
	// deadline is journaled before the warnings: a resumed job that finds
	// it has its warnings in the journal's trace lines already.
	deadline := time.Time{}
	if jr.st != nil {
		deadline = jr.st.deadline
	}
	if deadline.IsZero() {
		deadline = m.now().Add(p.JobTimeout)
		jr.j.setDeadline(deadline)
		for _, w := range p.Warnings {
			fmt.Fprint(jr, buildscript.WarningLine(w))
		}
	}
	jobCtx, cancel := context.WithCancelCause(m.jobsCtx)
	defer cancel(nil)
	jobCtx, stopTimeout := context.WithDeadline(jobCtx, deadline)
	defer stopTimeout()
	if jr.st != nil && jr.st.canceled {
		cancel(errCanceled)
	}
	go func() {
		select {
		case <-jr.tr.Canceled():
			if !m.handingOver() {
				jr.j.cancel()
			}
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
	exec, err = retryOnNewConnection(jobCtx, exec, redial, helperUploadAttempts, func(e vmexec.Executor) error {
		return m.uploadHelper(jobCtx, r, p, e, jr.phases)
	}, jr.log)
	if err != nil {
		if res, ended := endedResult(jobCtx, p.JobTimeout); ended {
			return res
		}
		return systemFailure("%v", err)
	}
	stages, closeStages, err := m.newStageRunner(p, jr.dir, exec, redial)
	if err != nil {
		return systemFailure("the job's stages cannot run: %v", err)
	}
	defer closeStages()
	stages, closeContainers, err := m.containerStages(r, job, p, exec, stages)
	if err != nil {
		return systemFailure("the job's containers cannot run: %v", err)
	}
	defer closeContainers()
	if !detachable(p.Shell) {
		// Detached runners write the files with the first stage.
		uploadStart := m.now()
		for _, f := range p.Files {
			if err := exec.Upload(jobCtx, f.Path, f.Content, f.Mode); err != nil {
				if res, ended := endedResult(jobCtx, p.JobTimeout); ended {
					return res
				}
				return systemFailure("upload %s: %v", f.Path, err)
			}
		}
		if len(p.Files) > 0 {
			jr.phases.since(PhaseUpload, uploadStart)
		}
	}

	startOnce := jr.st != nil // a resumed job's start was counted before
	onStage := func(st buildscript.Stage) {
		if st.User && !startOnce {
			startOnce = true
			m.observeStart(r, job, jr.received)
		}
	}
	runner := jobRunner{Runner: stages, now: m.now, phases: jr.phases, lost: lease.Lost(),
		firstOutput: new(sync.Once), flush: jr.tr.FlushSoon, handover: m.handingOver}
	opts := buildscript.RunOptions{Now: m.now, OnStage: onStage}
	if jr.j != nil {
		opts.Progress = jr.j
	}
	res := p.Run(jobCtx, runner, jr.out, opts)
	if jr.st != nil && jr.st.result != nil {
		// The manager before decided it; the replay only wrote the trace.
		rr := jr.st.result
		return jobResult{state: rr.State, failureReason: rr.FailureReason, exitCode: rr.ExitCode, message: rr.Message}
	}
	// A lost VM and an abort end the job's context like a cancel does, but
	// they are the runner's failures, not the user's.
	if cause := context.Cause(jobCtx); errors.Is(cause, errInstanceLost) || errors.Is(cause, ErrAborted) {
		r, _ := endedResult(jobCtx, p.JobTimeout)
		return r
	}
	return jobResult{state: res.State, failureReason: res.FailureReason, exitCode: res.ExitCode, message: res.Message}
}

// finish reports the job's end: the result is journaled, the last trace
// line written, the final update sent, and only then the instance
// released (a manager killed in between finds the VM still there), and
// the journal removed. A job being handed over does none of it.
func (jr *jobRun) finish(result jobResult) {
	m, r := jr.m, jr.r
	if m.handingOver() {
		jr.abandon()
		jr.log.Info("job left running for the next manager")
		return
	}
	jr.j.result(result)
	if !jr.summaryDone {
		fmt.Fprint(jr.out, result.summaryLine())
	}
	if err := jr.out.Close(); err != nil {
		jr.log.Warn("flush trace", "err", err)
	}

	fctx, cancel := context.WithTimeout(context.Background(), finalReportTimeout)
	defer cancel()
	finalStart := m.now()
	err := jr.tr.Finish(fctx, result.state, result.failureReason, result.exitCode)
	jr.phases.since(PhaseFinalUpdate, finalStart)
	reported := err == nil || errors.Is(err, gitlab.ErrJobAborted)
	if !reported {
		if m.handingOver() {
			jr.abandon()
			return
		}
		jr.log.Error("report job result", "err", err)
	}

	if jr.lease != nil {
		releaseStart := m.now()
		if result.failureReason == runnerapi.FailureRunnerSystemFailure {
			discard(jr.lease) // whatever its uses left: it may be broken
		} else {
			jr.lease.Release(result.state != runnerapi.StateSuccess)
		}
		jr.phases.since(PhaseRelease, releaseStart)
	}
	if reported {
		if err := jr.j.remove(); err != nil {
			jr.log.Error("job journal", "err", err)
		}
	} else {
		jr.j.close() // GitLab may still take the result from a later manager
	}
	m.metrics.jobsTotal.WithLabelValues(r.cfg.Name, result.state, result.failureReason).Inc()
	if result.failureReason == runnerapi.FailureRunnerSystemFailure {
		m.metrics.systemFailures.WithLabelValues(r.cfg.Name).Inc()
	}
	m.metrics.jobDuration.WithLabelValues(r.cfg.Name).Observe(m.now().Sub(jr.received).Seconds())
	jr.log.Info("job finished", "state", result.state, "failure_reason", result.failureReason, "exit_code", result.exitCode, "duration", m.now().Sub(jr.received).Round(time.Millisecond))
}
