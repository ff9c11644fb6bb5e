package containerrun

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/docker/docker/api/types/image"
	"github.com/docker/docker/api/types/registry"
	"github.com/docker/docker/client"
	"github.com/docker/docker/pkg/jsonmessage"

	"github.com/mayfly-ci/mayfly/manager/config"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
	"github.com/mayfly-ci/mayfly/manager/stagerun"
)

// effectivePolicies returns the pull policies for an image: the job's own
// (image:pull_policy) when each is allowed, else the runner's.
func (r *Runner) effectivePolicies(ref string, job []string) ([]string, error) {
	runner := r.o.Docker.PullPolicy
	if len(runner) == 0 {
		runner = []string{config.PullAlways}
	}
	if len(job) == 0 {
		return runner, nil
	}
	allowed := r.o.Docker.AllowedPullPolicies
	if len(allowed) == 0 {
		allowed = runner
	}
	for _, p := range job {
		if !contains(allowed, p) {
			return nil, &stagerun.Failure{Reason: runnerapi.FailureRunnerConfigurationError, Err: fmt.Errorf(
				"invalid pull policy for image %q: pull_policy (%v) defined in GitLab pipeline config is not one of the allowed_pull_policies (%v)", ref, job, allowed)}
		}
	}
	return job, nil
}

// getImage makes ref present on the VM's Docker Engine as its pull
// policies say, printing what gitlab-runner prints, and returns its ID.
func (r *Runner) getImage(ctx context.Context, p *preparation, ref string, jobPolicies []string) (string, error) {
	policies, err := r.effectivePolicies(ref, jobPolicies)
	if err != nil {
		return "", err
	}
	p.printf("Using effective pull policy of %v for container %s", policies, ref)
	var last error
	for i, pol := range policies {
		if i > 0 {
			p.printf("Attempt #%d: Trying %q pull policy", i+1, pol)
		}
		var ins image.InspectResponse
		ins, last = r.imageWithPolicy(ctx, p, ref, pol)
		if last == nil {
			if len(ins.RepoDigests) > 0 {
				p.printf("Using docker image %s for %s with digest %s ...", ins.ID, ref, ins.RepoDigests[0])
			} else {
				p.printf("Using docker image %s for %s ...", ins.ID, ref)
			}
			return ins.ID, nil
		}
		if ctx.Err() != nil {
			break
		}
		p.warnf("Failed to pull image with policy %q: %v", pol, last)
	}
	return "", &stagerun.Failure{Reason: classifyPullFailure(last),
		Err: fmt.Errorf("failed to pull image %q with specified policies %v: %w", ref, policies, last)}
}

func (r *Runner) imageWithPolicy(ctx context.Context, p *preparation, ref, policy string) (image.InspectResponse, error) {
	ins, err := r.o.Client.ImageInspect(ctx, ref)
	switch {
	case err != nil && !client.IsErrNotFound(err):
		return ins, err
	case policy == config.PullNever:
		if err != nil {
			return ins, fmt.Errorf("image %q not found locally and the pull policy is %q", ref, policy)
		}
		return ins, nil
	case policy == config.PullIfNotPresent && err == nil:
		p.printf("Using locally found image version due to %q pull policy", policy)
		return ins, nil
	}
	if err := r.pull(ctx, p, ref); err != nil {
		return ins, err
	}
	return r.o.Client.ImageInspect(ctx, ref)
}

// pull pulls ref, with the job's registry credentials for its registry.
func (r *Runner) pull(ctx context.Context, p *preparation, ref string) error {
	var opts image.PullOptions
	if cred, ok := r.credentials(ref); ok {
		p.printf("Authenticating with credentials from job payload (GitLab Registry)")
		auth, err := json.Marshal(registry.AuthConfig{Username: cred.Username, Password: cred.Password, ServerAddress: cred.URL})
		if err != nil {
			return err
		}
		opts.RegistryAuth = base64.URLEncoding.EncodeToString(auth)
	}
	p.printf("Pulling docker image %s ...", ref)
	rc, err := r.o.Client.ImagePull(ctx, withTag(ref), opts)
	if err != nil {
		return err
	}
	defer rc.Close()
	// The progress is not shown (as in gitlab-runner); an error message in
	// the stream fails the pull.
	return jsonmessage.DisplayJSONMessagesStream(rc, io.Discard, 0, false, nil)
}

// credentials returns the job's registry credentials for ref's registry
// (GitLab sends the job token for its own registry, CI_REGISTRY).
func (r *Runner) credentials(ref string) (runnerapi.Credentials, bool) {
	host := registryHost(ref)
	if host == "" {
		return runnerapi.Credentials{}, false
	}
	for _, c := range r.o.Job.Credentials {
		u := strings.TrimPrefix(strings.TrimPrefix(c.URL, "https://"), "http://")
		u = strings.TrimSuffix(u, "/")
		if c.Type == "registry" && strings.EqualFold(u, host) {
			return c, true
		}
	}
	return runnerapi.Credentials{}, false
}

// classifyPullFailure gives a failed pull the failure reason gitlab-runner
// gives it: a network failure is the runner's, a missing image or refused
// credentials the job's configuration, anything else image_pull_failure.
func classifyPullFailure(err error) string {
	if err == nil {
		return runnerapi.FailureImagePullFailure
	}
	msg := strings.ToLower(err.Error())
	has := func(subs ...string) bool {
		for _, s := range subs {
			if strings.Contains(msg, s) {
				return true
			}
		}
		return false
	}
	switch {
	case errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
		return runnerapi.FailureRunnerSystemFailure
	case has("dial tcp", "connection refused", "no such host", "i/o timeout", "tls handshake", "client.timeout exceeded", "request canceled", "connection reset"):
		return runnerapi.FailureRunnerSystemFailure
	case has("not found", "manifest unknown", "pull access denied", "access to the resource is denied", "no basic auth credentials",
		"repository does not exist or may require", "unauthorized", "authentication required"):
		return runnerapi.FailureRunnerConfigurationError
	}
	return runnerapi.FailureImagePullFailure
}
