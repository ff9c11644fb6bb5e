package coordinator

import (
	"fmt"
	"path"
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
			res.Pipelines = append(res.Pipelines, s.createPipeline(p, pls, nil).record())
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
	return s.createPipeline(p, spec, nil).record(), nil
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
	j.touchedAt = now
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
