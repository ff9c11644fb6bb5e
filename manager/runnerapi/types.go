// Package runnerapi holds the JSON wire types of the GitLab runner API
// (/api/v4/runners, /api/v4/jobs/request, /api/v4/jobs/:id, /api/v4/jobs/:id/trace)
// as gitlab-runner v14.10 sends and reads them. Both the API client and the
// built-in coordinator use these types, so they cannot drift apart.
//
// Field names and JSON types follow the runner exactly: a type mismatch (an
// object sent as a string, an id sent as a string) fails decoding of the whole
// response in the official runner, so it must fail here too.
package runnerapi

import (
	"fmt"
	"hash/crc32"
)

// TraceChecksum returns the checksum a runner sends in output.checksum for a
// whole trace: "crc32:" and the lowercase 8-hex-digit IEEE CRC-32.
func TraceChecksum(trace []byte) string {
	return fmt.Sprintf("crc32:%08x", crc32.ChecksumIEEE(trace))
}

// Header names used by the protocol.
const (
	// HeaderLastUpdate carries the opaque queue position for long polling.
	HeaderLastUpdate = "X-GitLab-Last-Update"
	// HeaderTraceUpdateInterval tells the runner how often to send the trace, in seconds.
	HeaderTraceUpdateInterval = "X-GitLab-Trace-Update-Interval"
	// HeaderJobStatus carries the job's status on trace and update replies (cancellation).
	HeaderJobStatus = "Job-Status"
	// HeaderJobToken authenticates trace and artifact calls with the job token.
	HeaderJobToken = "Job-Token"
	// HeaderContentRange is "start-end" with an inclusive end, no unit and no total.
	HeaderContentRange = "Content-Range"
	// HeaderRange is the server's "0-size" answer to a trace PATCH.
	HeaderRange = "Range"
	// HeaderRateLimitResetTime is an RFC 1123 date sent with 429.
	HeaderRateLimitResetTime = "RateLimit-ResetTime"
)

// Job states as the runner reports them in UpdateJobRequest.State and as the
// coordinator reports them in the Job-Status header.
const (
	StatePending   = "pending"
	StateRunning   = "running"
	StateSuccess   = "success"
	StateFailed    = "failed"
	StateCanceling = "canceling"
	StateCanceled  = "canceled"
)

// Failure reasons a runner may send in UpdateJobRequest.FailureReason.
const (
	FailureScriptFailure        = "script_failure"
	FailureRunnerSystemFailure  = "runner_system_failure"
	FailureJobExecutionTimeout  = "job_execution_timeout"
	FailureUnknownFailure       = "unknown_failure"
	FailureRunnerUnsupported    = "runner_unsupported"
	FailureStuckOrTimeout       = "stuck_or_timeout_failure"
	FailureJobCanceled          = "job_canceled"
	FailureArchivedFailure      = "archived_failure"
	FailureUnmetPrerequisites   = "unmet_prerequisites"
	FailureSchedulerFailure     = "scheduler_failure"
	FailureDataIntegrityFailure = "data_integrity_failure"
	// FailureImagePullFailure: the job's image or a service's could not be
	// pulled (GitLab ≥ 16.x; older ones get runner_system_failure).
	FailureImagePullFailure = "image_pull_failure"
	// FailureRunnerConfigurationError is gitlab-runner's reason for a job
	// the runner's settings refuse (an image not in allowed_images, too
	// many services); GitLab does not know it, so it is sent as
	// script_failure.
	FailureRunnerConfigurationError = "runner_configuration_error"
)

// Step names in JobResponse.Steps.
const (
	StepScript      = "script"
	StepAfterScript = "after_script"
)

// Step "when" values.
const (
	WhenOnSuccess = "on_success"
	WhenOnFailure = "on_failure"
	WhenAlways    = "always"
)

// FeaturesInfo is the flat object of booleans a runner advertises in info.features.
type FeaturesInfo struct {
	Variables               bool `json:"variables"`
	Image                   bool `json:"image"`
	Services                bool `json:"services"`
	Artifacts               bool `json:"artifacts"`
	Cache                   bool `json:"cache"`
	Shared                  bool `json:"shared"`
	UploadMultipleArtifacts bool `json:"upload_multiple_artifacts"`
	UploadRawArtifacts      bool `json:"upload_raw_artifacts"`
	Session                 bool `json:"session"`
	Terminal                bool `json:"terminal"`
	Refspecs                bool `json:"refspecs"`
	Masking                 bool `json:"masking"`
	Proxy                   bool `json:"proxy"`
	RawVariables            bool `json:"raw_variables"`
	ArtifactsExclude        bool `json:"artifacts_exclude"`
	MultiBuildSteps         bool `json:"multi_build_steps"`
	TraceReset              bool `json:"trace_reset"`
	TraceChecksum           bool `json:"trace_checksum"`
	TraceSize               bool `json:"trace_size"`
	VaultSecrets            bool `json:"vault_secrets"`
	Cancelable              bool `json:"cancelable"`
	ReturnExitCode          bool `json:"return_exit_code"`
	ServiceVariables        bool `json:"service_variables"`
}

// ConfigInfo is info.config.
type ConfigInfo struct {
	GPUs string `json:"gpus"`
}

// VersionInfo is the runner's "info" object sent with register, job request and job update.
type VersionInfo struct {
	Name         string       `json:"name,omitempty"`
	Version      string       `json:"version,omitempty"`
	Revision     string       `json:"revision,omitempty"`
	Platform     string       `json:"platform,omitempty"`
	Architecture string       `json:"architecture,omitempty"`
	Executor     string       `json:"executor,omitempty"`
	Shell        string       `json:"shell,omitempty"`
	Features     FeaturesInfo `json:"features"`
	Config       ConfigInfo   `json:"config"`
}

// RegisterRunnerRequest is the body of POST /api/v4/runners.
type RegisterRunnerRequest struct {
	Info            VersionInfo `json:"info"`
	Token           string      `json:"token"` // the registration token
	Description     string      `json:"description,omitempty"`
	MaintenanceNote string      `json:"maintenance_note,omitempty"`
	TagList         string      `json:"tag_list,omitempty"` // comma-separated
	RunUntagged     bool        `json:"run_untagged"`
	Locked          bool        `json:"locked"`
	AccessLevel     string      `json:"access_level,omitempty"`
	MaximumTimeout  int         `json:"maximum_timeout,omitempty"`
	Active          bool        `json:"active"`
	Paused          *bool       `json:"paused,omitempty"` // newer runners send paused instead of active
}

// RegisterRunnerResponse is the 201 body of POST /api/v4/runners.
type RegisterRunnerResponse struct {
	ID             int64  `json:"id,omitempty"`
	Token          string `json:"token"`
	TokenExpiresAt string `json:"token_expires_at,omitempty"`
}

// RunnerTokenRequest is the body of POST /api/v4/runners/verify and DELETE /api/v4/runners.
type RunnerTokenRequest struct {
	Token    string `json:"token"`
	SystemID string `json:"system_id,omitempty"`
}

// SessionInfo is the optional interactive-session endpoint of a job request.
type SessionInfo struct {
	URL           string `json:"url,omitempty"`
	Certificate   string `json:"certificate,omitempty"`
	Authorization string `json:"authorization,omitempty"`
}

// JobRequest is the body of POST /api/v4/jobs/request.
type JobRequest struct {
	Info       VersionInfo  `json:"info"`
	Token      string       `json:"token"`
	SystemID   string       `json:"system_id,omitempty"`
	LastUpdate string       `json:"last_update,omitempty"`
	Session    *SessionInfo `json:"session,omitempty"`
}

// JobInfo is job_info in a job payload.
type JobInfo struct {
	ID          int64  `json:"id,omitempty"`
	Name        string `json:"name"`
	Stage       string `json:"stage"`
	ProjectID   int64  `json:"project_id"`
	ProjectName string `json:"project_name"`
	// TimeInQueueSeconds is how long the job waited between creation and pickup
	// (sent by newer GitLab; the queue-start SLO uses it).
	TimeInQueueSeconds float64 `json:"time_in_queue_seconds,omitempty"`
	// ProjectJobsRunningOnInstanceRunnersCount is sent by newer GitLab for fair usage.
	ProjectJobsRunningOnInstanceRunnersCount string `json:"project_jobs_running_on_instance_runners_count,omitempty"`
}

// GitInfo is git_info in a job payload.
type GitInfo struct {
	RepoURL   string   `json:"repo_url"`
	Ref       string   `json:"ref"`
	Sha       string   `json:"sha"`
	BeforeSha string   `json:"before_sha"`
	RefType   string   `json:"ref_type"`
	Refspecs  []string `json:"refspecs"`
	Depth     int      `json:"depth"`
	// RepoObjectFormat is the repository's hash algorithm, "sha1" or "sha256" (GitLab ≥ 16.9).
	RepoObjectFormat string `json:"repo_object_format,omitempty"`
}

// RunnerInfo is runner_info in a job payload.
type RunnerInfo struct {
	Timeout          int    `json:"timeout"` // seconds; <= 0 means the runner default (7200)
	RunnerSessionURL string `json:"runner_session_url,omitempty"`
}

// Variable is one entry of variables in a job payload.
type Variable struct {
	Key    string `json:"key"`
	Value  string `json:"value"`
	Public bool   `json:"public"`
	File   bool   `json:"file"`
	Masked bool   `json:"masked"`
	Raw    bool   `json:"raw"`
}

// Step is one entry of steps in a job payload.
type Step struct {
	Name         string   `json:"name"`
	Script       []string `json:"script"`
	Timeout      int      `json:"timeout"`
	When         string   `json:"when"`
	AllowFailure bool     `json:"allow_failure"`
}

// Image is image (and each entry of services) in a job payload. Alias,
// Command and Variables are sent for services only.
type Image struct {
	Name       string   `json:"name"`
	Alias      string   `json:"alias,omitempty"`
	Command    []string `json:"command,omitempty"`
	Entrypoint []string `json:"entrypoint,omitempty"`
	Ports      []Port   `json:"ports,omitempty"`
	// Variables of a service (key and value only, as GitLab sends them).
	Variables []Variable `json:"variables,omitempty"`
	// PullPolicy lists the allowed pull policies: always, if-not-present, never.
	PullPolicy []string `json:"pull_policy,omitempty"`
}

// Port is an exposed port of an image.
type Port struct {
	Number   int    `json:"number,omitempty"`
	Protocol string `json:"protocol,omitempty"`
	Name     string `json:"name,omitempty"`
}

// Artifact is one entry of artifacts in a job payload.
type Artifact struct {
	Name      string   `json:"name"`
	Untracked bool     `json:"untracked"`
	Paths     []string `json:"paths"`
	Exclude   []string `json:"exclude,omitempty"` // GitLab omits an empty exclude
	When      string   `json:"when"`
	Type      string   `json:"artifact_type"`
	Format    string   `json:"artifact_format"`
	ExpireIn  string   `json:"expire_in"`
}

// Cache is one entry of cache in a job payload.
type Cache struct {
	Key       string   `json:"key"`
	Untracked bool     `json:"untracked"`
	Policy    string   `json:"policy"`
	Paths     []string `json:"paths"`
	When      string   `json:"when"`
	// FallbackKeys are tried in order when Key has no cache (GitLab ≥ 16.0).
	FallbackKeys []string `json:"fallback_keys"`
}

// Credentials is one entry of credentials in a job payload.
type Credentials struct {
	Type     string `json:"type"`
	URL      string `json:"url"`
	Username string `json:"username"`
	Password string `json:"password"`
}

// ArtifactsFile names a dependency's artifacts archive.
type ArtifactsFile struct {
	Filename string `json:"filename"`
	Size     int64  `json:"size"`
}

// Dependency is one entry of dependencies in a job payload.
type Dependency struct {
	ID    int64  `json:"id"`
	Token string `json:"token"`
	Name  string `json:"name"`
	// ArtifactsFile is absent (zero) when the dependency has no artifacts.
	ArtifactsFile ArtifactsFile `json:"artifacts_file,omitzero"`
}

// Hook is one entry of hooks in a job payload (GitLab ≥ 15.6), such as
// pre_get_sources_script from the job's hooks: keyword.
type Hook struct {
	Name   string   `json:"name"`
	Script []string `json:"script"`
}

// HookPreGetSourcesScript is the hook run before get_sources.
const HookPreGetSourcesScript = "pre_get_sources_script"

// GitlabFeatures is features in a job payload: what the server accepts.
type GitlabFeatures struct {
	TraceSections  bool     `json:"trace_sections"`
	FailureReasons []string `json:"failure_reasons"`
}

// JobResponse is the 201 body of POST /api/v4/jobs/request: the job payload.
type JobResponse struct {
	ID            int64          `json:"id"`
	Token         string         `json:"token"`
	AllowGitFetch bool           `json:"allow_git_fetch"`
	JobInfo       JobInfo        `json:"job_info"`
	GitInfo       GitInfo        `json:"git_info"`
	RunnerInfo    RunnerInfo     `json:"runner_info"`
	Variables     []Variable     `json:"variables"`
	Steps         []Step         `json:"steps"`
	Image         *Image         `json:"image"`
	Services      []Image        `json:"services"`
	Artifacts     []Artifact     `json:"artifacts"`
	Cache         []Cache        `json:"cache"`
	Credentials   []Credentials  `json:"credentials"`
	Dependencies  []Dependency   `json:"dependencies"`
	Features      GitlabFeatures `json:"features"`
	Hooks         []Hook         `json:"hooks,omitempty"`
}

// JobTraceOutput is output in UpdateJobRequest: a summary of the whole trace.
type JobTraceOutput struct {
	Checksum string `json:"checksum,omitempty"` // "crc32:" + 8 lowercase hex digits (IEEE)
	Bytesize int    `json:"bytesize,omitempty"`
}

// UpdateJobRequest is the body of PUT /api/v4/jobs/:id.
type UpdateJobRequest struct {
	Info          VersionInfo    `json:"info"`
	Token         string         `json:"token"` // the job token
	State         string         `json:"state"`
	FailureReason string         `json:"failure_reason,omitempty"`
	Checksum      string         `json:"checksum,omitempty"` // deprecated duplicate of Output.Checksum
	Output        JobTraceOutput `json:"output"`
	ExitCode      int            `json:"exit_code,omitempty"`
}
