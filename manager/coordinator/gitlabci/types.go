package gitlabci

import "time"

// Config is a loaded .gitlab-ci.yml: its stages, global variables, workflow
// rules and jobs, with hidden jobs, extends:, !reference and default:
// resolved. Config.Evaluate turns it into the jobs of one pipeline.
type Config struct {
	File      string
	Stages    []string // .pre first, .post last
	Variables []Variable
	Workflow  *Workflow // nil when the file has none
	Jobs      []*Job    // in file order
	Warnings  []Warning
}

// Workflow is the workflow: keyword.
type Workflow struct {
	Name  string
	Rules []Rule
	Line  int
}

// Variable is one CI/CD variable from variables:.
type Variable struct {
	Key   string `yaml:"key" json:"key"`
	Value string `yaml:"value" json:"value"`
	// Raw is expand: false (the runner does not expand $ references in it).
	Raw bool `yaml:"raw" json:"raw,omitempty"`
}

// Image is image: of a job or one entry of services:.
type Image struct {
	Name       string   `yaml:"name" json:"name"`
	Entrypoint []string `yaml:"entrypoint" json:"entrypoint,omitempty"`
	// Alias, Command and Variables are for services only.
	Alias      string     `yaml:"alias" json:"alias,omitempty"`
	Command    []string   `yaml:"command" json:"command,omitempty"`
	Variables  []Variable `yaml:"variables" json:"variables,omitempty"`
	PullPolicy []string   `yaml:"pull_policy" json:"pull_policy,omitempty"`
}

// Artifacts is artifacts: of a job.
type Artifacts struct {
	Name      string   `yaml:"name" json:"name,omitempty"`
	Paths     []string `yaml:"paths" json:"paths,omitempty"`
	Exclude   []string `yaml:"exclude" json:"exclude,omitempty"`
	Untracked bool     `yaml:"untracked" json:"untracked,omitempty"`
	When      string   `yaml:"when" json:"when,omitempty"` // on_success (default), on_failure, always
	ExpireIn  string   `yaml:"expire_in" json:"expire_in,omitempty"`
	Reports   []Report `yaml:"reports" json:"reports,omitempty"`
}

// Report is one entry of artifacts:reports: its type (junit, dotenv, …) and paths.
type Report struct {
	Type  string   `yaml:"type" json:"type"`
	Paths []string `yaml:"paths" json:"paths"`
}

// Cache is one cache: entry.
type Cache struct {
	// Key is the literal key; empty with KeyFiles set means the key is
	// computed from those files' contents (KeyPrefix-<sha1>).
	Key          string   `yaml:"key" json:"key,omitempty"`
	KeyFiles     []string `yaml:"key_files" json:"key_files,omitempty"`
	KeyPrefix    string   `yaml:"key_prefix" json:"key_prefix,omitempty"`
	Paths        []string `yaml:"paths" json:"paths,omitempty"`
	Untracked    bool     `yaml:"untracked" json:"untracked,omitempty"`
	Policy       string   `yaml:"policy" json:"policy,omitempty"` // pull-push (default), pull, push
	When         string   `yaml:"when" json:"when,omitempty"`     // on_success (default), on_failure, always
	Unprotect    bool     `yaml:"unprotect" json:"unprotect,omitempty"`
	FallbackKeys []string `yaml:"fallback_keys" json:"fallback_keys,omitempty"`
}

// Need is one entry of needs:.
type Need struct {
	Job string `yaml:"job" json:"job"`
	// NoArtifacts is artifacts: false (the job does not download its artifacts).
	NoArtifacts bool `yaml:"no_artifacts" json:"no_artifacts,omitempty"`
	Optional    bool `yaml:"optional" json:"optional,omitempty"`
}

// Retry is retry: of a job.
type Retry struct {
	Max       int      `yaml:"max" json:"max"`
	When      []string `yaml:"when" json:"when,omitempty"` // failure reasons; empty = always
	ExitCodes []int    `yaml:"exit_codes" json:"exit_codes,omitempty"`
}

// Rule is one entry of rules: (or workflow:rules:).
type Rule struct {
	If           string // expression; empty matches
	ifExpr       *Expr
	When         string     // "" keeps the job's; never, on_success, on_failure, always, manual, delayed
	AllowFailure *bool      // nil keeps the job's
	Variables    []Variable // added when the rule matches
	Exists       []string   // globs; the rule matches only if a file matches
	Line         int
}

// MatrixRow is one entry of parallel:matrix: variables and their values,
// in the order written. Every combination of values makes one job.
type MatrixRow []MatrixVar

// MatrixVar is one variable of a matrix row.
type MatrixVar struct {
	Name   string
	Values []string
}

// RefFilter is only: or except:: refs (branches, tags, pushes, web, api,
// schedules, triggers, a branch name or a /pattern/) and variables expressions.
type RefFilter struct {
	Refs      []string
	Variables []*Expr
	Line      int
}

// Job is one job of the configuration.
type Job struct {
	Name  string
	File  string
	Line  int
	Stage string

	Image        *Image
	Services     []Image
	Variables    []Variable // the job's own
	BeforeScript []string
	Script       []string
	AfterScript  []string
	// PreGetSourcesScript is hooks:pre_get_sources_script.
	PreGetSourcesScript []string

	Needs        *[]Need   // nil: run after the earlier stages
	Dependencies *[]string // nil: artifacts of every job of earlier stages
	Artifacts    *Artifacts
	Cache        []Cache
	Tags         []string
	Timeout      time.Duration // 0: the project default

	AllowFailure          bool
	AllowFailureExitCodes []int
	When                  string // on_success, on_failure, always, manual, delayed
	Retry                 Retry

	Parallel int         // parallel: N (0 or 1: one job)
	Matrix   []MatrixRow // parallel:matrix

	Rules  []Rule // nil: no rules:
	Only   *RefFilter
	Except *RefFilter

	// InheritVariables lists the global variables the job takes; nil takes all.
	InheritVariables []string
	inheritNoVars    bool
	parallelOf       string // the job's name before parallel: expansion
}
