package manager

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/config"
	"github.com/mayfly-ci/mayfly/manager/gitlab"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
	"github.com/mayfly-ci/mayfly/vmexec"
)

// errHandover is the cause of the jobs' context when the manager hands
// them over to the next one.
var errHandover = errors.New("runner manager hands its jobs over to the next one")

// reattachTimeout bounds reaching the VM of a resumed job.
const reattachTimeout = 2 * time.Minute

// HandOver stops asking for jobs and makes Run return at once, leaving the
// running jobs to the next manager started with the same state directory:
// their stages go on in their VMs, nothing is reported to GitLab, no
// instance is released, and their journals stay. Use it to upgrade or move
// a manager without draining it.
func (m *Manager) HandOver() {
	m.handoverOnce.Do(func() {
		m.log.Warn("handing over: no new jobs; running jobs are left to the next manager")
		m.Drain()
		m.handover.Store(true)
		m.trackMu.Lock()
		running := make([]*jobRun, 0, len(m.running))
		for jr := range m.running {
			running = append(running, jr)
		}
		m.trackMu.Unlock()
		for _, jr := range running {
			jr.abandon()
		}
		m.abortJobs(errHandover)
	})
}

// track registers a running job, for HandOver; false once handing over.
func (m *Manager) track(jr *jobRun) bool {
	m.trackMu.Lock()
	defer m.trackMu.Unlock()
	if m.handover.Load() {
		return false
	}
	m.running[jr] = struct{}{}
	return true
}

func (m *Manager) untrack(jr *jobRun) {
	m.trackMu.Lock()
	defer m.trackMu.Unlock()
	delete(m.running, jr)
}

// resumable is a job a previous manager left, found in its journal.
type resumable struct {
	path  string
	st    *journalState
	err   error   // the journal is damaged past st
	r     *runner // nil: its runner is no longer configured
	lease Lease   // its instance, claimed from the fleet
	claim error   // why the instance could not be claimed
}

// LoadJournals reads the journals of the jobs a previous manager left
// running and claims their instances from the fleets, so that the fleets'
// start-up clean-up keeps them. Call it before the fleets run; Run calls
// it when it was not called. The jobs resume when Run starts, before it
// asks GitLab for new ones.
func (m *Manager) LoadJournals() error {
	m.loadOnce.Do(func() { m.loadErr = m.loadJournals() })
	return m.loadErr
}

func (m *Manager) loadJournals() error {
	if m.stateDir == "" {
		return nil
	}
	recovered, removed, err := recoverNewJournals(journalDir(m.stateDir))
	if err != nil {
		return err
	}
	for _, p := range recovered {
		m.log.Warn("job journal completed: the manager before was killed as it created it", "path", p)
	}
	for _, p := range removed {
		m.log.Error("job journal removed: the manager before was killed before it wrote the job; the job cannot be finished and GitLab fails it as stuck", "path", p)
	}
	paths, err := listJobJournals(journalDir(m.stateDir))
	if err != nil {
		return err
	}
	m.log.Debug("job journals found", "dir", journalDir(m.stateDir), "count", len(paths))
	for _, path := range paths {
		st, err := readJobJournal(path)
		if st == nil {
			// Not even the job can be told: nothing to finish it with.
			m.log.Error("unreadable job journal set aside", "path", path, "err", err)
			if rerr := os.Rename(path, path+".unreadable"); rerr != nil {
				m.log.Error("set the journal aside", "path", path, "err", rerr)
			}
			continue
		}
		rs := &resumable{path: path, st: st, err: err}
		for _, r := range m.runners {
			if r.cfg.Name == st.job.Runner {
				rs.r = r
			}
		}
		// Even with the rest of its journal damaged, a job's instance is
		// claimed: its end then deletes it.
		if st.lease != nil && rs.r != nil {
			if c, ok := rs.r.fleet.(Claimer); ok && st.lease.Connect != nil {
				rs.lease, rs.claim = c.Claim(st.lease.Instance, *st.lease.Connect)
			} else {
				rs.claim = errors.New("the fleet cannot hand it back")
			}
		}
		m.log.Info("job to resume", "runner", st.job.Runner, "job", st.job.JobID, "instance", instanceOf(st), "journal", path)
		m.resumables = append(m.resumables, rs)
	}
	return nil
}

func instanceOf(st *journalState) string {
	if st.lease == nil {
		return ""
	}
	return st.lease.Instance
}

// resumeJobs starts the jobs found by LoadJournals; each takes a slot of
// concurrent and of its runner's limit when one is free.
func (m *Manager) resumeJobs() {
	for _, rs := range m.resumables {
		m.jobs.Add(1)
		slot := takeSlot(m.slots)
		var rslot bool
		if rs.r != nil && rs.r.slots != nil {
			rslot = takeSlot(rs.r.slots)
		}
		go func() {
			defer m.jobs.Done()
			defer m.signalJobEnd()
			defer func() {
				if rslot {
					<-rs.r.slots
				}
				if slot {
					<-m.slots
				}
			}()
			m.resumeJob(rs)
		}()
	}
	m.resumables = nil
}

// resumeJob finishes a job a previous manager started: it writes the trace
// again from the journal and the stages' output (GitLab's 416 says where
// it resumes), reattaches to the stages on the VM, keeps enforcing the
// journaled deadline and cancel, and reports the true result. When the VM
// cannot be had or reached, the job fails with runner_system_failure and a
// line saying why; it never stays running.
func (m *Manager) resumeJob(rs *resumable) {
	st := rs.st
	start := m.now()
	r := rs.r
	if r == nil {
		// Its runner left the configuration: report through its GitLab.
		c, err := m.newClient(gitlab.Config{URL: st.job.URL, Version: m.version, Logger: m.log})
		if err != nil {
			m.log.Error("resume job: no client for its GitLab", "job", st.job.JobID, "url", st.job.URL, "err", err)
			return
		}
		r = &runner{cfg: config.Runner{Name: st.job.Runner, URL: st.job.URL, OutputLimitKB: 4096}, client: c}
	}
	var job runnerapi.JobResponse
	perr := json.Unmarshal(st.job.Payload, &job)
	if perr != nil || job.ID != st.job.JobID {
		job = runnerapi.JobResponse{ID: st.job.JobID, Token: st.job.Token}
	}
	jr := &jobRun{m: m, r: r, job: &job, log: m.log.With("runner", r.cfg.Name, "job", job.ID, "resumed", true),
		phases: newPhaseLog(m.metrics, r.cfg.Name, m.now), received: st.job.At, st: st, lease: rs.lease}
	if st.job.Options != nil {
		jr.opts = *st.job.Options
		jr.opts.Cache = m.caches[st.job.Runner] // this process's signer
	}
	defer jr.phases.log(jr.log)
	m.metrics.jobs.WithLabelValues(r.cfg.Name).Inc()
	defer m.metrics.jobs.WithLabelValues(r.cfg.Name).Dec()
	if !m.track(jr) {
		return // handed over before it began: the journal stays
	}
	defer m.untrack(jr)
	var err error
	if jr.j, err = openJobJournal(rs.path, st, m.now); err != nil {
		jr.log.Error("resume job: the journal cannot be written; a later restart replays from the same point", "err", err)
	}
	saved := readTraceCopy(rs.path)
	if jr.j != nil {
		if jr.copy, err = openTraceCopy(traceCopyPath(rs.path), r.cfg.OutputLimitKB*1024); err != nil {
			jr.log.Error("resume job: its trace copy cannot be written", "err", err)
		}
		defer jr.copy.close()
	}
	sec := secrets(&job)
	p0, p0err := plan(&job, jr.opts, "")
	if p0err == nil {
		sec = append(sec, p0.Secrets...)
	}
	if err := jr.startTrace(context.Background(), sec); err != nil {
		jr.log.Error("resume job: start its trace", "err", err)
		return
	}
	jr.log.Info("resuming a job a previous manager started", "instance", instanceOf(st))
	// The trace is written again from the journal's lines and the stages'
	// output, which stays on the VM; a job that cannot get there ends with
	// its trace copy instead, so that the line saying why follows what
	// GitLab has. A result decided before the VM went is still the result.
	rebuild := func() {
		for _, t := range st.texts {
			jr.out.Write([]byte(t))
		}
	}
	fail := func(res jobResult) {
		if rr := st.result; rr != nil {
			res = jobResult{state: rr.State, failureReason: rr.FailureReason, exitCode: rr.ExitCode, message: rr.Message}
		}
		if len(saved) == 0 {
			rebuild()
		} else {
			jr.dst.Write(saved)
			jr.summaryDone = bytes.HasSuffix(saved, []byte(res.summaryLine()))
		}
		jr.finish(res)
	}

	switch {
	case rs.err != nil:
		fail(systemFailure("the runner manager restarted and its record of the job is damaged: %v", rs.err))
	case perr != nil || p0err != nil:
		fail(systemFailure("the runner manager restarted and cannot read the job again: %v", errors.Join(perr, p0err)))
	case rs.r == nil:
		fail(systemFailure("the runner manager restarted without runner %q in its configuration", st.job.Runner))
	case st.result != nil && len(st.attempts) == 0:
		// Its end was decided before any stage started (no VM, a VM that
		// could not be reached or prepared, a cancel): nothing runs now,
		// the result stands. Running its stages now would report a
		// result they did not decide.
		fail(jobResult{})
	case st.lease == nil:
		// It had no VM yet: nothing ran, so it runs now, as a user wants
		// (failing it would only make them retry it by hand); its timeout
		// counts from its first stage. A manager killed right after the
		// journal was written left no trace line: the header comes now.
		rebuild()
		if len(st.texts) == 0 {
			fmt.Fprint(jr, buildscript.Header("mayfly "+m.version, r.cfg.Name, gitlab.ShortToken(r.cfg.Token)))
		}
		fmt.Fprint(jr, buildscript.LogLine("The runner manager restarted before the job had a VM; this one takes a VM for it"))
		res, wait, err := m.reserveFor(jr)
		if err != nil {
			jr.finish(waitResult(err))
			return
		}
		lease, err := m.acquire(r, res, wait, jr.tr, jr)
		if err != nil {
			jr.finish(waitResult(err))
			return
		}
		jr.dir = jobDir(p0, job.ID)
		jr.phases.since(PhaseReattach, start)
		jr.runOn(lease)
	case rs.lease == nil:
		fail(systemFailure("the runner manager restarted and the job's VM %s cannot be had: %v", st.lease.Instance, rs.claim))
	default:
		jr.dir = st.lease.Dir
		ctx, cancel := context.WithTimeout(m.jobsCtx, reattachTimeout)
		exec, err := m.connectResumed(ctx, rs.lease)
		cancel()
		jr.phases.since(PhaseReattach, start)
		if err != nil {
			fail(systemFailure("the runner manager restarted and cannot reach the job's VM %s within %v: %v", st.lease.Instance, reattachTimeout, err))
			return
		}
		rebuild()
		jr.log.Info("job reattached", "instance", st.lease.Instance, "reattach_seconds", m.now().Sub(start).Seconds())
		jr.exec = exec
		defer exec.Close()
		jr.finish(jr.execute())
	}
}

// connectResumed connects to a resumed job's VM, retrying until ctx ends
// or the VM is lost.
func (m *Manager) connectResumed(ctx context.Context, lease Lease) (vmexec.Executor, error) {
	for attempt := 1; ; attempt++ {
		exec, err := lease.Connect(ctx)
		if err == nil {
			return exec, nil
		}
		select {
		case <-lease.Lost():
			return nil, fmt.Errorf("the VM is gone: %w", err)
		case <-ctx.Done():
			return nil, err
		case <-time.After(min(time.Duration(attempt)*time.Second, 10*time.Second)):
		}
	}
}

// reserveFor waits for a fleet's promise of an instance for a resumed job
// that had none yet, until instanceWaitTimeout, a cancel, or the manager's
// end.
func (m *Manager) reserveFor(jr *jobRun) (Reservation, time.Duration, error) {
	deadline := time.NewTimer(instanceWaitTimeout)
	defer deadline.Stop()
	for {
		if res, wait, ok := jr.r.fleet.Reserve(); ok {
			return res, wait, nil
		}
		select {
		case <-jr.tr.Canceled():
			return nil, 0, errCanceled
		case <-m.jobsCtx.Done():
			return nil, 0, context.Cause(m.jobsCtx)
		case <-deadline.C:
			return nil, 0, errNoInstance
		case <-time.After(time.Second):
		}
	}
}
