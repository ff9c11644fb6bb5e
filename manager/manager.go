// Package manager is the runner manager: it asks GitLab for jobs for each
// [[runners]] entry, runs each job on an instance of that runner's fleet,
// streams its trace back and reports its result.
//
// A job is only requested when the fleet can promise it an instance: a ready
// one, or one expected within the fleet's on-demand window, so a job is never
// accepted that then waits minutes for a VM.
package manager

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/config"
	"github.com/mayfly-ci/mayfly/manager/gitlab"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// ErrAborted is the cause of a job context ended by Abort.
var ErrAborted = errors.New("runner manager aborted: shutting down")

// Options configure a Manager.
type Options struct {
	Config *config.Config
	// Fleets holds the fleet of each runner, by runner name.
	Fleets map[string]Fleet
	// Version is mayfly's version ("1.2.0"), sent to GitLab as
	// info.version and shown in the User-Agent and in traces.
	Version string
	// Revision is the commit mayfly was built from, sent as info.revision.
	Revision string
	// Branch is the branch it was built from, shown in the User-Agent.
	Branch     string
	Registerer prometheus.Registerer
	Logger     *slog.Logger
	// NewClient makes the GitLab client of a runner; nil means gitlab.New.
	NewClient func(gitlab.Config) (*gitlab.Client, error)
	// Now is the clock for job timings; nil means time.Now.
	Now func() time.Time
	// TraceInterval is how often a job's trace is sent until GitLab says
	// otherwise; 0 means the client's default (3 s).
	TraceInterval time.Duration
	// Helpers has the mayfly-helper binaries the cache and artifact stages
	// run in the VMs; without one for a runner's OS/arch, its jobs say
	// that cache and artifacts are not supported, and GitLab is told so.
	Helpers *Helpers
	// Caches sign the distributed cache's URLs, by runner name.
	Caches map[string]buildscript.CacheSigner
	// StateDir holds the journals of running jobs (in StateDir/jobs), so
	// that a manager started after this one dies or hands over resumes
	// them; "" keeps no journal: jobs die with the manager.
	StateDir string
}

// Manager runs jobs for every configured runner.
type Manager struct {
	cfg           *config.Config
	version       string
	revision      string
	branch        string
	log           *slog.Logger
	metrics       *metrics
	now           func() time.Time
	runners       []*runner
	slots         chan struct{} // one per job allowed by concurrent
	traceInterval time.Duration

	drainOnce sync.Once
	drain     chan struct{} // closed by Drain
	abortOnce sync.Once
	abortJobs context.CancelCauseFunc
	jobsCtx   context.Context
	jobs      sync.WaitGroup

	helpers *Helpers
	caches  map[string]buildscript.CacheSigner

	jobEndMu sync.Mutex
	jobEnd   chan struct{} // closed (and replaced) when a job ends

	stateDir     string
	newClient    func(gitlab.Config) (*gitlab.Client, error)
	handover     atomic.Bool
	handoverOnce sync.Once
	trackMu      sync.Mutex
	running      map[*jobRun]struct{}
	loadOnce     sync.Once
	loadErr      error
	resumables   []*resumable
}

// runner is one [[runners]] entry at run time.
type runner struct {
	cfg    config.Runner
	client *gitlab.Client
	fleet  Fleet
	slots  chan struct{} // one per job allowed by limit; nil = no limit
}

// New checks opts and builds a Manager.
func New(opts Options) (*Manager, error) {
	if opts.Config == nil {
		return nil, errors.New("manager: no config")
	}
	m := &Manager{
		cfg:           opts.Config,
		version:       opts.Version,
		revision:      opts.Revision,
		branch:        opts.Branch,
		log:           opts.Logger,
		now:           opts.Now,
		slots:         make(chan struct{}, opts.Config.Concurrent),
		traceInterval: opts.TraceInterval,
		helpers:       opts.Helpers,
		caches:        opts.Caches,
		drain:         make(chan struct{}),
		jobEnd:        make(chan struct{}),
		stateDir:      opts.StateDir,
		running:       map[*jobRun]struct{}{},
	}
	if m.log == nil {
		m.log = slog.Default()
	}
	if m.now == nil {
		m.now = time.Now
	}
	if m.version == "" {
		m.version = "dev"
	}
	var err error
	if m.metrics, err = newMetrics(opts.Registerer); err != nil {
		return nil, fmt.Errorf("manager metrics: %w", err)
	}
	m.metrics.concurrent.Set(float64(opts.Config.Concurrent))
	newClient := opts.NewClient
	if newClient == nil {
		newClient = gitlab.New
	}
	m.newClient = newClient
	for _, rc := range opts.Config.Runners {
		f := opts.Fleets[rc.Name]
		if f == nil {
			return nil, fmt.Errorf("manager: runner %q has no fleet", rc.Name)
		}
		c, err := newClient(gitlab.Config{
			URL:        rc.URL,
			Version:    m.version,
			Branch:     m.branch,
			Info:       m.versionInfo(rc),
			Registerer: opts.Registerer,
			Logger:     m.log.With("runner", rc.Name),
		})
		if err != nil {
			return nil, fmt.Errorf("manager: runner %q: %w", rc.Name, err)
		}
		r := &runner{cfg: rc, client: c, fleet: f}
		if rc.Limit > 0 {
			r.slots = make(chan struct{}, rc.Limit)
		}
		m.metrics.limit.WithLabelValues(rc.Name).Set(float64(rc.Limit))
		m.runners = append(m.runners, r)
	}
	m.jobsCtx, m.abortJobs = context.WithCancelCause(context.Background())
	return m, nil
}

// versionInfo is the "info" mayfly sends to GitLab: the features it supports.
func (m *Manager) versionInfo(rc config.Runner) runnerapi.VersionInfo {
	// Artifacts and cache work where the VMs get a helper (mayfly-helper).
	helper := m.helpers.available(rc.Fleet.Connector.OS, rc.Fleet.Connector.Arch)
	return runnerapi.VersionInfo{
		Name:         "mayfly",
		Version:      m.version,
		Revision:     m.revision,
		Platform:     rc.Fleet.Connector.OS,
		Architecture: rc.Fleet.Connector.Arch,
		Executor:     rc.Executor,
		Shell:        rc.Shell,
		Features: runnerapi.FeaturesInfo{
			Variables:       true,
			Shared:          true,
			Refspecs:        true,
			Masking:         true,
			RawVariables:    true,
			MultiBuildSteps: true,
			TraceReset:      true,
			TraceChecksum:   true,
			TraceSize:       true,
			Cancelable:      true,
			ReturnExitCode:  true,
			// Jobs with an image run in containers where the VMs run Docker.
			Image:    rc.Docker != nil,
			Services: rc.Docker != nil,

			Artifacts:               helper,
			UploadMultipleArtifacts: helper,
			UploadRawArtifacts:      helper,
			ArtifactsExclude:        helper,
			Cache:                   helper,
		},
	}
}

// Run resumes the jobs a previous manager left (see LoadJournals), then
// asks for and runs jobs until ctx ends or Drain, Abort or HandOver is
// called, then waits for the jobs still running. When ctx ends, also while
// draining, running jobs are aborted (and reported) before Run returns;
// after HandOver they are left running for the next manager.
func (m *Manager) Run(ctx context.Context) error {
	if err := m.LoadJournals(); err != nil {
		return err
	}
	m.resumeJobs()
	pollCtx, stopPolling := context.WithCancel(ctx)
	defer stopPolling()
	go func() {
		select {
		case <-m.drain:
			stopPolling()
		case <-pollCtx.Done():
		}
	}()
	var pollers sync.WaitGroup
	for _, r := range m.runners {
		m.log.Info("runner started", "runner", r.cfg.Name, "url", r.cfg.URL, "request_concurrency", r.cfg.RequestConcurrency, "limit", r.cfg.Limit)
		for i := 0; i < r.cfg.RequestConcurrency; i++ {
			pollers.Add(1)
			go func() {
				defer pollers.Done()
				m.poll(pollCtx, ctx, r)
			}()
		}
	}
	pollers.Wait()
	// Running jobs finish, unless ctx ends first: also during a drain, a
	// forceful stop aborts them (SIGTERM after SIGQUIT, as in gitlab-runner).
	jobsDone := make(chan struct{})
	go func() { m.jobs.Wait(); close(jobsDone) }()
	select {
	case <-jobsDone:
	case <-ctx.Done():
		m.Abort()
		<-jobsDone
	}
	m.log.Info("runner manager stopped")
	return nil
}

// Drain stops asking for jobs; Run returns once the running jobs finish.
func (m *Manager) Drain() {
	m.drainOnce.Do(func() {
		m.log.Info("draining: no new jobs; running jobs finish")
		close(m.drain)
	})
}

// Abort stops asking for jobs and stops the running ones, which are reported
// to GitLab as failed with runner_system_failure.
func (m *Manager) Abort() {
	m.Drain()
	m.abortOnce.Do(func() {
		m.log.Warn("aborting running jobs")
		m.abortJobs(ErrAborted)
	})
}

// poll is one job-request loop of runner r. It stops when ctx ends (a
// drain); a job request in flight then still completes unless reqCtx ends
// too (an abort): GitLab may have handed the job out already, and a job
// whose answer is dropped stays running in GitLab until its timeout.
//
// A poll that found no free slot (concurrent, limit) waits for the next
// tick or for a job to end, whichever comes first: as gitlab-runner does,
// the next job is asked for as soon as one ends. After a request GitLab
// answered without a job, or that failed, it waits for the tick.
func (m *Manager) poll(ctx, reqCtx context.Context, r *runner) {
	wait := func(freed <-chan struct{}) bool {
		t := time.NewTimer(m.cfg.CheckInterval)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
			return true
		case <-freed:
			return true
		}
	}
	for ctx.Err() == nil {
		freed := m.jobEndSignal() // before trying, so that no end is missed
		started, reason := m.tryRequest(reqCtx, r)
		if started {
			continue // as gitlab-runner: ask again at once after a job arrives
		}
		if reason != "" {
			m.metrics.requestsSkipped.WithLabelValues(r.cfg.Name, reason).Inc()
		}
		if reason != "concurrent" && reason != "limit" {
			freed = nil
		}
		if !wait(freed) {
			return
		}
	}
}

// jobEndSignal returns a channel closed when the next job ends.
func (m *Manager) jobEndSignal() <-chan struct{} {
	m.jobEndMu.Lock()
	defer m.jobEndMu.Unlock()
	return m.jobEnd
}

// signalJobEnd wakes the polls waiting for a free slot.
func (m *Manager) signalJobEnd() {
	m.jobEndMu.Lock()
	defer m.jobEndMu.Unlock()
	close(m.jobEnd)
	m.jobEnd = make(chan struct{})
}

// tryRequest asks GitLab for one job if a slot is free and the fleet
// promises an instance, and starts the job. It returns whether a job started, or why no request
// was made.
func (m *Manager) tryRequest(ctx context.Context, r *runner) (started bool, skipped string) {
	if !takeSlot(m.slots) {
		return false, "concurrent"
	}
	if r.slots != nil && !takeSlot(r.slots) {
		<-m.slots
		return false, "limit"
	}
	release := func() {
		if r.slots != nil {
			<-r.slots
		}
		<-m.slots
	}
	reserveStart := m.now()
	res, wait, ok := r.fleet.Reserve()
	reserved := m.now().Sub(reserveStart)
	if !ok {
		release()
		return false, "no_instance"
	}
	requestStart := m.now()
	resp, err := r.client.RequestJob(ctx, r.cfg.Token, gitlab.RequestOptions{})
	requested := m.now().Sub(requestStart)
	m.metrics.requests.WithLabelValues(r.cfg.Name, resp.Outcome.String()).Inc()
	if resp.Outcome != gitlab.JobReceived {
		res.Cancel()
		release()
		var payloadErr *gitlab.JobPayloadError
		switch {
		case errors.As(err, &payloadErr):
			// GitLab handed out a job we cannot read: fail it, never the manager.
			m.failUnreadableJob(r, payloadErr)
		case err != nil && ctx.Err() == nil:
			m.log.Warn("job request failed", "runner", r.cfg.Name, "outcome", resp.Outcome, "err", err)
		case resp.Outcome == gitlab.RunnerForbidden:
			m.log.Error("GitLab rejects the runner token", "runner", r.cfg.Name)
		}
		return false, ""
	}
	// The journal first, synchronously: from here on a kill of the
	// manager leaves the next one what it needs to finish the job.
	received := m.now()
	opts := m.scriptOptions(r)
	j := m.journalJob(r, resp.Job, opts, received)
	phases := newPhaseLog(m.metrics, r.cfg.Name, m.now)
	phases.add(PhaseReserve, reserved)
	phases.add(PhaseRequest, requested)
	m.jobs.Add(1)
	go func() {
		defer m.jobs.Done()
		defer m.signalJobEnd() // after the slots are free
		defer release()
		m.runJob(r, resp.Job, opts, j, res, wait, received, phases)
	}()
	return true, ""
}

func takeSlot(slots chan struct{}) bool {
	select {
	case slots <- struct{}{}:
		return true
	default:
		return false
	}
}

// failUnreadableJob reports a job whose payload could not be used as failed
// with runner_system_failure, when its id and token could be read.
func (m *Manager) failUnreadableJob(r *runner, e *gitlab.JobPayloadError) {
	m.log.Error("job payload refused before anything ran", "runner", r.cfg.Name, "job", e.JobID, "err", e.Err)
	m.metrics.systemFailures.WithLabelValues(r.cfg.Name).Inc()
	if e.JobID <= 0 || e.Token == "" {
		return
	}
	ctx, cancel := context.WithTimeout(m.jobsCtx, time.Minute)
	defer cancel()
	if !runnerapi.HeaderSafe(e.Token) {
		// The trace travels with the token in a header, which this token
		// cannot be; the final update carries it in its JSON body.
		for attempt := 1; attempt <= 3; attempt++ {
			res, err := r.client.UpdateJob(ctx, e.JobID, runnerapi.UpdateJobRequest{
				Token: e.Token, State: runnerapi.StateFailed, FailureReason: runnerapi.FailureRunnerSystemFailure,
			})
			if err == nil && (res.State == gitlab.UpdateSucceeded || res.State == gitlab.UpdateAborted) {
				return
			}
			if attempt == 3 || ctx.Err() != nil {
				m.log.Warn("report refused job", "job", e.JobID, "err", err, "state", res.State)
				return
			}
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
		return
	}
	tr, err := r.client.StartJobTrace(ctx, e.JobID, e.Token, gitlab.TraceOptions{Interval: m.traceInterval})
	if err != nil {
		return
	}
	fmt.Fprintf(tr, "ERROR: Job failed (system failure): the job payload was refused: %v\n", e.Err)
	if err := tr.Finish(ctx, runnerapi.StateFailed, runnerapi.FailureRunnerSystemFailure, 0); err != nil {
		m.log.Warn("report refused job", "job", e.JobID, "err", err)
	}
}
