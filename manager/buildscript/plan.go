// Package buildscript turns a GitLab job payload into the scripts a job runs
// on its VM, stage by stage, the way gitlab-runner does: prepare_script,
// get_sources, (restore_cache, download_artifacts), step_script and the other
// user steps, after_script, (archive_cache, upload_artifacts_*). Each stage is
// a separate script, so each can have its own timeout and after_script can
// run after a failure.
//
// It also decides a job's result from the stage outcomes (Decide), drives the
// stages in order (Plan.Run), and formats the trace lines the official runner
// writes (section markers, the header, "Job succeeded", "ERROR: Job failed").
//
// Bash and POSIX sh scripts are executed in this package's tests; PowerShell
// scripts are checked by their text only.
package buildscript

import (
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// Shells a Plan can be generated for.
const (
	ShellBash       = "bash"       // GNU bash, the runner's default on Linux
	ShellSh         = "sh"         // a POSIX sh (dash, busybox ash); pipefail when it has it
	ShellPwsh       = "pwsh"       // PowerShell 7+
	ShellPowerShell = "powershell" // Windows PowerShell 5.1
)

// Defaults used when the payload or the options leave a value out.
const (
	DefaultJobTimeout         = 2 * time.Hour   // runner_info.timeout <= 0
	DefaultAfterScriptTimeout = 5 * time.Minute // RUNNER_AFTER_SCRIPT_TIMEOUT unset
	DefaultBuildsDir          = "/builds"
	DefaultWindowsBuildsDir   = `C:\builds`
)

// StageName names a stage; it is also the trace section name.
type StageName string

// The stages, in the order they run. User steps other than "script" run as
// "step_<name>" right after step_script.
const (
	StagePrepare                  StageName = "prepare_script"
	StageGetSources               StageName = "get_sources"
	StageRestoreCache             StageName = "restore_cache"
	StageDownloadArtifacts        StageName = "download_artifacts"
	StageStepScript               StageName = "step_script"
	StageAfterScript              StageName = "after_script"
	StageArchiveCache             StageName = "archive_cache"
	StageArchiveCacheOnFailure    StageName = "archive_cache_on_failure"
	StageUploadArtifactsOnSuccess StageName = "upload_artifacts_on_success"
	StageUploadArtifactsOnFailure StageName = "upload_artifacts_on_failure"
)

// When a stage runs, relative to the stages before it.
const (
	// WhenOnSuccess: only if no earlier stage failed (allow_failure stages do not count).
	WhenOnSuccess = runnerapi.WhenOnSuccess
	// WhenOnFailure: only if an earlier stage failed.
	WhenOnFailure = runnerapi.WhenOnFailure
	// WhenAlways: once the user steps have been started, whatever their result
	// (after_script). Not after a cancel or the job timeout, as in gitlab-runner v14.
	WhenAlways = runnerapi.WhenAlways
)

// Options are the runner settings that shape the scripts ([[runners]] in config.toml).
type Options struct {
	// Shell is bash (default), sh, pwsh or powershell.
	Shell string
	// BuildsDir is where projects are checked out; default /builds, or C:\builds for PowerShell.
	BuildsDir string
	// Environment holds KEY=VALUE entries from config.toml; job variables override them.
	Environment []string
	// PreCloneScript (pre_get_sources_script) runs in get_sources before
	// the clone or fetch; PostCloneScript (post_get_sources_script) after the
	// checkout and submodules, in the project dir. Neither runs when
	// GIT_STRATEGY is none or empty.
	PreCloneScript, PostCloneScript string
	// PreBuildScript runs in each user step before its commands.
	PreBuildScript string
	// PostBuildScript runs in each user step after its commands, only when they succeeded.
	PostBuildScript string
	// Via is shown in "Running on <host> via <Via>..." when not empty (the manager's host).
	Via string
	// RunnerVersion, RunnerRevision and RunnerShortToken fill CI_RUNNER_* variables.
	RunnerVersion, RunnerRevision, RunnerShortToken string
	// UseHelper says the manager puts mayfly-helper on the VM at
	// Plan.HelperPath, so the cache and artifact stages run; without it
	// they only say that they are not supported, as gitlab-runner does
	// without its helper.
	UseHelper bool
	// ServerURL is GitLab's URL for the helper when the payload has no
	// CI_SERVER_URL (the runner's url).
	ServerURL string
	// Cache signs the URLs of the distributed cache; nil keeps caches on
	// the VM only (which dies with the job).
	Cache CacheSigner
	// MaxCacheArchiveSize is the largest cache archive uploaded, in bytes;
	// 0 is the helper's default (5 GB), negative no limit.
	MaxCacheArchiveSize int64
}

// Stage is one script run on the VM.
type Stage struct {
	Name StageName
	// Title is the trace section header, such as `Executing "step_script" stage of the job script`.
	Title string
	// Script is the program text for the Plan's shell. Run it through Plan.Script,
	// which adds CI_JOB_STATUS.
	Script string
	// Timeout bounds the stage on its own; 0 means only the job timeout applies.
	Timeout time.Duration
	// When is WhenOnSuccess, WhenOnFailure or WhenAlways.
	When string
	// AllowFailure means a failure of this stage does not fail the job.
	AllowFailure bool
	// Attempts is how many times to try the stage before it counts as failed (1..10).
	Attempts int
	// User reports a user step (step_script, step_<name>): the job's own commands.
	User bool
}

// File is a file to write on the VM before the first stage: a file variable.
type File struct {
	Path    string
	Content []byte
	Mode    fs.FileMode
}

// Plan is everything needed to run one job's scripts.
type Plan struct {
	// Shell the scripts are written for; give it to the executor.
	Shell string
	// Stages in the order they run; see Stage.When.
	Stages []Stage
	// Files to upload before the first stage (file variables), mode 0600.
	Files []File
	// BuildsDir, ProjectDir and TmpDir are absolute paths on the VM.
	BuildsDir, ProjectDir, TmpDir string
	// HelperPath is where the stages expect mayfly-helper (Options.UseHelper),
	// and NeedsHelper whether any stage runs it: then the manager uploads it
	// there before the first stage.
	HelperPath  string
	NeedsHelper bool
	// JobTimeout is runner_info.timeout, or DefaultJobTimeout.
	JobTimeout time.Duration
	// GitStrategy is clone, fetch, none or empty (see GitClone).
	GitStrategy string
	// Secrets are the values to mask in the trace: masked variables and the job token.
	Secrets []string
	// FailureReasons are the failure reasons GitLab accepts for this job.
	FailureReasons []string
	// Warnings are problems that did not stop generation (skipped variables,
	// bad optional settings); the lifecycle should show them in the trace.
	Warnings []string
}

// variable is a job variable after expansion, ready to export.
type variable struct {
	key, value string
}

var (
	identRE    = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	stepNameRE = regexp.MustCompile(`^[a-z0-9_]+$`)
	hexRE      = regexp.MustCompile(`^[0-9a-fA-F]+$`)
)

// Generate validates job and builds its Plan. Errors name the payload field or
// option at fault; a job that fails here should be reported as
// runner_system_failure.
func Generate(job *runnerapi.JobResponse, opts Options) (*Plan, error) {
	if job == nil {
		return nil, errors.New("job payload: missing")
	}
	shell := opts.Shell
	if shell == "" {
		shell = ShellBash
	}
	var w func() shellWriter
	switch shell {
	case ShellBash, ShellSh:
		w = func() shellWriter { return newPosixWriter(shell == ShellBash) }
	case ShellPwsh, ShellPowerShell:
		w = func() shellWriter { return newPSWriter(shell == ShellPowerShell) }
	default:
		return nil, fmt.Errorf("shell %q: want bash, sh, pwsh or powershell", opts.Shell)
	}
	g := &generator{job: job, opts: opts, newWriter: w, plan: &Plan{Shell: shell}}
	if err := g.check(); err != nil {
		return nil, err
	}
	if err := g.layout(); err != nil {
		return nil, err
	}
	if err := g.variables(); err != nil {
		return nil, err
	}
	if err := g.stages(); err != nil {
		return nil, err
	}
	return g.plan, nil
}

type generator struct {
	job       *runnerapi.JobResponse
	opts      Options
	newWriter func() shellWriter
	plan      *Plan
	windows   bool                // paths use backslashes
	vars      []variable          // exported in every stage, in order (file variables: their path)
	lookup    map[string]variable // last definition of each key, expanded (file variables: content)
	git       gitConfig           // get_sources settings, from gitSettings
}

// check validates the payload fields and options that do not depend on variables.
func (g *generator) check() error {
	j := g.job
	if j.ID <= 0 {
		return fmt.Errorf("job payload: id %d: want a positive job id", j.ID)
	}
	if j.Token == "" {
		return errors.New("job payload: token: empty")
	}
	user := 0
	for i, s := range j.Steps {
		switch {
		case s.Name == "":
			return fmt.Errorf("job payload: steps[%d].name: empty", i)
		case !stepNameRE.MatchString(s.Name):
			return fmt.Errorf("job payload: steps[%d].name %q: want lower-case letters, digits and _", i, s.Name)
		}
		for k, c := range s.Script {
			if strings.ContainsRune(c, 0) {
				return fmt.Errorf("job payload: steps[%d].script[%d]: contains a NUL byte", i, k)
			}
		}
		if s.Name != runnerapi.StepAfterScript {
			user++
		}
	}
	if len(j.Steps) == 0 {
		return errors.New("job payload: steps: empty, nothing to run")
	}
	if user == 0 {
		return errors.New(`job payload: steps: no "script" step, only after_script`)
	}
	for i, kv := range g.opts.Environment {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return fmt.Errorf("environment[%d] %q: want KEY=VALUE", i, kv)
		}
	}
	for _, o := range []struct{ name, v string }{
		{"pre_clone_script", g.opts.PreCloneScript},
		{"post_clone_script", g.opts.PostCloneScript},
		{"pre_build_script", g.opts.PreBuildScript},
		{"post_build_script", g.opts.PostBuildScript},
	} {
		if strings.ContainsRune(o.v, 0) {
			return fmt.Errorf("%s: contains a NUL byte", o.name)
		}
	}
	return nil
}

// layout fixes the directories and the job timeout.
func (g *generator) layout() error {
	p := g.plan
	ps := p.Shell == ShellPwsh || p.Shell == ShellPowerShell
	p.BuildsDir = g.opts.BuildsDir
	if p.BuildsDir == "" {
		p.BuildsDir = DefaultBuildsDir
		if p.Shell == ShellPowerShell {
			p.BuildsDir = DefaultWindowsBuildsDir
		}
	}
	g.windows = ps && isWindowsPath(p.BuildsDir)
	if !g.windows && !path.IsAbs(p.BuildsDir) || strings.ContainsAny(p.BuildsDir, "\x00\r\n") {
		return fmt.Errorf("builds_dir %q: want an absolute path", p.BuildsDir)
	}
	p.BuildsDir = strings.TrimRight(p.BuildsDir, `/\`)
	if p.BuildsDir == "" {
		p.BuildsDir = "/"
	}
	p.ProjectDir = g.join(p.BuildsDir, projectSlug(g.job))
	p.TmpDir = p.ProjectDir + ".tmp"
	if g.opts.UseHelper {
		p.HelperPath = g.join(p.BuildsDir, ".mayfly", g.helperName())
	}
	p.JobTimeout = DefaultJobTimeout
	if t := g.job.RunnerInfo.Timeout; t > 0 {
		p.JobTimeout = time.Duration(t) * time.Second
	}
	p.FailureReasons = g.job.Features.FailureReasons
	return nil
}

// isWindowsPath reports whether p is a Windows path (C:\x, C:/x or \\server\x).
func isWindowsPath(p string) bool {
	return len(p) >= 3 && p[1] == ':' && (p[2] == '\\' || p[2] == '/') ||
		strings.HasPrefix(p, `\\`)
}

// join appends slash-separated elems to base with the VM's separator.
func (g *generator) join(base string, elems ...string) string {
	if g.windows {
		s := strings.TrimRight(base, `\/`)
		for _, e := range elems {
			s += `\` + strings.ReplaceAll(strings.Trim(e, "/"), "/", `\`)
		}
		return s
	}
	return path.Join(append([]string{base}, elems...)...)
}

// projectSlug is the project's directory under builds_dir: the repository
// URL's path without .git (group/project), else project-<id>, as gitlab-runner
// names it for executors that do not share the builds directory.
func projectSlug(j *runnerapi.JobResponse) string {
	fallback := fmt.Sprintf("project-%d", j.JobInfo.ProjectID)
	u, err := url.Parse(j.GitInfo.RepoURL)
	if err != nil || u.Host == "" {
		return fallback
	}
	slug := path.Clean(strings.TrimSuffix(u.Path, ".git"))
	slug = strings.Trim(slug, "/")
	if slug == "" || slug == "." || strings.Contains(slug, "..") || !slugRE.MatchString(slug) {
		return fallback
	}
	return slug
}

var slugRE = regexp.MustCompile(`^[A-Za-z0-9_.\-/]+$`)

// variables collects what every stage exports, expands non-raw values and
// validates the git settings that variables control.
func (g *generator) variables() error {
	j, p := g.job, g.plan
	type raw struct {
		runnerapi.Variable
		field string // for error messages
	}
	var all []raw
	add := func(field, k, v string) {
		all = append(all, raw{runnerapi.Variable{Key: k, Value: v, Public: true}, field})
	}
	// Runner-provided variables first, then config.toml's environment, then
	// the job's own: a later definition wins.
	add("builtin", "CI", "true")
	add("builtin", "GITLAB_CI", "true")
	add("builtin", "CI_SERVER", "yes")
	add("builtin", "CI_BUILDS_DIR", p.BuildsDir)
	add("builtin", "CI_PROJECT_DIR", p.ProjectDir)
	add("builtin", "CI_CONCURRENT_ID", "0")
	add("builtin", "CI_CONCURRENT_PROJECT_ID", "0")
	add("builtin", "CI_DISPOSABLE_ENVIRONMENT", "true")
	add("builtin", "RUNNER_TEMP_PROJECT_DIR", p.TmpDir)
	if g.opts.RunnerVersion != "" {
		add("builtin", "CI_RUNNER_VERSION", g.opts.RunnerVersion)
	}
	if g.opts.RunnerRevision != "" {
		add("builtin", "CI_RUNNER_REVISION", g.opts.RunnerRevision)
	}
	if g.opts.RunnerShortToken != "" {
		add("builtin", "CI_RUNNER_SHORT_TOKEN", g.opts.RunnerShortToken)
	}
	// What GitLab normally sends itself; the job's own values override these.
	add("builtin", "CI_JOB_ID", strconv.FormatInt(j.ID, 10))
	add("builtin", "CI_JOB_TOKEN", j.Token)
	if j.JobInfo.Name != "" {
		add("builtin", "CI_JOB_NAME", j.JobInfo.Name)
	}
	if j.JobInfo.Stage != "" {
		add("builtin", "CI_JOB_STAGE", j.JobInfo.Stage)
	}
	if j.JobInfo.ProjectID > 0 {
		add("builtin", "CI_PROJECT_ID", strconv.FormatInt(j.JobInfo.ProjectID, 10))
	}
	if j.JobInfo.ProjectName != "" {
		add("builtin", "CI_PROJECT_NAME", j.JobInfo.ProjectName)
	}
	if j.GitInfo.Sha != "" {
		add("builtin", "CI_COMMIT_SHA", j.GitInfo.Sha)
		add("builtin", "CI_COMMIT_SHORT_SHA", j.GitInfo.Sha[:min(8, len(j.GitInfo.Sha))])
	}
	if j.GitInfo.BeforeSha != "" {
		add("builtin", "CI_COMMIT_BEFORE_SHA", j.GitInfo.BeforeSha)
	}
	if j.GitInfo.Ref != "" {
		add("builtin", "CI_COMMIT_REF_NAME", j.GitInfo.Ref)
	}
	if j.GitInfo.RepoURL != "" {
		add("builtin", "CI_REPOSITORY_URL", j.GitInfo.RepoURL)
	}
	for i, kv := range g.opts.Environment {
		k, v, _ := strings.Cut(kv, "=")
		add(fmt.Sprintf("environment[%d]", i), k, v)
	}
	for i, v := range j.Variables {
		field := fmt.Sprintf("job payload: variables[%d]", i)
		if v.Key == "" {
			return fmt.Errorf("%s.key: empty", field)
		}
		if strings.ContainsRune(v.Value, 0) {
			return fmt.Errorf("%s (%s).value: contains a NUL byte, which no shell can hold", field, v.Key)
		}
		all = append(all, raw{v, field})
	}

	// Expansion sees the unexpanded values, a file variable as its file's
	// path, and the last definition of each key (gitlab-runner's rules).
	last := map[string]runnerapi.Variable{}
	for _, v := range all {
		last[v.Key] = v.Variable
	}
	get := func(k string) string {
		if k == "$" { // "$$" stays a literal "$"
			return "$"
		}
		v, ok := last[k]
		if !ok {
			return ""
		}
		if v.File {
			return g.join(p.TmpDir, k)
		}
		return v.Value
	}
	g.lookup = map[string]variable{}
	seenFile := map[string]bool{}
	for _, r := range all {
		v := r.Variable
		val := v.Value
		if !v.Raw {
			val = os.Expand(val, get)
		}
		out := variable{key: v.Key, value: val}
		if v.Masked && val != "" {
			p.Secrets = append(p.Secrets, val)
		}
		if !identRE.MatchString(v.Key) {
			p.Warnings = append(p.Warnings, fmt.Sprintf("variable %q (%s) is not a valid shell variable name and is not exported", v.Key, r.field))
			continue
		}
		if v.File {
			f := File{Path: g.join(p.TmpDir, v.Key), Content: []byte(val), Mode: 0o600}
			if seenFile[v.Key] {
				for i := range p.Files {
					if p.Files[i].Path == f.Path {
						p.Files[i] = f
					}
				}
			} else {
				p.Files = append(p.Files, f)
				seenFile[v.Key] = true
			}
			out.value = f.Path
		}
		g.vars = append(g.vars, out)
		g.lookup[v.Key] = variable{key: v.Key, value: val}
	}
	p.Secrets = append(p.Secrets, j.Token)
	return g.gitSettings()
}

// value returns the expanded value of a variable (a file variable's content).
func (g *generator) value(k string) string { return g.lookup[k].value }

// attempts reads a *_ATTEMPTS variable: 1 when unset or not a number, and
// clamped to 1..10 as gitlab-runner does.
func (g *generator) attempts(key string) int {
	s := g.value(key)
	if s == "" {
		return 1
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		g.warnf("variable %s %q: want a number from 1 to 10; using 1", key, s)
		return 1
	}
	if c := max(1, min(10, n)); c != n {
		g.warnf("variable %s %q: want a number from 1 to 10; using %d", key, s, c)
		return c
	}
	return n
}
