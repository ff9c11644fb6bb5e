package coordinator

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/manager/coordinator/gitlabci"
	"github.com/mayfly-ci/mayfly/manager/coordinator/gitrepo"
)

// ProjectSource is a directory served as a project with a repository
// (mayfly coordinator --project).
type ProjectSource struct {
	Dir string
	// Path is "namespace/name"; empty: "root/" and the directory's base name.
	Path string
}

// ProjectResult is what AddProjects made of one source.
type ProjectResult struct {
	Project ProjectRecord
	// RepoURL is the project's git URL as jobs see it (empty without ExternalURL).
	RepoURL  string
	Branch   string
	Commit   string
	Dirty    bool            // the source work tree had uncommitted changes, not served
	Pipeline *PipelineRecord // nil when rules create no pipeline
	// NoPipeline says why no pipeline was created (workflow or job rules).
	NoPipeline string
}

// ciConfigFile is where GitLab reads a project's pipeline configuration.
const ciConfigFile = ".gitlab-ci.yml"

// AddProjects serves directories as projects with repositories (git over
// HTTP at <external URL>/<path>.git) and creates a pipeline for each from
// the .gitlab-ci.yml of its default branch, as a push would. Projects are
// imported in an order that lets a plain directory name another as a
// submodule. A configuration error stops it and names file, line and key.
func (s *Server) AddProjects(ctx context.Context, srcs []ProjectSource) ([]ProjectResult, error) {
	if err := s.ensureRepos(); err != nil {
		return nil, err
	}
	sources := make([]gitrepo.Source, len(srcs))
	for i, src := range srcs {
		p := src.Path
		if p == "" {
			abs, err := filepath.Abs(src.Dir)
			if err != nil {
				return nil, fmt.Errorf("project %s: %w", src.Dir, err)
			}
			p = "root/" + filepath.Base(abs)
		}
		sources[i] = gitrepo.Source{Path: p, Dir: src.Dir}
	}
	repos, err := s.repos.ImportAll(ctx, sources)
	if err != nil {
		return nil, err
	}
	out := make([]ProjectResult, len(repos))
	for i, r := range repos {
		ns, name := filepathSplit(r.Path)
		ps := ProjectSpec{Name: name, Group: ns}
		if ns == "root" {
			ps.Group = ""
		}
		rec, err := s.createRepoProject(ps, r)
		if err != nil {
			return nil, err
		}
		out[i] = ProjectResult{Project: rec, Branch: r.DefaultBranch, Commit: r.Head, Dirty: r.Dirty}
		if s.cfg.ExternalURL != "" {
			out[i].RepoURL = s.cfg.ExternalURL + "/" + r.Path + ".git"
		}
	}
	for i := range out {
		pl, err := s.CreateRepoPipeline(ctx, out[i].Project.ID, "", "push")
		var np *gitlabci.NoPipelineError
		switch {
		case errors.As(err, &np):
			out[i].NoPipeline = np.Reason
		case err != nil:
			return out, err
		default:
			out[i].Pipeline = &pl
		}
	}
	return out, nil
}

func filepathSplit(p string) (ns, name string) {
	i := strings.LastIndex(p, "/")
	return p[:i], p[i+1:]
}

func (s *Server) ensureRepos() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.repos != nil {
		return nil
	}
	if s.cfg.StateDir == "" {
		return &FieldError{Source: "config", Field: "StateDir", Msg: "is needed to serve repositories"}
	}
	store, err := gitrepo.NewStore(filepath.Join(s.cfg.StateDir, "repositories"))
	if err != nil {
		return err
	}
	s.repos = store
	s.gitHandler = store.Handler(s.authorizeGit, s.log)
	return nil
}

// createRepoProject creates the project (its groups too) and attaches its repository.
func (s *Server) createRepoProject(ps ProjectSpec, r *gitrepo.Repo) (ProjectRecord, error) {
	f := &PipelineFile{Projects: []ProjectSpec{ps}}
	if ps.Group != "" {
		parts := strings.Split(ps.Group, "/")
		for i := range parts {
			f.Groups = append(f.Groups, GroupSpec{Path: strings.Join(parts[:i+1], "/")})
		}
	}
	res, err := s.Apply(f)
	if err != nil {
		return ProjectRecord{}, err
	}
	rec := res.Projects[0]
	s.mu.Lock()
	s.projects[rec.ID].repo = r
	s.mu.Unlock()
	return rec, nil
}

// CreateRepoPipeline creates a pipeline of a project with a repository
// from its .gitlab-ci.yml at ref (a branch or tag; empty: the default
// branch). source is CI_PIPELINE_SOURCE; any source but push first brings
// the repository up to date with its directory, as a new push would.
// Errors: *gitlabci.Error for a bad configuration, *gitlabci.NoPipelineError
// when rules leave no job.
func (s *Server) CreateRepoPipeline(ctx context.Context, projectID int64, ref, source string) (PipelineRecord, error) {
	s.mu.Lock()
	p := s.projects[projectID]
	var repo *gitrepo.Repo
	if p != nil {
		repo = p.repo
	}
	s.mu.Unlock()
	switch {
	case p == nil:
		return PipelineRecord{}, notFound("project", projectID)
	case repo == nil:
		return PipelineRecord{}, &FieldError{Field: "project", Msg: fmt.Sprintf("project %d has no repository (it was not made with --project)", projectID)}
	}
	beforeSha := strings.Repeat("0", 40)
	if source != "push" {
		fresh, before, err := s.repos.Refresh(ctx, repo.Path)
		if err != nil {
			return PipelineRecord{}, err
		}
		s.mu.Lock()
		p.repo = fresh
		s.mu.Unlock()
		repo, beforeSha = fresh, before
	}
	ref = cmp.Or(ref, repo.DefaultBranch)
	sha, refType, err := repo.ResolveRef(ctx, ref)
	if err != nil {
		return PipelineRecord{}, &FieldError{Field: "ref", Msg: err.Error()}
	}
	commit, err := repo.Commit(ctx, sha)
	if err != nil {
		return PipelineRecord{}, err
	}
	data, err := repo.ReadFile(ctx, sha, ciConfigFile)
	if err != nil {
		return PipelineRecord{}, &gitlabci.NoPipelineError{Reason: fmt.Sprintf("no %s at %s (%.8s)", ciConfigFile, ref, sha)}
	}
	cfg, err := gitlabci.Parse(ciConfigFile, data, gitlabci.Options{ReadFile: func(path string) ([]byte, error) { return repo.ReadFile(ctx, sha, path) }})
	if err != nil {
		return PipelineRecord{}, err
	}
	protected := refType == "branch" && ref == repo.DefaultBranch // GitLab protects the default branch
	env := gitlabci.Env{Vars: pipelineRuleVars(p, repo, ref, refType, sha, source, commit), Exists: func(glob string) bool { return repo.Exists(ctx, sha, glob) }}
	plan, err := cfg.Evaluate(env)
	if err != nil {
		return PipelineRecord{}, err
	}
	spec := planSpec(plan, ref, refType, sha, beforeSha, source, protected)
	if err := spec.validate(repo.Path+"/"+ciConfigFile, "pipeline"); err != nil {
		return PipelineRecord{}, err
	}
	extra := &pipelineExtra{
		name: plan.Name,
		commit: commitInfo{title: commit.Title(), message: commit.Message, description: commit.Description(),
			authorName: commit.AuthorName, authorEmail: commit.AuthorEmail, timestamp: commit.Timestamp},
		readable:    s.submoduleProjects(ctx, repo, sha),
		cacheDigest: func(files []string) (string, bool) { return repo.CacheKeyDigest(ctx, sha, files) },
	}
	for _, w := range cfg.Warnings {
		extra.warnings = append(extra.warnings, w.String())
	}
	// The persistent ref must exist before any job can be handed out.
	s.mu.Lock()
	extra.id = s.id("pipeline")
	s.mu.Unlock()
	if err := repo.SetRef(ctx, fmt.Sprintf("refs/pipelines/%d", extra.id), sha); err != nil {
		return PipelineRecord{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	pl := s.createPipeline(p, spec, extra)
	for _, w := range extra.warnings {
		s.log.Warn("unsupported .gitlab-ci.yml keyword", "project", repo.Path, "pipeline_id", pl.id, "warning", w)
	}
	return pl.record(), nil
}

// pipelineRuleVars are the predefined variables rules: may read.
func pipelineRuleVars(p *project, repo *gitrepo.Repo, ref, refType, sha, source string, c gitrepo.Commit) map[string]string {
	v := map[string]string{
		"CI": "true", "GITLAB_CI": "true",
		"CI_PIPELINE_SOURCE": source, "CI_COMMIT_REF_NAME": ref, "CI_COMMIT_REF_SLUG": slug(ref),
		"CI_COMMIT_SHA": sha, "CI_COMMIT_SHORT_SHA": sha[:8], "CI_COMMIT_TITLE": c.Title(), "CI_COMMIT_MESSAGE": c.Message,
		"CI_COMMIT_AUTHOR": c.AuthorName + " <" + c.AuthorEmail + ">", "CI_COMMIT_TIMESTAMP": c.Timestamp.Format(time.RFC3339),
		"CI_DEFAULT_BRANCH": repo.DefaultBranch, "CI_PROJECT_PATH": p.fullPath(), "CI_PROJECT_NAME": p.name,
		"CI_PROJECT_NAMESPACE": p.namespace(), "CI_PROJECT_ID": fmt.Sprint(p.id), "CI_CONFIG_PATH": ciConfigFile,
	}
	if refType == "tag" {
		v["CI_COMMIT_TAG"] = ref
	} else {
		v["CI_COMMIT_BRANCH"] = ref
	}
	return v
}

// planSpec turns a .gitlab-ci.yml plan into the coordinator's pipeline spec.
func planSpec(plan *gitlabci.Plan, ref, refType, sha, beforeSha, source string, protected bool) PipelineSpec {
	spec := PipelineSpec{Ref: ref, RefType: refType, Sha: sha, BeforeSha: beforeSha, Protected: protected, Stages: plan.Stages, Source: source}
	for _, j := range plan.Jobs {
		js := JobSpec{
			Name: j.Name, Stage: j.Stage, BeforeScript: j.BeforeScript, Script: j.Script, AfterScript: j.AfterScript,
			Tags: j.Tags, Timeout: Duration(j.Timeout), AllowFailure: &j.AllowFailure, When: j.When,
			Needs: j.Needs, Dependencies: j.Dependencies, Image: j.Image, Services: j.Services, Artifacts: j.Artifacts,
			Cache: j.Cache, Retry: j.Retry, AllowFailureExitCodes: j.AllowFailureExitCodes, PreGetSourcesScript: j.PreGetSourcesScript,
		}
		for _, v := range j.Variables {
			js.Variables = append(js.Variables, VariableSpec{Key: v.Key, Value: v.Value, Raw: v.Raw})
		}
		spec.Jobs = append(spec.Jobs, js)
	}
	return spec
}

// submoduleProjects lists the served projects that commit sha of repo
// names as submodules, and theirs in turn (at most 64), so the job token can
// clone them as GitLab's job token scope allows.
func (s *Server) submoduleProjects(ctx context.Context, repo *gitrepo.Repo, sha string) []string {
	var out []string
	type item struct {
		repo *gitrepo.Repo
		sha  string
	}
	queue := []item{{repo, sha}}
	for len(queue) > 0 && len(out) < 64 {
		it := queue[0]
		queue = queue[1:]
		for _, m := range it.repo.Submodules(ctx, it.sha) {
			target, ok := gitrepo.ResolveRelative(it.repo.Path, m.URL)
			if !ok || slices.Contains(out, target) || target == repo.Path {
				continue
			}
			sub := s.repos.Repo(target)
			if sub == nil {
				continue
			}
			out = append(out, target)
			queue = append(queue, item{sub, sub.Head})
		}
	}
	return out
}
