package coordinator

import (
	"cmp"
	"slices"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/manager/coordinator/gitlabci"
	"github.com/mayfly-ci/mayfly/manager/coordinator/gitrepo"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// Job statuses. The runner-visible ones are runnerapi's; created (waiting for
// an earlier stage) and skipped (an earlier stage failed) exist only here.
const (
	StatusCreated   = "created"
	StatusPending   = runnerapi.StatePending
	StatusRunning   = runnerapi.StateRunning
	StatusSuccess   = runnerapi.StateSuccess
	StatusFailed    = runnerapi.StateFailed
	StatusCanceling = runnerapi.StateCanceling
	StatusCanceled  = runnerapi.StateCanceled
	StatusSkipped   = "skipped"
	// StatusManual is a when: manual job: the coordinator never runs it.
	StatusManual = "manual"
)

// IsFinal reports whether a job status is final (success, failed, canceled,
// skipped, or manual, which the coordinator never runs).
func IsFinal(status string) bool {
	switch status {
	case StatusSuccess, StatusFailed, StatusCanceled, StatusSkipped, StatusManual:
		return true
	}
	return false
}

// RunnerType is a runner's scope, named as GitLab names it.
type RunnerType string

// Runner scopes.
const (
	InstanceRunner RunnerType = "instance_type" // shared: every project with shared runners on; fair-usage queue
	GroupRunner    RunnerType = "group_type"    // projects of a group and its subgroups; FIFO
	ProjectRunner  RunnerType = "project_type"  // projects it is enabled for; FIFO
)

// Runner access levels as sent in access_level.
const (
	AccessNotProtected = "not_protected"
	AccessRefProtected = "ref_protected"
)

type group struct {
	id       int64
	name     string
	path     string // full path, "acme/platform"
	parent   *group
	regToken string
}

// within reports whether g is anc or one of its descendants.
func (g *group) within(anc *group) bool {
	for ; g != nil; g = g.parent {
		if g == anc {
			return true
		}
	}
	return false
}

type project struct {
	id            int64
	name          string
	group         *group // nil: the user namespace "root"
	regToken      string
	sharedRunners bool
	pipelines     int           // pipelines created, for CI_PIPELINE_IID
	repo          *gitrepo.Repo // served repository (--project); nil otherwise

	pending       []*job                // status pending, sorted by id
	kinds         map[string]*kindCount // pending jobs by tags+protected, to skip projects fast
	runningShared int                   // jobs running or canceling on instance runners
}

// kindCount counts a project's pending jobs with the same runner requirements.
type kindCount struct {
	tags      []string
	protected bool
	n         int
}

// kindKey identifies what a job requires of a runner: its tags and whether its ref is protected.
func kindKey(tags []string, protected bool) string {
	k := strings.Join(tags, ",")
	if protected {
		k += "\x00protected"
	}
	return k
}

// runnable reports whether r can run any pending job of p.
func (p *project) runnable(r *runner) bool {
	for _, k := range p.kinds {
		if r.accepts(k.tags, k.protected) {
			return true
		}
	}
	return false
}

func (p *project) namespace() string {
	if p.group == nil {
		return "root"
	}
	return p.group.path
}

func (p *project) fullPath() string { return p.namespace() + "/" + p.name }

// defaultBranch is the project's default branch (its repository's, or main).
func (p *project) defaultBranch() string {
	if p.repo != nil {
		return p.repo.DefaultBranch
	}
	return "main"
}

func (p *project) addPending(j *job) {
	i, _ := slices.BinarySearchFunc(p.pending, j.id, cmpJobID)
	p.pending = slices.Insert(p.pending, i, j)
	if p.kinds == nil {
		p.kinds = map[string]*kindCount{}
	}
	k := p.kinds[j.kind]
	if k == nil {
		k = &kindCount{tags: j.tags, protected: j.pipeline.protected}
		p.kinds[j.kind] = k
	}
	k.n++
}

func (p *project) removePending(j *job) bool {
	i, ok := slices.BinarySearchFunc(p.pending, j.id, cmpJobID)
	if !ok {
		return false
	}
	p.pending = slices.Delete(p.pending, i, i+1)
	if k := p.kinds[j.kind]; k != nil {
		if k.n--; k.n <= 0 {
			delete(p.kinds, j.kind)
		}
	}
	return true
}

func cmpJobID(j *job, id int64) int { return cmp.Compare(j.id, id) }

type runner struct {
	id             int64
	token          string
	description    string
	typ            RunnerType
	group          *group     // group runners
	projects       []*project // project runners: the projects it is enabled for, owner first
	tags           []string   // sorted, unique
	runUntagged    bool
	locked         bool
	paused         bool
	accessLevel    string
	maximumTimeout int // seconds, 0 = none
	info           runnerapi.VersionInfo
	createdAt      time.Time
	contactedAt    time.Time
}

func (r *runner) hasTag(t string) bool {
	_, ok := slices.BinarySearch(r.tags, t)
	return ok
}

// canRun reports whether the runner may take the job.
func (r *runner) canRun(j *job) bool { return r.accepts(j.tags, j.pipeline.protected) }

// accepts reports whether the runner takes jobs with these tags on a
// (un)protected ref: every job tag must be a runner tag, untagged jobs need
// run_untagged, and ref_protected runners take only protected refs.
func (r *runner) accepts(tags []string, protected bool) bool {
	if len(tags) == 0 {
		if !r.runUntagged {
			return false
		}
	} else {
		for _, t := range tags {
			if !r.hasTag(t) {
				return false
			}
		}
	}
	if r.accessLevel == AccessRefProtected && !protected {
		return false
	}
	return true
}

type pipeline struct {
	id        int64
	iid       int
	project   *project
	ref       string
	refType   string
	sha       string
	beforeSha string
	protected bool
	source    string   // CI_PIPELINE_SOURCE
	name      string   // workflow:name
	stages    []string // stage names in order
	jobs      []*job   // in creation order; retries appended
	createdAt time.Time
	commit    commitInfo
	warnings  []string // from .gitlab-ci.yml: unsupported keywords
	// readable are the projects whose repositories this pipeline's job
	// tokens may clone: the project and the projects its submodules name.
	readable []string
}

// commitInfo describes the pipeline's commit for CI_COMMIT_* variables.
type commitInfo struct {
	title, message, description string
	authorName, authorEmail     string
	timestamp                   time.Time
}

// latest returns the newest (not retried) job of the pipeline called name.
func (pl *pipeline) latest(name string) *job {
	for i := len(pl.jobs) - 1; i >= 0; i-- {
		if j := pl.jobs[i]; j.name == name && !j.retried {
			return j
		}
	}
	return nil
}

type job struct {
	id           int64
	pipeline     *pipeline
	name         string
	stage        string
	tags         []string // sorted, unique
	kind         string   // kindKey(tags, protected)
	timeout      int      // seconds as configured
	allowFailure bool
	steps        []runnerapi.Step
	variables    []runnerapi.Variable // user variables, pipeline then job
	token        string

	stageIdx      int
	when          string           // on_success, on_failure, always, manual
	needs         *[]gitlabci.Need // nil: every job of the earlier stages
	deps          *[]string        // nil: see dependencyNames
	exitCodesOK   []int            // allow_failure: exit_codes
	retry         gitlabci.Retry
	attempt       int   // 0 for the first run, n for the n-th retry
	retryOf       int64 // the job this one retries
	retried       bool  // a newer job of this name replaced it
	image         *runnerapi.Image
	services      []runnerapi.Image
	artifacts     []runnerapi.Artifact
	caches        []runnerapi.Cache
	hooks         []runnerapi.Hook
	artifactsFile runnerapi.ArtifactsFile    // uploaded artifacts archive, if any
	stored        map[string]*storedArtifact // artifact files by artifact_type
	dotenv        []runnerapi.Variable       // from its dotenv report

	status        string
	runner        *runner
	onShared      bool // counted in project.runningShared
	runnerTimeout int  // runner_info.timeout sent
	payload       *runnerapi.JobResponse
	trace         []byte
	patches       []TracePatch
	updates       []JobUpdate
	failureReason string
	exitCode      int
	runnerState   string
	outChecksum   string
	outBytesize   int
	traceVerified *bool
	deferrals     int // final updates answered 202 because the trace was short
	droppedCalls  int // patches and updates beyond maxRecordedCalls

	createdAt, queuedAt, startedAt, finishedAt, lastSeenAt time.Time
	// touchedAt is GitLab's updated_at as the stuck-job clean-up reads it:
	// set when the job is taken, moved by runner calls (Server.touch).
	touchedAt time.Time
}

func (j *job) processing() bool {
	return j.status == StatusRunning || j.status == StatusCanceling
}

// failureAllowed reports whether a failure of j does not fail the pipeline:
// allow_failure, or allow_failure:exit_codes matching its exit code.
func (j *job) failureAllowed() bool {
	return j.allowFailure || (j.status == StatusFailed && j.exitCode != 0 && slices.Contains(j.exitCodesOK, j.exitCode))
}

// TracePatch records one PATCH /jobs/:id/trace the coordinator answered.
// Start and ClaimedEnd are -1 when Content-Range was missing or unreadable.
type TracePatch struct {
	Time       time.Time `json:"time"`
	Start      int64     `json:"start"`       // first byte offset from Content-Range
	ClaimedEnd int64     `json:"claimed_end"` // inclusive end as the runner sent it
	Bytes      int       `json:"bytes"`       // body length
	Status     int       `json:"status"`      // HTTP status answered
	Size       int       `json:"size"`        // stored trace size after the call
	// Refused is the reason a call was not applied (403, 400, 416); empty when it was.
	Refused string `json:"refused,omitempty"`
}

// JobUpdate records one PUT /jobs/:id the coordinator answered.
type JobUpdate struct {
	Time          time.Time `json:"time"`
	State         string    `json:"state"`
	FailureReason string    `json:"failure_reason,omitempty"`
	ExitCode      int       `json:"exit_code,omitempty"`
	Checksum      string    `json:"checksum,omitempty"`
	Bytesize      int       `json:"bytesize,omitempty"`
	Status        int       `json:"status"` // HTTP status answered
	// Refused is the reason a call was not applied (403, 400); empty when it was.
	Refused string `json:"refused,omitempty"`
}

// JobRecord is a snapshot of a job and everything the coordinator received for it.
type JobRecord struct {
	ID          int64    `json:"id"`
	PipelineID  int64    `json:"pipeline_id"`
	ProjectID   int64    `json:"project_id"`
	ProjectPath string   `json:"project_path"`
	Name        string   `json:"name"`
	Stage       string   `json:"stage"`
	Status      string   `json:"status"`
	Tags        []string `json:"tags"`
	// AllowFailure tells that a failure of this job does not fail the
	// pipeline (allow_failure, or allow_failure:exit_codes that matched).
	AllowFailure bool   `json:"allow_failure"`
	Timeout      int    `json:"timeout"` // seconds sent in runner_info.timeout (0 until assigned)
	When         string `json:"when"`
	// Retried tells that a newer job (a retry) replaced this one; RetryOf
	// names the job this one retries.
	Retried bool  `json:"retried,omitempty"`
	RetryOf int64 `json:"retry_of,omitempty"`

	RunnerID   int64      `json:"runner_id,omitempty"`
	RunnerType RunnerType `json:"runner_type,omitempty"`

	// Trace is every byte the runner uploaded, in order.
	Trace     []byte `json:"-"`
	TraceSize int    `json:"trace_size"`
	// Patches and Updates are every trace PATCH and job PUT the runner sent
	// for this job, refused ones included, up to 10000 each.
	Patches []TracePatch `json:"patches"`
	Updates []JobUpdate  `json:"updates"`
	// DroppedCalls counts patches and updates beyond that bound.
	DroppedCalls int `json:"dropped_calls,omitempty"`

	// RunnerState is the state of the runner's final update (success or failed).
	RunnerState    string `json:"runner_state,omitempty"`
	FailureReason  string `json:"failure_reason,omitempty"`
	ExitCode       int    `json:"exit_code,omitempty"`
	OutputChecksum string `json:"output_checksum,omitempty"`
	OutputBytesize int    `json:"output_bytesize,omitempty"`
	// TraceVerified tells whether the final update's output checksum and
	// bytesize matched the stored trace; nil when the runner sent neither.
	TraceVerified *bool `json:"trace_verified,omitempty"`

	CreatedAt  time.Time `json:"created_at"`
	QueuedAt   time.Time `json:"queued_at,omitzero"`
	StartedAt  time.Time `json:"started_at,omitzero"`
	FinishedAt time.Time `json:"finished_at,omitzero"`
	// UpdatedAt is the last trace patch or update from the runner.
	UpdatedAt time.Time `json:"updated_at,omitzero"`

	// Payload is the job JSON handed to the runner (nil until assigned).
	Payload *runnerapi.JobResponse `json:"-"`
	// Artifacts are the job's stored artifact files, by type; Dotenv the
	// variables its dotenv report gives later jobs.
	Artifacts []ArtifactRecord     `json:"artifacts"`
	Dotenv    []runnerapi.Variable `json:"dotenv,omitempty"`
}

func (j *job) record() JobRecord {
	rec := JobRecord{
		ID:             j.id,
		PipelineID:     j.pipeline.id,
		ProjectID:      j.pipeline.project.id,
		ProjectPath:    j.pipeline.project.fullPath(),
		Name:           j.name,
		Stage:          j.stage,
		Status:         j.status,
		Tags:           slices.Clone(j.tags),
		AllowFailure:   j.failureAllowed(),
		Timeout:        j.runnerTimeout,
		When:           j.when,
		Retried:        j.retried,
		RetryOf:        j.retryOf,
		Trace:          slices.Clone(j.trace),
		TraceSize:      len(j.trace),
		Patches:        slices.Clone(j.patches),
		Updates:        slices.Clone(j.updates),
		DroppedCalls:   j.droppedCalls,
		RunnerState:    j.runnerState,
		FailureReason:  j.failureReason,
		ExitCode:       j.exitCode,
		OutputChecksum: j.outChecksum,
		OutputBytesize: j.outBytesize,
		CreatedAt:      j.createdAt,
		QueuedAt:       j.queuedAt,
		StartedAt:      j.startedAt,
		FinishedAt:     j.finishedAt,
		UpdatedAt:      j.lastSeenAt,
		Payload:        j.payload,
		Artifacts:      j.artifactRecords(),
		Dotenv:         slices.Clone(j.dotenv),
	}
	if rec.Tags == nil {
		rec.Tags = []string{}
	}
	if j.traceVerified != nil {
		v := *j.traceVerified
		rec.TraceVerified = &v
	}
	if j.runner != nil {
		rec.RunnerID = j.runner.id
		rec.RunnerType = j.runner.typ
	}
	return rec
}

// RunnerRecord is a snapshot of a registered runner.
type RunnerRecord struct {
	ID             int64      `json:"id"`
	Token          string     `json:"-"`
	Description    string     `json:"description"`
	Type           RunnerType `json:"runner_type"`
	GroupID        int64      `json:"group_id,omitempty"`
	ProjectIDs     []int64    `json:"project_ids,omitempty"`
	Tags           []string   `json:"tag_list"`
	RunUntagged    bool       `json:"run_untagged"`
	Locked         bool       `json:"locked"`
	Paused         bool       `json:"paused"`
	AccessLevel    string     `json:"access_level"`
	MaximumTimeout int        `json:"maximum_timeout,omitempty"`
	Version        string     `json:"version,omitempty"`
	Executor       string     `json:"executor,omitempty"`
	CreatedAt      time.Time  `json:"created_at"`
	ContactedAt    time.Time  `json:"contacted_at,omitzero"`
}

func (r *runner) record() RunnerRecord {
	rec := RunnerRecord{
		ID:             r.id,
		Token:          r.token,
		Description:    r.description,
		Type:           r.typ,
		Tags:           slices.Clone(r.tags),
		RunUntagged:    r.runUntagged,
		Locked:         r.locked,
		Paused:         r.paused,
		AccessLevel:    r.accessLevel,
		MaximumTimeout: r.maximumTimeout,
		Version:        r.info.Version,
		Executor:       r.info.Executor,
		CreatedAt:      r.createdAt,
		ContactedAt:    r.contactedAt,
	}
	if rec.Tags == nil {
		rec.Tags = []string{}
	}
	if r.group != nil {
		rec.GroupID = r.group.id
	}
	for _, p := range r.projects {
		rec.ProjectIDs = append(rec.ProjectIDs, p.id)
	}
	return rec
}

// GroupRecord is a snapshot of a group.
type GroupRecord struct {
	ID                int64  `json:"id"`
	Name              string `json:"name"`
	Path              string `json:"full_path"`
	ParentID          int64  `json:"parent_id,omitempty"`
	RegistrationToken string `json:"registration_token"`
}

func (g *group) record() GroupRecord {
	rec := GroupRecord{ID: g.id, Name: g.name, Path: g.path, RegistrationToken: g.regToken}
	if g.parent != nil {
		rec.ParentID = g.parent.id
	}
	return rec
}

// ProjectRecord is a snapshot of a project.
type ProjectRecord struct {
	ID                int64  `json:"id"`
	Name              string `json:"name"`
	Path              string `json:"path_with_namespace"`
	GroupID           int64  `json:"group_id,omitempty"`
	SharedRunners     bool   `json:"shared_runners_enabled"`
	RegistrationToken string `json:"registration_token"`
	PendingJobs       int    `json:"pending_jobs"`
	RunningShared     int    `json:"jobs_running_on_instance_runners"`
}

func (p *project) record() ProjectRecord {
	rec := ProjectRecord{
		ID:                p.id,
		Name:              p.name,
		Path:              p.fullPath(),
		SharedRunners:     p.sharedRunners,
		RegistrationToken: p.regToken,
		PendingJobs:       len(p.pending),
		RunningShared:     p.runningShared,
	}
	if p.group != nil {
		rec.GroupID = p.group.id
	}
	return rec
}

// PipelineRecord names a created pipeline and its jobs.
type PipelineRecord struct {
	ID        int64   `json:"id"`
	IID       int     `json:"iid"`
	ProjectID int64   `json:"project_id"`
	Ref       string  `json:"ref"`
	Sha       string  `json:"sha"`
	Source    string  `json:"source"`
	Name      string  `json:"name,omitempty"`
	Status    string  `json:"status"` // created, pending, running, success or failed
	JobIDs    []int64 `json:"job_ids"`
	// Warnings are the .gitlab-ci.yml lines about keywords the coordinator
	// does not support, one each.
	Warnings []string `json:"warnings,omitempty"`
}

func (pl *pipeline) record() PipelineRecord {
	rec := PipelineRecord{ID: pl.id, IID: pl.iid, ProjectID: pl.project.id, Ref: pl.ref, Sha: pl.sha, Source: pl.source, Name: pl.name,
		Status: pipelineStatus(pl), JobIDs: []int64{}, Warnings: slices.Clone(pl.warnings)}
	for _, j := range pl.jobs {
		rec.JobIDs = append(rec.JobIDs, j.id)
	}
	return rec
}

// parseTags turns a comma-separated tag_list into a sorted, unique list.
func parseTags(list string) []string {
	var tags []string
	for _, t := range strings.Split(list, ",") {
		if t = strings.TrimSpace(t); t != "" {
			tags = append(tags, t)
		}
	}
	return normTags(tags)
}

func normTags(tags []string) []string {
	out := make([]string, 0, len(tags))
	for _, t := range tags {
		if t = strings.TrimSpace(t); t != "" {
			out = append(out, t)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}
