package coordinator

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

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
	"image_pull_failure",
}

// serverVersion is the GitLab version the coordinator reports (CI_SERVER_VERSION).
const serverVersion = "17.0.0"

// endpoint is the coordinator's external URL split as GitLab's variables want it.
type endpoint struct {
	base, scheme, host, hostname, port, prefix string
}

func parseEndpoint(base string) endpoint {
	e := endpoint{base: base}
	var hostport string
	e.scheme, hostport, _ = strings.Cut(base, "://")
	host, rest, _ := strings.Cut(hostport, "/")
	if rest != "" {
		e.prefix = "/" + rest
	}
	e.host, e.hostname = host, host
	if i := strings.LastIndex(host, ":"); i >= 0 && !strings.HasSuffix(host, "]") {
		e.hostname, e.port = host[:i], host[i+1:]
	}
	if e.port == "" {
		e.port = map[string]string{"http": "80", "https": "443"}[e.scheme]
	}
	return e
}

// withCredentials is the base URL with gitlab-ci-token:<token>@ in it.
func (e endpoint) withCredentials(token string) string {
	return fmt.Sprintf("%s://gitlab-ci-token:%s@%s%s", e.scheme, token, e.host, e.prefix)
}

// payload builds the job JSON for j assigned to r, under s.mu. base is the
// URL jobs see (Config.ExternalURL): every URL in the payload uses it.
func (s *Server) payload(j *job, r *runner, base string) *runnerapi.JobResponse {
	pl, p := j.pipeline, j.pipeline.project
	ep := parseEndpoint(base)
	id := strconv.FormatInt(j.id, 10)
	projectURL := base + "/" + p.fullPath()
	repoURL := ep.withCredentials(j.token) + "/" + p.fullPath() + ".git"
	pub := func(k, v string) runnerapi.Variable { return runnerapi.Variable{Key: k, Value: v, Public: true} }
	secret := func(k, v string) runnerapi.Variable { return runnerapi.Variable{Key: k, Value: v, Masked: true} }
	pipelineID := strconv.FormatInt(pl.id, 10)

	// Job variables, as GitLab sends them first.
	vars := []runnerapi.Variable{
		pub("CI_JOB_NAME", j.name),
		pub("CI_JOB_NAME_SLUG", slug(j.name)),
		pub("CI_JOB_STAGE", j.stage),
		pub("CI_JOB_ID", id),
		pub("CI_JOB_URL", projectURL+"/-/jobs/"+id),
		secret("CI_JOB_TOKEN", j.token),
		pub("CI_JOB_STARTED_AT", j.startedAt.UTC().Format(time.RFC3339)),
		pub("CI_JOB_TIMEOUT", strconv.Itoa(j.runnerTimeout)),
	}
	if !slices.ContainsFunc(j.variables, func(v runnerapi.Variable) bool { return v.Key == "CI_NODE_TOTAL" }) {
		vars = append(vars, pub("CI_NODE_TOTAL", "1"))
	}
	if j.image != nil {
		vars = append(vars, pub("CI_JOB_IMAGE", j.image.Name))
	}
	var credentials []runnerapi.Credentials
	if reg := s.registryHost(ep); reg != "" {
		vars = append(vars,
			pub("CI_REGISTRY_USER", "gitlab-ci-token"),
			secret("CI_REGISTRY_PASSWORD", j.token),
			pub("CI_REGISTRY", reg),
			pub("CI_REGISTRY_IMAGE", reg+"/"+strings.ToLower(p.fullPath())))
		credentials = append(credentials, runnerapi.Credentials{Type: "registry", URL: reg, Username: "gitlab-ci-token", Password: j.token})
	}
	vars = append(vars,
		runnerapi.Variable{Key: "CI_REPOSITORY_URL", Value: repoURL},
		// The instance.
		pub("CI", "true"),
		pub("GITLAB_CI", "true"),
		pub("CI_SERVER", "yes"),
		pub("CI_SERVER_NAME", "GitLab"),
		pub("CI_SERVER_URL", base),
		pub("CI_SERVER_HOST", ep.hostname),
		pub("CI_SERVER_FQDN", ep.host),
		pub("CI_SERVER_PORT", ep.port),
		pub("CI_SERVER_PROTOCOL", ep.scheme),
		pub("CI_SERVER_VERSION", serverVersion),
		pub("CI_SERVER_VERSION_MAJOR", strings.Split(serverVersion, ".")[0]),
		pub("CI_SERVER_VERSION_MINOR", strings.Split(serverVersion, ".")[1]),
		pub("CI_SERVER_VERSION_PATCH", strings.Split(serverVersion, ".")[2]),
		pub("CI_SERVER_REVISION", "mayfly"),
		pub("CI_API_V4_URL", base+"/api/v4"),
		pub("CI_API_GRAPHQL_URL", base+"/api/graphql"),
		// The project.
		pub("CI_PROJECT_ID", strconv.FormatInt(p.id, 10)),
		pub("CI_PROJECT_NAME", p.name),
		pub("CI_PROJECT_TITLE", p.name),
		pub("CI_PROJECT_DESCRIPTION", ""),
		pub("CI_PROJECT_PATH", p.fullPath()),
		pub("CI_PROJECT_PATH_SLUG", slug(p.fullPath())),
		pub("CI_PROJECT_NAMESPACE", p.namespace()),
		pub("CI_PROJECT_NAMESPACE_SLUG", slug(p.namespace())),
		pub("CI_PROJECT_ROOT_NAMESPACE", strings.Split(p.namespace(), "/")[0]),
		pub("CI_PROJECT_URL", projectURL),
		pub("CI_PROJECT_VISIBILITY", "internal"),
		pub("CI_DEFAULT_BRANCH", p.defaultBranch()),
		pub("CI_CONFIG_PATH", ".gitlab-ci.yml"),
		// The pipeline.
		pub("CI_PIPELINE_ID", pipelineID),
		pub("CI_PIPELINE_IID", strconv.Itoa(pl.iid)),
		pub("CI_PIPELINE_SOURCE", pl.source),
		pub("CI_PIPELINE_URL", projectURL+"/-/pipelines/"+pipelineID),
		pub("CI_PIPELINE_CREATED_AT", pl.createdAt.UTC().Format(time.RFC3339)),
	)
	if pl.name != "" {
		vars = append(vars, pub("CI_PIPELINE_NAME", pl.name))
	}
	vars = append(vars, commitVariables(pl)...)
	vars = append(vars,
		pub("GITLAB_USER_ID", "1"),
		pub("GITLAB_USER_LOGIN", "root"),
		pub("GITLAB_USER_NAME", pl.commit.authorName),
		pub("GITLAB_USER_EMAIL", pl.commit.authorEmail),
		pub("CI_RUNNER_ID", strconv.FormatInt(r.id, 10)),
		pub("CI_RUNNER_DESCRIPTION", r.description),
		pub("CI_RUNNER_TAGS", tagsJSON(r.tags)),
	)
	vars = append(vars, j.variables...)
	// Dotenv reports of the jobs whose artifacts this one gets come after
	// the .gitlab-ci.yml variables, which they override, as in GitLab.
	for _, d := range pl.dependencyJobs(j) {
		vars = append(vars, d.dotenv...)
	}

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
	deps := []runnerapi.Dependency{}
	for _, d := range pl.dependencyJobs(j) {
		// GitLab sends the running job's token: the dependency's own is
		// no longer valid once it finished.
		deps = append(deps, runnerapi.Dependency{ID: d.id, Name: d.name, Token: j.token, ArtifactsFile: d.artifactsFile})
	}
	services := slices.Clone(j.services)
	if services == nil {
		services = []runnerapi.Image{}
	}
	if credentials == nil {
		credentials = []runnerapi.Credentials{}
	}
	return &runnerapi.JobResponse{
		ID:            j.id,
		Token:         j.token,
		AllowGitFetch: true,
		JobInfo:       info,
		GitInfo: runnerapi.GitInfo{
			RepoURL:          repoURL,
			Ref:              pl.ref,
			Sha:              pl.sha,
			BeforeSha:        pl.beforeSha,
			RefType:          pl.refType,
			Refspecs:         refspecs(pl, depth),
			Depth:            depth,
			RepoObjectFormat: "sha1",
		},
		RunnerInfo:   runnerapi.RunnerInfo{Timeout: j.runnerTimeout},
		Variables:    vars,
		Steps:        slices.Clone(j.steps),
		Image:        j.image,
		Services:     services,
		Artifacts:    append([]runnerapi.Artifact{}, j.artifacts...),
		Cache:        append([]runnerapi.Cache{}, j.caches...),
		Credentials:  credentials,
		Dependencies: deps,
		Features:     runnerapi.GitlabFeatures{TraceSections: true, FailureReasons: slices.Clone(failureReasons)},
		Hooks:        slices.Clone(j.hooks),
	}
}

// commitVariables are the CI_COMMIT_* variables of a pipeline.
func commitVariables(pl *pipeline) []runnerapi.Variable {
	pub := func(k, v string) runnerapi.Variable { return runnerapi.Variable{Key: k, Value: v, Public: true} }
	vars := []runnerapi.Variable{
		pub("CI_COMMIT_SHA", pl.sha),
		pub("CI_COMMIT_SHORT_SHA", pl.sha[:8]),
		pub("CI_COMMIT_BEFORE_SHA", pl.beforeSha),
		pub("CI_COMMIT_REF_NAME", pl.ref),
		pub("CI_COMMIT_REF_SLUG", slug(pl.ref)),
		pub("CI_COMMIT_REF_PROTECTED", strconv.FormatBool(pl.protected)),
		pub("CI_COMMIT_MESSAGE", pl.commit.message),
		pub("CI_COMMIT_TITLE", pl.commit.title),
		pub("CI_COMMIT_DESCRIPTION", pl.commit.description),
		pub("CI_COMMIT_AUTHOR", pl.commit.authorName+" <"+pl.commit.authorEmail+">"),
		pub("CI_COMMIT_TIMESTAMP", pl.commit.timestamp.Format(time.RFC3339)),
	}
	if pl.refType == "tag" {
		return append(vars, pub("CI_COMMIT_TAG", pl.ref))
	}
	return append(vars, pub("CI_COMMIT_BRANCH", pl.ref))
}

// refspecs are GitLab's: the pipeline's persistent ref, plus the branch or
// tag itself with a shallow clone, or every branch and tag without.
func refspecs(pl *pipeline, depth int) []string {
	specs := []string{fmt.Sprintf("+refs/pipelines/%d:refs/pipelines/%d", pl.id, pl.id)}
	switch {
	case depth == 0:
		specs = append(specs, "+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*")
	case pl.refType == "tag":
		specs = append(specs, fmt.Sprintf("+refs/tags/%s:refs/tags/%s", pl.ref, pl.ref))
	default:
		specs = append(specs, fmt.Sprintf("+refs/heads/%s:refs/remotes/origin/%s", pl.ref, pl.ref))
	}
	return specs
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
