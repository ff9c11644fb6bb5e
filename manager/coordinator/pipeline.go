package coordinator

import (
	"bytes"
	"cmp"
	"crypto/sha1"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/mayfly-ci/mayfly/manager/coordinator/gitlabci"
)

// PipelineFile is the schema of a pipeline file (YAML or JSON) and of the
// admin API's POST /-/mayfly/pipelines body. Groups and projects are created
// when their path is new and reused when it exists; every pipeline listed is
// enqueued. Unknown keys are errors.
//
//	groups:                         # optional
//	  - path: acme                  # required; "acme/platform" is a subgroup of acme
//	    name: ACME                  # default: last path element
//	    registration_token: grp-tok # default: random
//	projects:
//	  - name: web                   # required; [A-Za-z0-9_.-]
//	    group: acme                 # group path; default: the user namespace "root"
//	    registration_token: prj-tok # default: random
//	    shared_runners: true        # instance runners may take its jobs; default true
//	    pipelines:
//	      - ref: main               # default main
//	        ref_type: branch        # branch (default) or tag
//	        sha: 0123...            # 40 hex digits; default derived from project, ref and pipeline id
//	        before_sha: 0000...     # 40 hex digits; default 40 zeros
//	        protected: false        # protected ref: ref_protected runners only take these
//	        stages: [build, test]   # default .pre, build, test, deploy, .post
//	        variables:              # pipeline-wide, before job variables
//	          - {key: GIT_STRATEGY, value: none}
//	        before_script: []       # default for jobs without one
//	        after_script: []        # default for jobs without one
//	        jobs:
//	          - name: unit          # required, unique in the pipeline
//	            stage: test         # default test; must be in stages
//	            before_script: [...]
//	            script: [make test] # required, at least one line
//	            after_script: [...]
//	            variables:
//	              - key: TOKEN      # required, [A-Za-z_][A-Za-z0-9_]*
//	                value: s3cr3t-value
//	                masked: true    # masked: at least 8 characters, one line; sent public:false
//	                file: false     # runner writes the value to a file
//	                raw: false      # no $-expansion
//	            tags: [linux]
//	            timeout: 10m        # seconds (600) or a Go duration ("10m"); default 1h
//	            allow_failure: false
//	            git_strategy: none  # none, fetch or clone: sets GIT_STRATEGY
//	            # GitLab's job keywords, as in .gitlab-ci.yml (package gitlabci):
//	            when: on_success    # on_failure, always, manual (never run)
//	            needs: [{job: compile}]            # run after these jobs only
//	            dependencies: [compile]            # whose artifacts to download
//	            image: {name: debian:bookworm}
//	            services: [{name: postgres:15, alias: db}]
//	            artifacts: {paths: [bin/], when: on_success}
//	            cache: [{key: gems, paths: [vendor/]}]
//	            retry: {max: 2, when: [script_failure]}
//	            allow_failure_exit_codes: [3]
//	            pre_get_sources_script: [echo hi]
//
// Jobs run as GitLab runs them: a job without needs: waits for every job of
// the earlier stages, a job with needs: for those jobs only. Then when:
// decides: on_success runs if they all succeeded (failures allowed by
// allow_failure count as success, skipped jobs too), on_failure if one
// failed, always in any case; manual jobs are never run (status manual);
// otherwise the job is skipped. A failed job with retry: left is retried
// as a new job.
type PipelineFile struct {
	Groups   []GroupSpec   `yaml:"groups" json:"groups,omitempty"`
	Projects []ProjectSpec `yaml:"projects" json:"projects"`
}

// GroupSpec describes a group.
type GroupSpec struct {
	Path              string `yaml:"path" json:"path"`
	Name              string `yaml:"name" json:"name,omitempty"`
	RegistrationToken string `yaml:"registration_token" json:"registration_token,omitempty"`
}

// ProjectSpec describes a project and the pipelines to enqueue for it.
type ProjectSpec struct {
	Name              string         `yaml:"name" json:"name"`
	Group             string         `yaml:"group" json:"group,omitempty"`
	RegistrationToken string         `yaml:"registration_token" json:"registration_token,omitempty"`
	SharedRunners     *bool          `yaml:"shared_runners" json:"shared_runners,omitempty"`
	Pipelines         []PipelineSpec `yaml:"pipelines" json:"pipelines,omitempty"`
}

// PipelineSpec describes one pipeline.
type PipelineSpec struct {
	Ref          string         `yaml:"ref" json:"ref,omitempty"`
	RefType      string         `yaml:"ref_type" json:"ref_type,omitempty"`
	Sha          string         `yaml:"sha" json:"sha,omitempty"`
	BeforeSha    string         `yaml:"before_sha" json:"before_sha,omitempty"`
	Protected    bool           `yaml:"protected" json:"protected,omitempty"`
	Stages       []string       `yaml:"stages" json:"stages,omitempty"`
	Variables    []VariableSpec `yaml:"variables" json:"variables,omitempty"`
	BeforeScript []string       `yaml:"before_script" json:"before_script,omitempty"`
	AfterScript  []string       `yaml:"after_script" json:"after_script,omitempty"`
	Jobs         []JobSpec      `yaml:"jobs" json:"jobs"`
	// Source is CI_PIPELINE_SOURCE: push (default), web, api, schedule, trigger, pipeline.
	Source string `yaml:"source" json:"source,omitempty"`
}

// JobSpec describes one job.
type JobSpec struct {
	Name         string         `yaml:"name" json:"name"`
	Stage        string         `yaml:"stage" json:"stage,omitempty"`
	BeforeScript []string       `yaml:"before_script" json:"before_script,omitempty"`
	Script       []string       `yaml:"script" json:"script"`
	AfterScript  []string       `yaml:"after_script" json:"after_script,omitempty"`
	Variables    []VariableSpec `yaml:"variables" json:"variables,omitempty"`
	Tags         []string       `yaml:"tags" json:"tags,omitempty"`
	Timeout      Duration       `yaml:"timeout" json:"timeout,omitempty"`
	AllowFailure *bool          `yaml:"allow_failure" json:"allow_failure,omitempty"` // default false; true for manual jobs
	GitStrategy  string         `yaml:"git_strategy" json:"git_strategy,omitempty"`

	When                  string              `yaml:"when" json:"when,omitempty"`
	Needs                 *[]gitlabci.Need    `yaml:"needs" json:"needs,omitempty"`
	Dependencies          *[]string           `yaml:"dependencies" json:"dependencies,omitempty"`
	Image                 *gitlabci.Image     `yaml:"image" json:"image,omitempty"`
	Services              []gitlabci.Image    `yaml:"services" json:"services,omitempty"`
	Artifacts             *gitlabci.Artifacts `yaml:"artifacts" json:"artifacts,omitempty"`
	Cache                 []gitlabci.Cache    `yaml:"cache" json:"cache,omitempty"`
	Retry                 gitlabci.Retry      `yaml:"retry" json:"retry,omitzero"`
	AllowFailureExitCodes []int               `yaml:"allow_failure_exit_codes" json:"allow_failure_exit_codes,omitempty"`
	PreGetSourcesScript   []string            `yaml:"pre_get_sources_script" json:"pre_get_sources_script,omitempty"`
}

// VariableSpec describes one CI/CD variable.
type VariableSpec struct {
	Key    string `yaml:"key" json:"key"`
	Value  string `yaml:"value" json:"value"`
	Masked bool   `yaml:"masked" json:"masked,omitempty"`
	File   bool   `yaml:"file" json:"file,omitempty"`
	Raw    bool   `yaml:"raw" json:"raw,omitempty"`
}

// Duration is a timeout written as whole seconds (600) or a Go duration string ("10m").
type Duration time.Duration

// UnmarshalYAML accepts an integer number of seconds or a duration string.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return fmt.Errorf("line %d: timeout must be seconds or a duration string", n.Line)
	}
	v, err := parseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %w", n.Line, err)
	}
	*d = v
	return nil
}

// UnmarshalJSON accepts an integer number of seconds or a duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	s := string(b)
	if uq, err := strconv.Unquote(s); err == nil {
		s = uq
	}
	v, err := parseDuration(s)
	if err != nil {
		return err
	}
	*d = v
	return nil
}

// MarshalJSON writes whole seconds.
func (d Duration) MarshalJSON() ([]byte, error) {
	return []byte(strconv.FormatInt(int64(time.Duration(d)/time.Second), 10)), nil
}

func parseDuration(s string) (Duration, error) {
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		return Duration(time.Duration(n) * time.Second), nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("timeout %q is neither seconds nor a duration like 10m", s)
	}
	return Duration(v), nil
}

// LoadPipelineFile reads and parses a pipeline file (.json as JSON, anything else as YAML).
func LoadPipelineFile(path string) (*PipelineFile, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read pipeline file: %w", err)
	}
	return ParsePipelineFile(path, data)
}

// ParsePipelineFile parses and validates a pipeline file; name appears in errors
// and picks the format (".json" → JSON, else YAML, which also reads JSON).
func ParsePipelineFile(name string, data []byte) (*PipelineFile, error) {
	var f PipelineFile
	format := "yaml"
	if strings.EqualFold(filepath.Ext(name), ".json") {
		format = "json"
	}
	if err := decodeStrict(name, format, data, &f); err != nil {
		return nil, err
	}
	if err := f.Validate(name); err != nil {
		return nil, err
	}
	return &f, nil
}

// decodeStrict decodes data into v as JSON when format mentions "json" and as
// YAML otherwise; unknown keys are errors naming source.
func decodeStrict(source, format string, data []byte, v any) error {
	if strings.Contains(strings.ToLower(format), "json") {
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields()
		if err := dec.Decode(v); err != nil {
			return &FieldError{Source: source, Msg: "parse JSON: " + err.Error()}
		}
		if dec.More() {
			return &FieldError{Source: source, Msg: "parse JSON: more than one document"}
		}
		return nil
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil {
		if errors.Is(err, io.EOF) {
			return &FieldError{Source: source, Msg: "document is empty"}
		}
		msg := strings.ReplaceAll(err.Error(), "coordinator.", "")
		msg = strings.ReplaceAll(strings.TrimPrefix(msg, "yaml: unmarshal errors:\n  "), "\n  ", "; ")
		return &FieldError{Source: source, Msg: "parse YAML: " + msg}
	}
	return nil
}

var (
	pathElem = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]*$`)
	varKey   = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	hex40    = regexp.MustCompile(`^[0-9a-f]{40}$`)
)

var defaultStages = []string{".pre", "build", "test", "deploy", ".post"}

// Validate checks the whole file; source names the file in errors.
func (f *PipelineFile) Validate(source string) error {
	if len(f.Projects) == 0 && len(f.Groups) == 0 {
		return &FieldError{Source: source, Field: "projects", Msg: "no groups or projects"}
	}
	for i, g := range f.Groups {
		if err := g.validate(source, fmt.Sprintf("groups[%d]", i)); err != nil {
			return err
		}
	}
	for i, p := range f.Projects {
		if err := p.validate(source, fmt.Sprintf("projects[%d]", i)); err != nil {
			return err
		}
	}
	return nil
}

func (g *GroupSpec) validate(source, field string) error {
	if g.Path == "" {
		return &FieldError{Source: source, Field: field + ".path", Msg: "is required"}
	}
	for _, e := range strings.Split(g.Path, "/") {
		if !pathElem.MatchString(e) {
			return &FieldError{Source: source, Field: field + ".path", Msg: fmt.Sprintf("%q is not a group path (letters, digits, _ . - separated by /)", g.Path)}
		}
	}
	return nil
}

func (p *ProjectSpec) validate(source, field string) error {
	if !pathElem.MatchString(p.Name) {
		return &FieldError{Source: source, Field: field + ".name", Msg: fmt.Sprintf("%q is not a project name (letters, digits, _ . -)", p.Name)}
	}
	for i := range p.Pipelines {
		if err := p.Pipelines[i].validate(source, fmt.Sprintf("%s.pipelines[%d]", field, i)); err != nil {
			return err
		}
	}
	return nil
}

func (pl *PipelineSpec) validate(source, field string) error {
	fe := func(f, msg string, a ...any) error {
		return &FieldError{Source: source, Field: field + f, Msg: fmt.Sprintf(msg, a...)}
	}
	switch pl.RefType {
	case "", "branch", "tag":
	default:
		return fe(".ref_type", "%q is not branch or tag", pl.RefType)
	}
	if pl.Sha != "" && !hex40.MatchString(pl.Sha) {
		return fe(".sha", "%q is not 40 lowercase hex digits", pl.Sha)
	}
	if pl.BeforeSha != "" && !hex40.MatchString(pl.BeforeSha) {
		return fe(".before_sha", "%q is not 40 lowercase hex digits", pl.BeforeSha)
	}
	stages := pl.Stages
	if len(stages) == 0 {
		stages = defaultStages
	}
	for i, st := range stages {
		if strings.TrimSpace(st) == "" {
			return fe(fmt.Sprintf(".stages[%d]", i), "is empty")
		}
		if slices.Index(stages, st) != i {
			return fe(fmt.Sprintf(".stages[%d]", i), "%q is listed twice", st)
		}
	}
	if err := validateVars(pl.Variables, func(f string) string { return field + ".variables" + f }, source); err != nil {
		return err
	}
	if len(pl.Jobs) == 0 {
		return fe(".jobs", "a pipeline needs at least one job")
	}
	seen := map[string]bool{}
	for i, j := range pl.Jobs {
		jf := fmt.Sprintf(".jobs[%d]", i)
		switch {
		case strings.TrimSpace(j.Name) == "":
			return fe(jf+".name", "is required")
		case seen[j.Name]:
			return fe(jf+".name", "%q is used by another job of this pipeline", j.Name)
		case len(j.Script) == 0:
			return fe(jf+".script", "job %q needs at least one script line", j.Name)
		case !slices.Contains(stages, cmp.Or(j.Stage, "test")):
			return fe(jf+".stage", "%q is not one of the stages %v", cmp.Or(j.Stage, "test"), stages)
		case j.Timeout < 0 || (j.Timeout > 0 && time.Duration(j.Timeout) < time.Second):
			return fe(jf+".timeout", "must be at least 1s")
		}
		switch j.GitStrategy {
		case "", "none", "fetch", "clone":
		default:
			return fe(jf+".git_strategy", "%q is not none, fetch or clone", j.GitStrategy)
		}
		switch j.When {
		case "", "on_success", "on_failure", "always", "manual":
		default:
			return fe(jf+".when", "%q is not on_success, on_failure, always or manual", j.When)
		}
		if j.Retry.Max < 0 || j.Retry.Max > 2 {
			return fe(jf+".retry.max", "must be 0, 1 or 2")
		}
		if j.Image != nil && j.Image.Name == "" {
			return fe(jf+".image.name", "is required")
		}
		for k, svc := range j.Services {
			if svc.Name == "" {
				return fe(fmt.Sprintf("%s.services[%d].name", jf, k), "is required")
			}
		}
		for k, t := range j.Tags {
			if strings.TrimSpace(t) == "" || strings.Contains(t, ",") {
				return fe(fmt.Sprintf("%s.tags[%d]", jf, k), "%q is not a tag", t)
			}
		}
		if err := validateVars(j.Variables, func(f string) string { return field + jf + ".variables" + f }, source); err != nil {
			return err
		}
		seen[j.Name] = true
	}
	switch pl.Source {
	case "", "push", "web", "api", "schedule", "trigger", "pipeline", "merge_request_event", "chat", "external":
	default:
		return fe(".source", "%q is not a pipeline source GitLab knows", pl.Source)
	}
	return checkJobGraph(pl.Jobs, stages, fe)
}

// checkJobGraph checks needs: and dependencies: of a pipeline: every job
// named exists, needs point to the same or an earlier stage, dependencies to
// an earlier stage or a needed job, and needs do not loop.
func checkJobGraph(jobs []JobSpec, stages []string, fe func(f, msg string, a ...any) error) error {
	stageOf := map[string]int{}
	for _, j := range jobs {
		stageOf[j.Name] = slices.Index(stages, cmp.Or(j.Stage, "test"))
	}
	for i, j := range jobs {
		jf := fmt.Sprintf(".jobs[%d]", i)
		if j.Needs != nil {
			for k, n := range *j.Needs {
				st, ok := stageOf[n.Job]
				switch {
				case !ok:
					return fe(fmt.Sprintf("%s.needs[%d]", jf, k), "job %q is not in this pipeline", n.Job)
				case n.Job == j.Name:
					return fe(fmt.Sprintf("%s.needs[%d]", jf, k), "a job cannot need itself")
				case st > stageOf[j.Name]:
					return fe(fmt.Sprintf("%s.needs[%d]", jf, k), "job %q is in a later stage", n.Job)
				}
			}
		}
		if j.Dependencies != nil {
			for k, d := range *j.Dependencies {
				st, ok := stageOf[d]
				needed := j.Needs != nil && slices.ContainsFunc(*j.Needs, func(n gitlabci.Need) bool { return n.Job == d })
				switch {
				case !ok:
					return fe(fmt.Sprintf("%s.dependencies[%d]", jf, k), "job %q is not in this pipeline", d)
				case st >= stageOf[j.Name] && !needed:
					return fe(fmt.Sprintf("%s.dependencies[%d]", jf, k), "job %q is not in an earlier stage", d)
				}
			}
		}
	}
	// needs within a stage may loop; a loop would never run.
	byName := map[string]JobSpec{}
	for _, j := range jobs {
		byName[j.Name] = j
	}
	state := map[string]int{}
	var visit func(name string) bool
	visit = func(name string) bool {
		switch state[name] {
		case 1:
			return false
		case 2:
			return true
		}
		state[name] = 1
		if j := byName[name]; j.Needs != nil {
			for _, n := range *j.Needs {
				if !visit(n.Job) {
					return false
				}
			}
		}
		state[name] = 2
		return true
	}
	for i, j := range jobs {
		if !visit(j.Name) {
			return fe(fmt.Sprintf(".jobs[%d].needs", i), "needs of job %q form a cycle", j.Name)
		}
	}
	return nil
}

func validateVars(vars []VariableSpec, field func(string) string, source string) error {
	for i, v := range vars {
		f := fmt.Sprintf("[%d]", i)
		if !varKey.MatchString(v.Key) {
			return &FieldError{Source: source, Field: field(f + ".key"), Msg: fmt.Sprintf("%q is not a variable name", v.Key)}
		}
		if v.Masked && (len(v.Value) < 8 || strings.ContainsAny(v.Value, "\r\n")) {
			return &FieldError{Source: source, Field: field(f + ".value"), Msg: fmt.Sprintf("masked variable %s must be one line of at least 8 characters", v.Key)}
		}
	}
	return nil
}

// fakeSha derives a stable 40-hex commit id when a pipeline names none.
func fakeSha(parts ...string) string {
	h := sha1.Sum([]byte(strings.Join(parts, "\x00")))
	return hex.EncodeToString(h[:])
}
