package coordinator

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mayfly-ci/mayfly/manager/coordinator/gitrepo"
	"github.com/mayfly-ci/mayfly/manager/coordinator/registry"
)

// Limits and defaults.
const (
	// MaxLongPoll bounds Config.LongPoll, well under the runner's 10-minute response-header timeout.
	MaxLongPoll = 5 * time.Minute
	// DefaultTraceUpdateInterval is sent in X-GitLab-Trace-Update-Interval
	// (GitLab uses 3 s while someone watches a log, 30 s otherwise).
	DefaultTraceUpdateInterval = 3 * time.Second
	// DefaultJobTimeout is a job's timeout when the pipeline gives none (GitLab's project default).
	DefaultJobTimeout = time.Hour
	// DefaultMaxTraceBytes is the largest trace a job may upload before it is dropped.
	DefaultMaxTraceBytes = 100 << 20
	// maxFinalDeferrals bounds how often a final update is answered 202
	// because the stored trace is shorter than the runner says.
	maxFinalDeferrals = 5
	shutdownTimeout   = 10 * time.Second
)

// Config configures a Server. The zero value works.
type Config struct {
	// RegistrationToken registers instance (shared) runners. Empty: a random token,
	// see Server.RegistrationToken.
	RegistrationToken string
	// ExternalURL is the base URL jobs see (CI_SERVER_URL, git_info.repo_url).
	// Empty: derived from each job request's Host header.
	ExternalURL string
	// LongPoll holds a job request whose last_update is current until the
	// queue changes or this much time passes. 0 (the default) disables it.
	// At most MaxLongPoll.
	LongPoll time.Duration
	// TraceUpdateInterval is sent in X-GitLab-Trace-Update-Interval (whole
	// seconds, at least 1). Default DefaultTraceUpdateInterval.
	TraceUpdateInterval time.Duration
	// DefaultJobTimeout applies to jobs without a timeout. Default DefaultJobTimeout.
	DefaultJobTimeout time.Duration
	// MaxTraceBytes drops a job whose trace grows beyond it. Default DefaultMaxTraceBytes.
	MaxTraceBytes int
	// AdminToken, when set, is required in the Private-Token header of the admin API.
	AdminToken string
	// PushToken is a personal access token of the administrator: it reads
	// every repository over git, pushes to and pulls from the registry
	// (any user name), and creates pipelines through the GitLab API
	// (PRIVATE-TOKEN). Empty: a random token, see Server.PushToken.
	PushToken string
	// StateDir holds what the coordinator keeps on disk: the served
	// repositories (StateDir/repositories) and the registry
	// (StateDir/registry). Needed by AddProjects and the registry.
	StateDir string
	// MaxArtifactBytes bounds one uploaded artifact file. Default
	// DefaultMaxArtifactBytes. Artifacts are kept in StateDir/artifacts;
	// without StateDir uploads answer 405, as GitLab with artifacts off.
	MaxArtifactBytes int64
	// ArtifactsExpireIn is how long artifacts are kept when the job gives
	// no expire_in. Default DefaultArtifactsExpireIn.
	ArtifactsExpireIn time.Duration
	// Registry, when set, serves a container registry as GitLab does
	// (/v2/ and its token realm /jwt/auth on the same listener), with
	// CI_REGISTRY, CI_REGISTRY_IMAGE, CI_REGISTRY_USER, CI_REGISTRY_PASSWORD
	// and registry credentials in every payload. Needs StateDir.
	Registry *RegistryConfig
	// StuckJobTimeout fails a running job no runner call touched for this
	// long with stuck_or_timeout_failure, as GitLab's stuck-job clean-up
	// does (see DropStuckJobs). Default DefaultStuckJobTimeout (GitLab's
	// 1 hour); negative turns the clean-up off.
	StuckJobTimeout time.Duration
	// StuckJobTouch is how old a job's updated_at must be before a runner
	// call moves it (GitLab's needs_touch?: 15 minutes). Default a quarter
	// of StuckJobTimeout; negative: every call moves it.
	StuckJobTouch time.Duration
	// Now is the clock (job timestamps, time_in_queue_seconds, the
	// stuck-job clean-up). Default time.Now.
	Now func() time.Time
	// Logger receives structured logs. Default slog.Default().
	Logger *slog.Logger
}

// Server is an in-memory GitLab stand-in speaking the runner API
// (/api/v4/...) and a small admin API (/-/mayfly/...). It is an http.Handler.
// All methods are safe for concurrent use.
type Server struct {
	cfg      Config
	interval string // X-GitLab-Trace-Update-Interval value
	log      *slog.Logger
	now      func() time.Time
	mux      *http.ServeMux
	held     atomic.Int64       // job requests held in a long poll right now
	registry *registry.Registry // the container registry under /v2/; nil when not served

	stuckTimeout time.Duration // 0: the stuck-job clean-up is off
	stuckTouch   time.Duration
	stuckSweep   time.Duration

	mu              sync.Mutex
	faults          []*fault // armed by InjectFault
	faultsServed    int
	nextID          map[string]int64
	groups          map[int64]*group
	groupsByPath    map[string]*group
	projects        map[int64]*project
	projectsByPath  map[string]*project
	runners         map[int64]*runner
	runnersByToken  map[string]*runner
	regTokens       map[string]any // *group or *project; the instance token is cfg.RegistrationToken
	pipelines       map[int64]*pipeline
	jobs            map[int64]*job
	jobsByToken     map[string]*job
	repos           *gitrepo.Store // nil until AddProjects
	gitHandler      http.Handler
	jobOrder        []*job
	pendingProjects map[int64]*project // projects with pending jobs
	version         uint64             // queue version, X-GitLab-Last-Update
	queueChanged    chan struct{}      // closed and replaced when version changes
	stateChanged    chan struct{}      // closed and replaced when a job status changes
}

// New returns a Server with an empty data model.
func New(cfg Config) (*Server, error) {
	if cfg.LongPoll < 0 || cfg.LongPoll > MaxLongPoll {
		return nil, &FieldError{Source: "config", Field: "LongPoll", Msg: fmt.Sprintf("must be between 0 and %s, got %s", MaxLongPoll, cfg.LongPoll)}
	}
	if cfg.TraceUpdateInterval < 0 || cfg.DefaultJobTimeout < 0 || cfg.MaxTraceBytes < 0 {
		return nil, &FieldError{Source: "config", Msg: "TraceUpdateInterval, DefaultJobTimeout and MaxTraceBytes must not be negative"}
	}
	if cfg.ExternalURL != "" {
		u, err := url.Parse(cfg.ExternalURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, &FieldError{Source: "config", Field: "ExternalURL", Msg: fmt.Sprintf("%q is not an http(s) URL", cfg.ExternalURL)}
		}
		cfg.ExternalURL = strings.TrimRight(cfg.ExternalURL, "/")
	}
	if cfg.StuckJobTimeout > 0 && cfg.StuckJobTouch >= cfg.StuckJobTimeout {
		return nil, &FieldError{Source: "config", Field: "StuckJobTouch", Msg: fmt.Sprintf("must be shorter than StuckJobTimeout (%s), got %s", cfg.StuckJobTimeout, cfg.StuckJobTouch)}
	}
	if cfg.TraceUpdateInterval == 0 {
		cfg.TraceUpdateInterval = DefaultTraceUpdateInterval
	}
	if cfg.DefaultJobTimeout == 0 {
		cfg.DefaultJobTimeout = DefaultJobTimeout
	}
	if cfg.MaxTraceBytes == 0 {
		cfg.MaxTraceBytes = DefaultMaxTraceBytes
	}
	if cfg.MaxArtifactBytes <= 0 {
		cfg.MaxArtifactBytes = DefaultMaxArtifactBytes
	}
	if cfg.ArtifactsExpireIn <= 0 {
		cfg.ArtifactsExpireIn = DefaultArtifactsExpireIn
	}
	if cfg.RegistrationToken == "" {
		cfg.RegistrationToken = newToken()
	}
	if cfg.PushToken == "" {
		cfg.PushToken = newToken()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	secs := int((cfg.TraceUpdateInterval + time.Second - 1) / time.Second)
	s := &Server{
		cfg:             cfg,
		interval:        strconv.Itoa(max(secs, 1)),
		log:             cfg.Logger.With("component", "coordinator"),
		now:             cfg.Now,
		nextID:          map[string]int64{},
		groups:          map[int64]*group{},
		groupsByPath:    map[string]*group{},
		projects:        map[int64]*project{},
		projectsByPath:  map[string]*project{},
		runners:         map[int64]*runner{},
		runnersByToken:  map[string]*runner{},
		regTokens:       map[string]any{},
		pipelines:       map[int64]*pipeline{},
		jobs:            map[int64]*job{},
		jobsByToken:     map[string]*job{},
		pendingProjects: map[int64]*project{},
		version:         1,
		queueChanged:    make(chan struct{}),
		stateChanged:    make(chan struct{}),
	}
	s.stuckTimeout, s.stuckTouch, s.stuckSweep = stuckSettings(cfg)
	if cfg.Registry != nil {
		if err := s.openRegistry(); err != nil {
			return nil, err
		}
	}
	s.routes()
	return s, nil
}

// Close releases what the server holds open (the registry's journal).
func (s *Server) Close() error {
	if s.registry != nil {
		return s.registry.Close()
	}
	return nil
}

// RegistrationToken returns the instance-wide registration token (instance runners).
func (s *Server) RegistrationToken() string { return s.cfg.RegistrationToken }

// PushToken returns the administrator's access token (see Config.PushToken).
func (s *Server) PushToken() string { return s.cfg.PushToken }

// ExternalURL returns the URL jobs see, or "" when it follows each request's Host.
func (s *Server) ExternalURL() string { return s.cfg.ExternalURL }

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

// Serve serves HTTP on ln until ctx ends, then shuts down gracefully: held
// long polls are answered, in-flight requests get up to 10 s to finish.
// It returns nil after a clean shutdown.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	base, cancelBase := context.WithCancel(context.Background())
	defer cancelBase()
	hs := &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		BaseContext:       func(net.Listener) context.Context { return base },
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	sweepCtx, stopSweep := context.WithCancel(ctx)
	sweepDone := make(chan struct{})
	go func() { defer close(sweepDone); s.RunStuckJobSweep(sweepCtx) }()
	defer func() { stopSweep(); <-sweepDone }()
	s.log.Info("coordinator listening", "addr", ln.Addr().String())
	select {
	case err := <-errc:
		return fmt.Errorf("serve %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	cancelBase() // ends long polls
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	err := hs.Shutdown(sctx)
	if serr := <-errc; serr != nil && !errors.Is(serr, http.ErrServerClosed) && err == nil {
		err = serr
	}
	if err != nil {
		return fmt.Errorf("shutdown %s: %w", ln.Addr(), err)
	}
	s.log.Info("coordinator stopped", "addr", ln.Addr().String())
	return nil
}

// ListenAndServe listens on the TCP address addr and calls Serve.
func (s *Server) ListenAndServe(ctx context.Context, addr string) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", addr, err)
	}
	return s.Serve(ctx, ln)
}

func newToken() string { return rand.Text() }

// id returns the next id of a kind; ids start at 1 per kind, as in GitLab.
func (s *Server) id(kind string) int64 {
	s.nextID[kind]++
	return s.nextID[kind]
}

// bumpQueue changes the queue version so runners holding the old value look again.
func (s *Server) bumpQueue() {
	s.version++
	close(s.queueChanged)
	s.queueChanged = make(chan struct{})
}

func (s *Server) versionString() string { return strconv.FormatUint(s.version, 10) }

func (s *Server) notifyState() {
	close(s.stateChanged)
	s.stateChanged = make(chan struct{})
}

// Job returns a snapshot of job id.
func (s *Server) Job(id int64) (JobRecord, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	j := s.jobs[id]
	if j == nil {
		return JobRecord{}, notFound("job", id)
	}
	return j.record(), nil
}

// Jobs returns snapshots of every job, in id order.
func (s *Server) Jobs() []JobRecord {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]JobRecord, 0, len(s.jobOrder))
	for _, j := range s.jobOrder {
		out = append(out, j.record())
	}
	return out
}

// Runners returns snapshots of every registered runner, in id order.
func (s *Server) Runners() []RunnerRecord {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]RunnerRecord, 0, len(s.runners))
	for id := int64(1); id <= s.nextID["runner"]; id++ {
		if r := s.runners[id]; r != nil {
			out = append(out, r.record())
		}
	}
	return out
}

// Projects returns snapshots of every project, in id order.
func (s *Server) Projects() []ProjectRecord {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]ProjectRecord, 0, len(s.projects))
	for id := int64(1); id <= s.nextID["project"]; id++ {
		if p := s.projects[id]; p != nil {
			out = append(out, p.record())
		}
	}
	return out
}

// WaitAllFinished blocks until every job is in a final state (success,
// failed, canceled, skipped) or ctx ends. With no jobs it returns at once.
func (s *Server) WaitAllFinished(ctx context.Context) error {
	for {
		s.mu.Lock()
		var open []int64
		for _, j := range s.jobOrder {
			if !IsFinal(j.status) {
				open = append(open, j.id)
				if len(open) == 10 {
					break
				}
			}
		}
		ch := s.stateChanged
		s.mu.Unlock()
		if len(open) == 0 {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("wait for jobs %v to finish: %w", open, ctx.Err())
		}
	}
}

// WaitJob blocks until job id is in a final state or ctx ends, and returns its snapshot.
func (s *Server) WaitJob(ctx context.Context, id int64) (JobRecord, error) {
	for {
		s.mu.Lock()
		j := s.jobs[id]
		if j == nil {
			s.mu.Unlock()
			return JobRecord{}, notFound("job", id)
		}
		if IsFinal(j.status) {
			rec := j.record()
			s.mu.Unlock()
			return rec, nil
		}
		status, ch := j.status, s.stateChanged
		s.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return JobRecord{}, fmt.Errorf("wait for job %d (%s): %w", id, status, ctx.Err())
		}
	}
}

// Cancel cancels job id as GitLab does: a created or pending job becomes
// canceled at once and is never handed out; a running job becomes canceling
// (the runner learns it from its next trace or update reply and finishes it
// as canceled); canceling a canceling job forces it to canceled, after which
// the runner gets 403 with Job-Status: canceled.
func (s *Server) Cancel(id int64) (JobRecord, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	j := s.jobs[id]
	if j == nil {
		return JobRecord{}, notFound("job", id)
	}
	switch j.status {
	case StatusCreated, StatusPending:
		s.finish(j, StatusCanceled)
	case StatusRunning:
		j.status = StatusCanceling
		s.notifyState()
	case StatusCanceling:
		s.finish(j, StatusCanceled)
	default:
		return j.record(), &JobStateError{JobID: id, Status: j.status, Op: "cancel"}
	}
	s.log.Info("job cancel", "job_id", id, "status", j.status)
	return j.record(), nil
}

// CancelPipeline cancels every unfinished job of pipeline id.
func (s *Server) CancelPipeline(id int64) error {
	s.mu.Lock()
	pl := s.pipelines[id]
	var ids []int64
	if pl != nil {
		for _, j := range pl.jobs {
			if !IsFinal(j.status) {
				ids = append(ids, j.id)
			}
		}
	}
	s.mu.Unlock()
	if pl == nil {
		return notFound("pipeline", id)
	}
	for _, jid := range ids {
		if _, err := s.Cancel(jid); err != nil && !errors.Is(err, ErrJobState) {
			return fmt.Errorf("cancel pipeline %d: %w", id, err)
		}
	}
	return nil
}

// RunnerOptions are the settings of a runner registration.
type RunnerOptions struct {
	// RegistrationToken decides the scope: the instance token, a group's or a project's.
	RegistrationToken string
	Description       string
	Tags              []string
	RunUntagged       bool
	Locked            bool
	Paused            bool
	AccessLevel       string // "", not_protected or ref_protected
	MaximumTimeout    int    // seconds; 0 or at least 600
	// Token, when set, is the runner's authentication token instead of a
	// random one, so a config file can name a runner before it exists.
	Token string
}

// RegisterRunner registers a runner as POST /api/v4/runners does and returns
// it with its new authentication token.
func (s *Server) RegisterRunner(opts RunnerOptions) (RunnerRecord, error) {
	tags := normTags(opts.Tags)
	switch {
	case opts.RegistrationToken == "":
		return RunnerRecord{}, &FieldError{Field: "token", Msg: "is missing"}
	case len(tags) == 0 && !opts.RunUntagged:
		return RunnerRecord{}, &FieldError{Field: "tags_list", Msg: "can not be empty when runner is not allowed to pick untagged jobs"}
	case opts.MaximumTimeout < 0 || (opts.MaximumTimeout > 0 && opts.MaximumTimeout < 600):
		return RunnerRecord{}, &FieldError{Field: "maximum_timeout", Msg: "needs to be at least 10 minutes"}
	}
	access := opts.AccessLevel
	switch access {
	case "":
		access = AccessNotProtected
	case AccessNotProtected, AccessRefProtected:
	default:
		return RunnerRecord{}, &FieldError{Field: "access_level", Msg: fmt.Sprintf("%q is not one of not_protected, ref_protected", access)}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	token := opts.Token
	if token == "" {
		token = newToken()
	} else if _, taken := s.runnersByToken[token]; taken {
		return RunnerRecord{}, &FieldError{Field: "token", Msg: "is already used by another runner"}
	}
	r := &runner{
		token:          token,
		description:    opts.Description,
		tags:           tags,
		runUntagged:    opts.RunUntagged,
		locked:         opts.Locked,
		paused:         opts.Paused,
		accessLevel:    access,
		maximumTimeout: opts.MaximumTimeout,
		createdAt:      s.now(),
	}
	if opts.RegistrationToken == s.cfg.RegistrationToken {
		r.typ = InstanceRunner
		r.locked = false // only project runners can be locked
	} else {
		switch owner := s.regTokens[opts.RegistrationToken].(type) {
		case *group:
			r.typ, r.group, r.locked = GroupRunner, owner, false
		case *project:
			r.typ, r.projects = ProjectRunner, []*project{owner}
		default:
			return RunnerRecord{}, fmt.Errorf("register runner: registration token: %w", ErrForbidden)
		}
	}
	r.id = s.id("runner")
	s.runners[r.id] = r
	s.runnersByToken[r.token] = r
	s.log.Info("runner registered", "runner_id", r.id, "runner_type", r.typ, "tags", strings.Join(r.tags, ","), "run_untagged", r.runUntagged, "paused", r.paused)
	return r.record(), nil
}

// SetRunnerPaused pauses or resumes runner id; a paused runner gets no jobs.
func (s *Server) SetRunnerPaused(id int64, paused bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.runners[id]
	if r == nil {
		return notFound("runner", id)
	}
	if r.paused != paused {
		r.paused = paused
		s.bumpQueue()
	}
	return nil
}

// EnableRunnerForProject lets project runner runnerID take jobs of projectID too.
// A locked runner cannot be enabled for other projects (ErrLocked).
func (s *Server) EnableRunnerForProject(runnerID, projectID int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, p := s.runners[runnerID], s.projects[projectID]
	switch {
	case r == nil:
		return notFound("runner", runnerID)
	case p == nil:
		return notFound("project", projectID)
	case r.typ != ProjectRunner:
		return &FieldError{Field: "runner", Msg: fmt.Sprintf("runner %d is a %s runner, not a project runner", r.id, r.typ)}
	case r.locked:
		return fmt.Errorf("enable runner %d for project %d: %w", runnerID, projectID, ErrLocked)
	}
	for _, q := range r.projects {
		if q == p {
			return nil
		}
	}
	r.projects = append(r.projects, p)
	s.bumpQueue()
	return nil
}

// UnregisterRunner deletes the runner with the given authentication token.
func (s *Server) UnregisterRunner(token string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.runnersByToken[token]
	if r == nil {
		return fmt.Errorf("unregister runner: %w", ErrForbidden)
	}
	delete(s.runnersByToken, token)
	delete(s.runners, r.id)
	s.log.Info("runner unregistered", "runner_id", r.id)
	return nil
}

// registryHost is CI_REGISTRY (host:port of the external URL) when the
// coordinator serves a registry, else "".
func (s *Server) registryHost(ep endpoint) string {
	if s.registry == nil {
		return ""
	}
	return ep.host
}
