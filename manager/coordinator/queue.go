package coordinator

import (
	"fmt"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// ApplyResult lists what Apply created or reused.
type ApplyResult struct {
	Groups    []GroupRecord    `json:"groups"`
	Projects  []ProjectRecord  `json:"projects"`
	Pipelines []PipelineRecord `json:"pipelines"`
}

// ApplyFile loads a pipeline file and applies it (see PipelineFile).
func (s *Server) ApplyFile(path string) (ApplyResult, error) {
	f, err := LoadPipelineFile(path)
	if err != nil {
		return ApplyResult{}, err
	}
	return s.apply(f, path)
}

// Apply creates the groups and projects of f that do not exist yet and
// enqueues its pipelines. It checks everything first: on error nothing changes.
func (s *Server) Apply(f *PipelineFile) (ApplyResult, error) {
	if err := f.Validate("pipeline"); err != nil {
		return ApplyResult{}, err
	}
	return s.apply(f, "pipeline")
}

func (s *Server) apply(f *PipelineFile, source string) (ApplyResult, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.checkApply(f, source); err != nil {
		return ApplyResult{}, err
	}
	var res ApplyResult
	for _, gs := range f.Groups {
		res.Groups = append(res.Groups, s.ensureGroup(gs).record())
	}
	for _, ps := range f.Projects {
		p := s.ensureProject(ps)
		for _, pls := range ps.Pipelines {
			res.Pipelines = append(res.Pipelines, s.createPipeline(p, pls).record())
		}
		res.Projects = append(res.Projects, p.record())
	}
	return res, nil
}

// checkApply verifies, under s.mu, that f fits the existing model.
func (s *Server) checkApply(f *PipelineFile, source string) error {
	groups := map[string]bool{}
	tokens := map[string]string{} // new token -> field
	claim := func(tok, field string, owner any) error {
		if tok == "" {
			return nil
		}
		if tok == s.cfg.RegistrationToken {
			return &FieldError{Source: source, Field: field, Msg: "is the instance registration token"}
		}
		if o, ok := s.regTokens[tok]; ok && o != owner {
			return &FieldError{Source: source, Field: field, Msg: "is already used by another group or project"}
		}
		if prev, ok := tokens[tok]; ok {
			return &FieldError{Source: source, Field: field, Msg: "is also used by " + prev}
		}
		tokens[tok] = field
		return nil
	}
	for i, gs := range f.Groups {
		field := fmt.Sprintf("groups[%d]", i)
		if parent := path.Dir(gs.Path); parent != "." && !groups[parent] && s.groupsByPath[parent] == nil {
			return &FieldError{Source: source, Field: field + ".path", Msg: fmt.Sprintf("parent group %q is not defined before it", parent)}
		}
		g := s.groupsByPath[gs.Path]
		if g != nil && gs.RegistrationToken != "" && gs.RegistrationToken != g.regToken {
			return &FieldError{Source: source, Field: field + ".registration_token", Msg: fmt.Sprintf("group %s exists with another token", gs.Path)}
		}
		if err := claim(gs.RegistrationToken, field+".registration_token", g); err != nil {
			return err
		}
		groups[gs.Path] = true
	}
	for i, ps := range f.Projects {
		field := fmt.Sprintf("projects[%d]", i)
		if ps.Group != "" && !groups[ps.Group] && s.groupsByPath[ps.Group] == nil {
			return &FieldError{Source: source, Field: field + ".group", Msg: fmt.Sprintf("group %q does not exist", ps.Group)}
		}
		full := "root/" + ps.Name
		if ps.Group != "" {
			full = ps.Group + "/" + ps.Name
		}
		p := s.projectsByPath[full]
		if p != nil && ps.RegistrationToken != "" && ps.RegistrationToken != p.regToken {
			return &FieldError{Source: source, Field: field + ".registration_token", Msg: fmt.Sprintf("project %s exists with another token", full)}
		}
		if err := claim(ps.RegistrationToken, field+".registration_token", p); err != nil {
			return err
		}
	}
	return nil
}

func (s *Server) ensureGroup(gs GroupSpec) *group {
	if g := s.groupsByPath[gs.Path]; g != nil {
		return g
	}
	g := &group{id: s.id("group"), path: gs.Path, name: gs.Name, regToken: gs.RegistrationToken}
	if g.name == "" {
		g.name = path.Base(gs.Path)
	}
	if g.regToken == "" {
		g.regToken = newToken()
	}
	if parent := path.Dir(gs.Path); parent != "." {
		g.parent = s.groupsByPath[parent]
	}
	s.groups[g.id] = g
	s.groupsByPath[g.path] = g
	s.regTokens[g.regToken] = g
	s.log.Info("group created", "group_id", g.id, "path", g.path)
	return g
}

func (s *Server) ensureProject(ps ProjectSpec) *project {
	var g *group
	if ps.Group != "" {
		g = s.groupsByPath[ps.Group]
	}
	p := &project{name: ps.Name, group: g}
	if existing := s.projectsByPath[p.fullPath()]; existing != nil {
		if ps.SharedRunners != nil && *ps.SharedRunners != existing.sharedRunners {
			existing.sharedRunners = *ps.SharedRunners
			s.bumpQueue()
		}
		return existing
	}
	p.id = s.id("project")
	p.regToken = ps.RegistrationToken
	if p.regToken == "" {
		p.regToken = newToken()
	}
	p.sharedRunners = ps.SharedRunners == nil || *ps.SharedRunners
	s.projects[p.id] = p
	s.projectsByPath[p.fullPath()] = p
	s.regTokens[p.regToken] = p
	s.log.Info("project created", "project_id", p.id, "path", p.fullPath())
	return p
}

// CreateGroup creates a group (or returns the existing one with that path).
func (s *Server) CreateGroup(gs GroupSpec) (GroupRecord, error) {
	res, err := s.Apply(&PipelineFile{Groups: []GroupSpec{gs}})
	if err != nil {
		return GroupRecord{}, err
	}
	return res.Groups[0], nil
}

// CreateProject creates a project (or reuses the existing one with that path)
// and enqueues the pipelines listed in ps.
func (s *Server) CreateProject(ps ProjectSpec) (ProjectRecord, error) {
	res, err := s.Apply(&PipelineFile{Projects: []ProjectSpec{ps}})
	if err != nil {
		return ProjectRecord{}, err
	}
	return res.Projects[0], nil
}

// EnqueuePipeline creates a pipeline in project projectID and queues its first stage.
func (s *Server) EnqueuePipeline(projectID int64, spec PipelineSpec) (PipelineRecord, error) {
	if err := spec.validate("request", "pipeline"); err != nil {
		return PipelineRecord{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.projects[projectID]
	if p == nil {
		return PipelineRecord{}, notFound("project", projectID)
	}
	return s.createPipeline(p, spec).record(), nil
}

// createPipeline builds a validated pipeline under s.mu and queues its first stage.
func (s *Server) createPipeline(p *project, spec PipelineSpec) *pipeline {
	now := s.now()
	p.pipelines++
	pl := &pipeline{
		id:        s.id("pipeline"),
		iid:       p.pipelines,
		project:   p,
		ref:       cmpOr(spec.Ref, "main"),
		refType:   cmpOr(spec.RefType, "branch"),
		sha:       spec.Sha,
		beforeSha: cmpOr(spec.BeforeSha, strings.Repeat("0", 40)),
		protected: spec.Protected,
		createdAt: now,
	}
	if pl.sha == "" {
		pl.sha = fakeSha(p.fullPath(), pl.ref, strconv.FormatInt(pl.id, 10))
	}
	stages := spec.Stages
	if len(stages) == 0 {
		stages = defaultStages
	}
	byStage := make([][]*job, len(stages))
	for _, js := range spec.Jobs {
		j := s.newJob(pl, spec, js, now)
		idx := slices.Index(stages, j.stage)
		byStage[idx] = append(byStage[idx], j)
		pl.jobs = append(pl.jobs, j)
	}
	for _, st := range byStage {
		if len(st) > 0 {
			pl.stages = append(pl.stages, st)
		}
	}
	s.pipelines[pl.id] = pl
	s.log.Info("pipeline created", "pipeline_id", pl.id, "project_id", p.id, "jobs", len(pl.jobs))
	s.advance(pl)
	s.notifyState()
	return pl
}

func cmpOr(v, def string) string {
	if v == "" {
		return def
	}
	return v
}

func (s *Server) newJob(pl *pipeline, spec PipelineSpec, js JobSpec, now time.Time) *job {
	timeout := int(time.Duration(js.Timeout) / time.Second)
	if timeout <= 0 {
		timeout = int(s.cfg.DefaultJobTimeout / time.Second)
	}
	j := &job{
		id:           s.id("job"),
		pipeline:     pl,
		name:         js.Name,
		stage:        cmpOr(js.Stage, "test"),
		tags:         normTags(js.Tags),
		timeout:      timeout,
		allowFailure: js.AllowFailure,
		token:        newToken(),
		status:       StatusCreated,
		createdAt:    now,
	}
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
	s.jobs[j.id] = j
	s.jobOrder = append(s.jobOrder, j)
	return j
}

// advance moves pipeline pl forward under s.mu: the first unfinished stage's
// created jobs become pending; after a failed stage the rest is skipped.
func (s *Server) advance(pl *pipeline) {
	for _, st := range pl.stages {
		done, blocked := true, false
		for _, j := range st {
			switch j.status {
			case StatusCreated:
				s.makePending(j)
				done = false
			case StatusPending, StatusRunning, StatusCanceling:
				done = false
			case StatusFailed:
				blocked = blocked || !j.allowFailure
			case StatusCanceled, StatusSkipped:
				blocked = true
			}
		}
		if !done {
			return
		}
		if blocked {
			for _, j := range pl.jobs {
				if j.status == StatusCreated {
					j.status = StatusSkipped
					j.finishedAt = s.now()
				}
			}
			return
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

// finish puts j into a final status under s.mu and advances its pipeline.
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
	s.advance(j.pipeline)
	s.notifyState()
}

// pickJob chooses the job runner r gets next, under s.mu. Instance runners
// use GitLab's fair-usage queue: among the jobs r can run, the project with
// the fewest jobs running on instance runners first, then the lowest job id.
// Group and project runners take the lowest job id (FIFO).
func (s *Server) pickJob(r *runner) *job {
	var best *job
	bestRunning := 0
	fair := r.typ == InstanceRunner
	consider := func(p *project) {
		if len(p.pending) == 0 || (best != nil && fair && p.runningShared > bestRunning) {
			return
		}
		if best != nil && p.pending[0].id > best.id && (!fair || p.runningShared == bestRunning) {
			return // cannot beat best
		}
		if !p.runnable(r) {
			return
		}
		for _, j := range p.pending {
			if best != nil && j.id > best.id && (!fair || p.runningShared == bestRunning) {
				return // cannot beat best
			}
			if !r.canRun(j) {
				continue
			}
			if best == nil || (fair && p.runningShared < bestRunning) || j.id < best.id {
				best, bestRunning = j, p.runningShared
			}
			return
		}
	}
	switch r.typ {
	case InstanceRunner:
		for _, p := range s.pendingProjects {
			if p.sharedRunners {
				consider(p)
			}
		}
	case GroupRunner:
		for _, p := range s.pendingProjects {
			if p.group.within(r.group) {
				consider(p)
			}
		}
	case ProjectRunner:
		for _, p := range r.projects {
			consider(p)
		}
	}
	return best
}

// assign marks j running on r under s.mu: from here on it is never handed out again.
func (s *Server) assign(j *job, r *runner) {
	p := j.pipeline.project
	p.removePending(j)
	if len(p.pending) == 0 {
		delete(s.pendingProjects, p.id)
	}
	now := s.now()
	j.status = StatusRunning
	j.runner = r
	j.startedAt = now
	j.lastSeenAt = now
	j.runnerTimeout = j.timeout
	if r.maximumTimeout > 0 && r.maximumTimeout < j.runnerTimeout {
		j.runnerTimeout = r.maximumTimeout
	}
	if r.typ == InstanceRunner {
		j.onShared = true
		p.runningShared++
	}
	s.notifyState()
}

// failureReasons are the reasons the coordinator accepts in a job update and
// lists in features.failure_reasons (job_canceled is deliberately absent, as
// in GitLab, so runners map it to unknown_failure).
var failureReasons = []string{
	runnerapi.FailureUnknownFailure,
	runnerapi.FailureScriptFailure,
	"api_failure",
	runnerapi.FailureStuckOrTimeout,
	runnerapi.FailureRunnerSystemFailure,
	"missing_dependency_failure",
	runnerapi.FailureRunnerUnsupported,
	runnerapi.FailureJobExecutionTimeout,
	runnerapi.FailureArchivedFailure,
	runnerapi.FailureUnmetPrerequisites,
	runnerapi.FailureSchedulerFailure,
	runnerapi.FailureDataIntegrityFailure,
	"trace_size_exceeded",
}

// payload builds the job JSON for j assigned to r, under s.mu.
func (s *Server) payload(j *job, r *runner, base string) *runnerapi.JobResponse {
	pl, p := j.pipeline, j.pipeline.project
	id := strconv.FormatInt(j.id, 10)
	scheme, hostport, _ := strings.Cut(base, "://")
	host, rest, _ := strings.Cut(hostport, "/")
	prefix := ""
	if rest != "" {
		prefix = "/" + rest
	}
	projectURL := base + "/" + p.fullPath()
	repoURL := fmt.Sprintf("%s://gitlab-ci-token:%s@%s%s/%s.git", scheme, j.token, host, prefix, p.fullPath())
	hostname, port := host, ""
	if i := strings.LastIndex(host, ":"); i >= 0 && !strings.HasSuffix(host, "]") {
		hostname, port = host[:i], host[i+1:]
	}
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[scheme]
	}
	pub := func(k, v string) runnerapi.Variable { return runnerapi.Variable{Key: k, Value: v, Public: true} }
	vars := []runnerapi.Variable{
		pub("CI", "true"),
		pub("GITLAB_CI", "true"),
		pub("CI_SERVER", "yes"),
		pub("CI_SERVER_NAME", "GitLab"),
		pub("CI_SERVER_URL", base),
		pub("CI_SERVER_HOST", hostname),
		pub("CI_SERVER_PORT", port),
		pub("CI_SERVER_PROTOCOL", scheme),
		pub("CI_API_V4_URL", base+"/api/v4"),
		pub("CI_JOB_ID", id),
		pub("CI_JOB_NAME", j.name),
		pub("CI_JOB_STAGE", j.stage),
		pub("CI_JOB_URL", projectURL+"/-/jobs/"+id),
		{Key: "CI_JOB_TOKEN", Value: j.token, Masked: true},
		pub("CI_JOB_TIMEOUT", strconv.Itoa(j.runnerTimeout)),
		pub("CI_PIPELINE_ID", strconv.FormatInt(pl.id, 10)),
		pub("CI_PIPELINE_IID", strconv.Itoa(pl.iid)),
		pub("CI_PIPELINE_SOURCE", "push"),
		pub("CI_PIPELINE_URL", projectURL+"/-/pipelines/"+strconv.FormatInt(pl.id, 10)),
		pub("CI_PROJECT_ID", strconv.FormatInt(p.id, 10)),
		pub("CI_PROJECT_NAME", p.name),
		pub("CI_PROJECT_PATH", p.fullPath()),
		pub("CI_PROJECT_NAMESPACE", p.namespace()),
		pub("CI_PROJECT_URL", projectURL),
		pub("CI_DEFAULT_BRANCH", "main"),
		pub("CI_COMMIT_SHA", pl.sha),
		pub("CI_COMMIT_SHORT_SHA", pl.sha[:8]),
		pub("CI_COMMIT_BEFORE_SHA", pl.beforeSha),
		pub("CI_COMMIT_REF_NAME", pl.ref),
		pub("CI_COMMIT_REF_SLUG", slug(pl.ref)),
		pub("CI_COMMIT_REF_PROTECTED", strconv.FormatBool(pl.protected)),
	}
	refspecs := []string{fmt.Sprintf("+refs/pipelines/%d:refs/pipelines/%d", pl.id, pl.id)}
	if pl.refType == "tag" {
		vars = append(vars, pub("CI_COMMIT_TAG", pl.ref))
		refspecs = append(refspecs, fmt.Sprintf("+refs/tags/%s:refs/tags/%s", pl.ref, pl.ref))
	} else {
		vars = append(vars, pub("CI_COMMIT_BRANCH", pl.ref))
		refspecs = append(refspecs, fmt.Sprintf("+refs/heads/%s:refs/remotes/origin/%s", pl.ref, pl.ref))
	}
	vars = append(vars,
		runnerapi.Variable{Key: "CI_REPOSITORY_URL", Value: repoURL},
		pub("CI_RUNNER_ID", strconv.FormatInt(r.id, 10)),
		pub("CI_RUNNER_DESCRIPTION", r.description),
		pub("CI_RUNNER_TAGS", tagsJSON(r.tags)),
	)
	vars = append(vars, j.variables...)
	depth := 20
	for _, v := range j.variables {
		if v.Key == "GIT_DEPTH" {
			if n, err := strconv.Atoi(v.Value); err == nil && n >= 0 {
				depth = n
			}
		}
	}
	info := runnerapi.JobInfo{
		ID:                 j.id,
		Name:               j.name,
		Stage:              j.stage,
		ProjectID:          p.id,
		ProjectName:        p.name,
		TimeInQueueSeconds: j.startedAt.Sub(j.queuedAt).Seconds(),
	}
	if r.typ == InstanceRunner {
		// Newer GitLab reports the fair-usage input it used: jobs of the project
		// already running on instance runners, before this one.
		info.ProjectJobsRunningOnInstanceRunnersCount = strconv.Itoa(p.runningShared - 1)
	}
	return &runnerapi.JobResponse{
		ID:            j.id,
		Token:         j.token,
		AllowGitFetch: true,
		JobInfo:       info,
		GitInfo: runnerapi.GitInfo{
			RepoURL:   repoURL,
			Ref:       pl.ref,
			Sha:       pl.sha,
			BeforeSha: pl.beforeSha,
			RefType:   pl.refType,
			Refspecs:  refspecs,
			Depth:     depth,
		},
		RunnerInfo:   runnerapi.RunnerInfo{Timeout: j.runnerTimeout},
		Variables:    vars,
		Steps:        slices.Clone(j.steps),
		Image:        nil,
		Services:     []runnerapi.Image{},
		Artifacts:    []runnerapi.Artifact{},
		Cache:        []runnerapi.Cache{},
		Credentials:  []runnerapi.Credentials{},
		Dependencies: []runnerapi.Dependency{},
		Features:     runnerapi.GitlabFeatures{TraceSections: true, FailureReasons: slices.Clone(failureReasons)},
	}
}

// slug is CI_COMMIT_REF_SLUG: lowercase, [^a-z0-9] → '-', at most 63 bytes, no '-' at the ends.
func slug(ref string) string {
	b := []byte(strings.ToLower(ref))
	for i, c := range b {
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') {
			b[i] = '-'
		}
	}
	if len(b) > 63 {
		b = b[:63]
	}
	return strings.Trim(string(b), "-")
}

func tagsJSON(tags []string) string {
	q := make([]string, len(tags))
	for i, t := range tags {
		q[i] = strconv.Quote(t)
	}
	return "[" + strings.Join(q, ", ") + "]"
}
