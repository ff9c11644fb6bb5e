package coordinator

import (
	"cmp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/manager/coordinator/gitlabci"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// pipelineExtra is what a pipeline made from a repository knows beyond its spec.
type pipelineExtra struct {
	id       int64 // allocated beforehand (its persistent ref exists); 0: allocate
	name     string
	commit   commitInfo
	warnings []string
	readable []string
	// cacheDigest computes cache:key:files digests at the pipeline's commit.
	cacheDigest func(files []string) (string, bool)
}

// createPipeline builds a validated pipeline under s.mu and queues the jobs
// that can start.
func (s *Server) createPipeline(p *project, spec PipelineSpec, extra *pipelineExtra) *pipeline {
	now := s.now()
	p.pipelines++
	if extra == nil {
		extra = &pipelineExtra{}
	}
	if extra.id == 0 {
		extra.id = s.id("pipeline")
	}
	pl := &pipeline{
		id:        extra.id,
		iid:       p.pipelines,
		project:   p,
		ref:       cmp.Or(spec.Ref, "main"),
		refType:   cmp.Or(spec.RefType, "branch"),
		sha:       spec.Sha,
		beforeSha: cmp.Or(spec.BeforeSha, strings.Repeat("0", 40)),
		protected: spec.Protected,
		source:    cmp.Or(spec.Source, "push"),
		stages:    spec.Stages,
		createdAt: now,
		readable:  []string{p.fullPath()},
	}
	if len(pl.stages) == 0 {
		pl.stages = defaultStages
	}
	if pl.sha == "" {
		pl.sha = fakeSha(p.fullPath(), pl.ref, strconv.FormatInt(pl.id, 10))
	}
	pl.name, pl.commit, pl.warnings = extra.name, extra.commit, extra.warnings
	pl.readable = append(pl.readable, extra.readable...)
	if pl.commit.title == "" {
		pl.commit = commitInfo{title: "Pipeline " + strconv.FormatInt(pl.id, 10), message: "Pipeline " + strconv.FormatInt(pl.id, 10),
			authorName: "Administrator", authorEmail: "admin@example.com", timestamp: now}
	}
	for _, js := range spec.Jobs {
		j := s.newJob(pl, spec, js, now, extra.cacheDigest)
		pl.jobs = append(pl.jobs, j)
	}
	s.pipelines[pl.id] = pl
	s.log.Info("pipeline created", "pipeline_id", pl.id, "project_id", p.id, "ref", pl.ref, "source", pl.source, "jobs", len(pl.jobs))
	s.advance(pl)
	s.notifyState()
	return pl
}

func (s *Server) newJob(pl *pipeline, spec PipelineSpec, js JobSpec, now time.Time, cacheDigest func([]string) (string, bool)) *job {
	timeout := int(time.Duration(js.Timeout) / time.Second)
	if timeout <= 0 {
		timeout = int(s.cfg.DefaultJobTimeout / time.Second)
	}
	j := &job{
		id:           s.id("job"),
		pipeline:     pl,
		name:         js.Name,
		stage:        cmp.Or(js.Stage, "test"),
		tags:         normTags(js.Tags),
		timeout:      timeout,
		allowFailure: js.AllowFailure != nil && *js.AllowFailure,
		token:        newToken(),
		status:       StatusCreated,
		createdAt:    now,
		when:         cmp.Or(js.When, "on_success"),
		needs:        js.Needs,
		deps:         js.Dependencies,
		exitCodesOK:  js.AllowFailureExitCodes,
		retry:        js.Retry,
	}
	if js.AllowFailure == nil && j.when == "manual" {
		j.allowFailure = true // GitLab's default for manual jobs
	}
	j.stageIdx = slices.Index(pl.stages, j.stage)
	j.kind = kindKey(j.tags, pl.protected)
	before, after := js.BeforeScript, js.AfterScript
	if before == nil {
		before = spec.BeforeScript
	}
	if after == nil {
		after = spec.AfterScript
	}
	// GitLab joins before_script and script into one "script" step and sends
	// after_script as its own step that always runs and may fail.
	script := append(slices.Clone(before), js.Script...)
	j.steps = []runnerapi.Step{{Name: runnerapi.StepScript, Script: script, Timeout: timeout, When: runnerapi.WhenOnSuccess}}
	if len(after) > 0 {
		j.steps = append(j.steps, runnerapi.Step{Name: runnerapi.StepAfterScript, Script: slices.Clone(after), Timeout: timeout, When: runnerapi.WhenAlways, AllowFailure: true})
	}
	for _, v := range slices.Concat(spec.Variables, js.Variables) {
		j.variables = append(j.variables, runnerapi.Variable{Key: v.Key, Value: v.Value, Public: !v.Masked, Masked: v.Masked, File: v.File, Raw: v.Raw})
	}
	if js.GitStrategy != "" {
		j.variables = append(j.variables, runnerapi.Variable{Key: "GIT_STRATEGY", Value: js.GitStrategy, Public: true})
	}
	j.image = payloadImage(js.Image, false)
	for i := range js.Services {
		j.services = append(j.services, *payloadImage(&js.Services[i], true))
	}
	j.artifacts = payloadArtifacts(js.Artifacts)
	j.caches = payloadCaches(js.Cache, pl.protected, cacheDigest)
	if len(js.PreGetSourcesScript) > 0 {
		j.hooks = []runnerapi.Hook{{Name: runnerapi.HookPreGetSourcesScript, Script: slices.Clone(js.PreGetSourcesScript)}}
	}
	s.addJob(j)
	return j
}

// addJob indexes a new job under s.mu.
func (s *Server) addJob(j *job) {
	s.jobs[j.id] = j
	s.jobsByToken[j.token] = j
	s.jobOrder = append(s.jobOrder, j)
}

// depState is what a job's dependencies (the earlier stages, or its needs)
// add up to, as GitLab's composite status.
type depState int

const (
	depsWaiting depState = iota // some are not final yet
	depsSuccess                 // all succeeded, failed with allow_failure, or were skipped
	depsFailed                  // one failed without allow_failure
	depsCanceled
	depsBlocked // a manual job that may not fail is in the way
)

// depState computes j's dependency state under s.mu.
func (pl *pipeline) depState(j *job) depState {
	var deps []*job
	if j.needs != nil {
		for _, n := range *j.needs {
			if d := pl.latest(n.Job); d != nil {
				deps = append(deps, d)
			}
		}
	} else {
		for _, d := range pl.jobs {
			if d.stageIdx < j.stageIdx && !d.retried {
				deps = append(deps, d)
			}
		}
	}
	failed, canceled, blocked := false, false, false
	for _, d := range deps {
		switch d.status {
		case StatusCreated, StatusPending, StatusRunning, StatusCanceling:
			return depsWaiting
		case StatusFailed:
			failed = failed || !d.failureAllowed()
		case StatusCanceled:
			canceled = true
		case StatusManual:
			blocked = blocked || !d.allowFailure
		}
	}
	switch {
	case failed:
		return depsFailed
	case canceled:
		return depsCanceled
	case blocked:
		return depsBlocked
	}
	return depsSuccess
}

// advance moves pipeline pl forward under s.mu: every created job whose
// dependencies are final becomes pending, manual or skipped by its when:.
// Skipping a job may decide others, so it repeats until nothing changes.
func (s *Server) advance(pl *pipeline) {
	for changed := true; changed; {
		changed = false
		for _, j := range pl.jobs {
			if j.status != StatusCreated {
				continue
			}
			st := pl.depState(j)
			if st == depsWaiting {
				continue
			}
			switch {
			case j.when == "always" && st != depsBlocked,
				j.when == "on_success" && st == depsSuccess,
				j.when == "on_failure" && st == depsFailed:
				s.makePending(j)
			case j.when == "manual" && st == depsSuccess:
				j.status = StatusManual
				j.finishedAt = s.now()
				changed = true
			default:
				j.status = StatusSkipped
				j.finishedAt = s.now()
				changed = true
			}
		}
	}
}

func (s *Server) makePending(j *job) {
	j.status = StatusPending
	j.queuedAt = s.now()
	p := j.pipeline.project
	p.addPending(j)
	s.pendingProjects[p.id] = p
	s.bumpQueue()
}

// finish puts j into a final status under s.mu, retries it if its retry:
// says so, and advances its pipeline.
func (s *Server) finish(j *job, status string) {
	if j.status == StatusPending {
		p := j.pipeline.project
		p.removePending(j)
		if len(p.pending) == 0 {
			delete(s.pendingProjects, p.id)
		}
	}
	if j.onShared {
		j.pipeline.project.runningShared--
		j.onShared = false
	}
	j.status = status
	j.finishedAt = s.now()
	if status == StatusFailed && j.shouldRetry() {
		s.retryJob(j)
	}
	s.advance(j.pipeline)
	s.notifyState()
}

// shouldRetry reports whether a failed job has retries left that match its
// failure reason and exit code (retry:when, retry:exit_codes).
func (j *job) shouldRetry() bool {
	if j.attempt >= j.retry.Max {
		return false
	}
	if len(j.retry.When) > 0 && !slices.Contains(j.retry.When, "always") && !slices.Contains(j.retry.When, j.failureReason) {
		return false
	}
	if len(j.retry.ExitCodes) > 0 && !slices.Contains(j.retry.ExitCodes, j.exitCode) {
		return false
	}
	return true
}

// retryJob makes a new pending job from failed job j, as GitLab's retry does.
func (s *Server) retryJob(j *job) {
	now := s.now()
	c := &job{
		id: s.id("job"), pipeline: j.pipeline, name: j.name, stage: j.stage, tags: j.tags, kind: j.kind,
		timeout: j.timeout, allowFailure: j.allowFailure, steps: j.steps, variables: j.variables,
		token: newToken(), status: StatusCreated, createdAt: now,
		stageIdx: j.stageIdx, when: j.when, needs: j.needs, deps: j.deps, exitCodesOK: j.exitCodesOK,
		retry: j.retry, attempt: j.attempt + 1, retryOf: j.id,
		image: j.image, services: j.services, artifacts: j.artifacts, caches: j.caches, hooks: j.hooks,
	}
	j.retried = true
	j.pipeline.jobs = append(j.pipeline.jobs, c)
	s.addJob(c)
	s.log.Info("job retried", "job_id", j.id, "retry_job_id", c.id, "attempt", c.attempt, "failure_reason", j.failureReason)
	s.makePending(c)
}

// dependencyJobs are the jobs whose artifacts j downloads: dependencies:
// when given, else its needs with artifacts, else every job of the earlier
// stages; only jobs that ran.
func (pl *pipeline) dependencyJobs(j *job) []*job {
	var names []string
	switch {
	case j.deps != nil:
		names = *j.deps
	case j.needs != nil:
		for _, n := range *j.needs {
			if !n.NoArtifacts {
				names = append(names, n.Job)
			}
		}
	default:
		for _, d := range pl.jobs {
			if d.stageIdx < j.stageIdx && !d.retried {
				names = append(names, d.name)
			}
		}
	}
	var out []*job
	for _, n := range names {
		if d := pl.latest(n); d != nil && !d.startedAt.IsZero() && !slices.Contains(out, d) {
			out = append(out, d)
		}
	}
	return out
}

// payloadImage turns a job's image: or one of its services: into the payload shape.
func payloadImage(img *gitlabci.Image, service bool) *runnerapi.Image {
	if img == nil {
		return nil
	}
	out := &runnerapi.Image{Name: img.Name, Entrypoint: slices.Clone(img.Entrypoint), PullPolicy: slices.Clone(img.PullPolicy)}
	if service {
		out.Alias, out.Command = img.Alias, slices.Clone(img.Command)
		for _, v := range img.Variables {
			out.Variables = append(out.Variables, runnerapi.Variable{Key: v.Key, Value: v.Value})
		}
	}
	return out
}

// reportFormats are GitLab's artifact formats and default file names of report types.
var reportFormats = map[string][2]string{
	"junit": {"gzip", "junit.xml"}, "dotenv": {"gzip", ".env"}, "cobertura": {"gzip", "cobertura-coverage.xml"},
	"jacoco": {"gzip", "jacoco-coverage.xml"}, "metrics": {"gzip", "metrics.txt"}, "lsif": {"zip", "lsif.json"},
	"scip": {"zip", "index.scip"}, "cyclonedx": {"gzip", "gl-sbom.cdx.json"}, "annotations": {"gzip", "gl-annotations.json"},
	"repository_xray": {"gzip", "gl-repository-xray.json"}, "sast": {"raw", "gl-sast-report.json"},
	"secret_detection": {"raw", "gl-secret-detection-report.json"}, "dependency_scanning": {"raw", "gl-dependency-scanning-report.json"},
	"container_scanning": {"raw", "gl-container-scanning-report.json"}, "cluster_image_scanning": {"raw", "gl-cluster-image-scanning-report.json"},
	"dast": {"raw", "gl-dast-report.json"}, "license_scanning": {"raw", "gl-license-scanning-report.json"},
	"accessibility": {"raw", "gl-accessibility.json"}, "codequality": {"raw", "gl-code-quality-report.json"},
	"performance": {"raw", "performance.json"}, "browser_performance": {"raw", "browser-performance.json"},
	"load_performance": {"raw", "load-performance.json"}, "terraform": {"raw", "tfplan.json"},
	"requirements": {"raw", "requirements.json"}, "requirements_v2": {"raw", "requirements_v2.json"},
	"coverage_fuzzing": {"raw", "gl-coverage-fuzzing.json"}, "api_fuzzing": {"raw", "gl-api-fuzzing-report.json"},
	"sarif": {"raw", "gl-sarif-report.sarif"},
}

// payloadArtifacts is GitLab's artifacts list: the archive (when paths or
// untracked are given) and one entry per report, sent when: always.
func payloadArtifacts(a *gitlabci.Artifacts) []runnerapi.Artifact {
	out := []runnerapi.Artifact{}
	if a == nil {
		return out
	}
	if len(a.Paths) > 0 || a.Untracked {
		out = append(out, runnerapi.Artifact{Name: a.Name, Untracked: a.Untracked, Paths: slices.Clone(a.Paths), Exclude: slices.Clone(a.Exclude),
			When: a.When, Type: "archive", Format: "zip", ExpireIn: a.ExpireIn})
	}
	for _, r := range a.Reports {
		f, ok := reportFormats[r.Type]
		if !ok {
			f = [2]string{"raw", ""}
		}
		out = append(out, runnerapi.Artifact{Name: f[1], Paths: slices.Clone(r.Paths), When: "always", Type: r.Type, Format: f[0], ExpireIn: a.ExpireIn})
	}
	return out
}

// payloadCaches fills GitLab's cache defaults (key default, policy
// pull-push, when on_success), computes key:files digests, and suffixes
// keys -protected or -non_protected as GitLab does since 15.0.
func payloadCaches(cs []gitlabci.Cache, protected bool, digest func([]string) (string, bool)) []runnerapi.Cache {
	out := []runnerapi.Cache{}
	for _, c := range cs {
		key := c.Key
		if key == "" {
			d, ok := "", false
			if len(c.KeyFiles) > 0 && digest != nil {
				d, ok = digest(c.KeyFiles)
			}
			if !ok {
				d = "default"
			}
			key = d
			if c.KeyPrefix != "" {
				key = c.KeyPrefix + "-" + d
			}
		}
		suffix := "non_protected"
		if protected && !c.Unprotect {
			suffix = "protected"
		}
		out = append(out, runnerapi.Cache{
			Key: key + "-" + suffix, Untracked: c.Untracked, Policy: cmp.Or(c.Policy, "pull-push"),
			Paths: append([]string{}, c.Paths...), When: cmp.Or(c.When, "on_success"), FallbackKeys: append([]string{}, c.FallbackKeys...),
		})
	}
	return out
}

// Pipeline returns a snapshot of pipeline id.
func (s *Server) Pipeline(id int64) (PipelineRecord, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	pl := s.pipelines[id]
	if pl == nil {
		return PipelineRecord{}, notFound("pipeline", id)
	}
	return pl.record(), nil
}
