package containerrun_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/containerrun"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
	"github.com/mayfly-ci/mayfly/manager/stagerun"
	"github.com/mayfly-ci/mayfly/vmexec/dockertest"
)

var jobSeq int64 = 9000

// payload is a job with image and steps, as GitLab sends it; its variables
// name the test registry as CI_REGISTRY and its credentials carry the job
// token for it.
func payload(e *env, image string, script, after []string, services ...runnerapi.Image) *runnerapi.JobResponse {
	jobSeq++
	steps := []runnerapi.Step{{Name: "script", Script: script, Timeout: 600, When: "on_success"}}
	if after != nil {
		steps = append(steps, runnerapi.Step{Name: "after_script", Script: after, Timeout: 600, When: "always"})
	}
	return &runnerapi.JobResponse{
		ID: jobSeq, Token: jobToken,
		JobInfo: runnerapi.JobInfo{Name: "test", Stage: "test", ProjectID: 7},
		GitInfo: runnerapi.GitInfo{RepoURL: "http://gitlab-ci-token:" + jobToken + "@127.0.0.1/group/project.git"},
		Variables: []runnerapi.Variable{
			{Key: "CI_REGISTRY", Value: e.registry, Public: true},
			{Key: "GIT_STRATEGY", Value: "none", Public: true},
			{Key: "GREETING", Value: "hello from the job", Public: true},
		},
		Steps:       steps,
		Image:       &runnerapi.Image{Name: image},
		Services:    services,
		Credentials: []runnerapi.Credentials{{Type: "registry", URL: e.registry, Username: regUser, Password: jobToken}},
	}
}

func generate(t *testing.T, e *env, job *runnerapi.JobResponse) *buildscript.Plan {
	t.Helper()
	plan, err := buildscript.Generate(job, buildscript.Options{Shell: "bash", BuildsDir: e.builds})
	if err != nil {
		t.Fatal(err)
	}
	return plan
}

// outputs re-reads every stage of a finished plan through r and returns
// their outputs by stage ID.
func outputs(t *testing.T, plan *buildscript.Plan, r stagerun.Runner) map[string]string {
	t.Helper()
	out := map[string]string{}
	for i, st := range plan.Stages {
		id := stagerun.StageID(i, string(st.Name), 1)
		var b bytes.Buffer
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		_, err := r.Run(ctx, stagerun.Stage{ID: id, Script: st.Script}, &b)
		cancel()
		if err != nil && !errors.Is(err, stagerun.ErrLost) {
			t.Fatalf("read %s again: %v", id, err)
		}
		out[id] = b.String()
	}
	return out
}

// TestJobInContainers runs a job with image and services through
// buildscript's Plan.Run on a real Docker Engine reached through OpenSSH:
// the user's steps run inside the image (its os-release, not the
// machine's) on the builds directory of the machine, the service answers
// by its alias, the image is pulled with the job token, get_sources runs in
// the machine's shell (detached, as the manager runs it), and a runner made
// later (a restarted manager) reads every stage's output again, byte for
// byte, also from an offset.
func TestJobInContainers(t *testing.T) {
	e := newEnv(t)
	img := e.push(t, busybox(t), "mayfly/busybox:test")
	e.push(t, serviceImage(t, 6379, "nc", "-ll", "-p", "6379", "-e", "echo", "PONG"), "mayfly/pong:test")
	// gitlab-runner's aliases of the service: its image without tag and
	// registry port, "/" as "__" and as "-"; plus alias: db.
	host, _, _ := strings.Cut(e.registry, ":")
	derived := host + "-mayfly-pong"
	job := payload(e, "$CI_REGISTRY/mayfly/busybox:test",
		[]string{"cat /etc/os-release", `echo "$GREETING" > "$CI_PROJECT_DIR/made-in-container"`, "nc db 6379 </dev/null", "nc " + derived + " 6379 </dev/null"},
		[]string{`echo "after: $CI_JOB_STATUS"`},
		runnerapi.Image{Name: "$CI_REGISTRY/mayfly/pong:test", Alias: "db"})
	plan := generate(t, e, job)
	r := e.newRunner(t, containerrun.Options{Job: job, Docker: dockerConfig()})
	var trace bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	res := plan.Run(ctx, r, &trace, buildscript.RunOptions{})
	t.Logf("job ran in %s", time.Since(start).Round(time.Millisecond))
	if res.State != runnerapi.StateSuccess {
		t.Fatalf("job %s (%s): %s\n%s", res.State, res.FailureReason, res.Message, trace.String())
	}
	tr := trace.String()
	for _, want := range []string{
		"Using Docker executor with image " + img,
		"Authenticating with credentials from job payload (GitLab Registry)",
		"Pulling docker image " + img + " ...",
		"Starting service " + e.registry + "/mayfly/pong:test ...",
		"Waiting for services to be up and running (timeout 20 seconds)...",
		"Running on ",
		dockertest.BusyboxOSRelease,
		"PONG\n\x1b[32;1m$ nc " + derived + " 6379 </dev/null\x1b[0;m\nPONG\n",
		"after: success",
	} {
		if !strings.Contains(tr, want) {
			t.Errorf("the trace lacks %q:\n%s", want, tr)
		}
	}
	if strings.Contains(tr, "WARNING") {
		t.Errorf("the trace has a warning:\n%s", tr)
	}
	if strings.Contains(tr, jobToken) {
		t.Errorf("the job token is in the raw trace:\n%s", tr)
	}
	made, err := os.ReadFile(filepath.Join(plan.ProjectDir, "made-in-container"))
	if err != nil || string(made) != "hello from the job\n" {
		t.Errorf("the file written in the container on the builds dir: %q, %v", made, err)
	}
	if users := e.pulls.list(); len(users) < 2 {
		t.Errorf("the registry served %d manifests, want the image's and the service's", len(users))
	}

	// A restarted manager reads the same outputs, and a suffix from an
	// offset.
	first := outputs(t, plan, r)
	r2 := e.newRunner(t, containerrun.Options{Job: job, Docker: dockerConfig()})
	second := outputs(t, plan, r2)
	for id, out := range first {
		if second[id] != out {
			t.Errorf("stage %s read again by a new runner:\n%q\nfirst:\n%q", id, second[id], out)
		}
		if !strings.Contains(tr, out) {
			t.Errorf("stage %s's output is not what the trace got:\n%q", id, out)
		}
		from := int64(len(out) / 2)
		var b bytes.Buffer
		if _, err := r2.Run(context.Background(), stagerun.Stage{ID: id, From: from}, &b); err != nil {
			t.Fatal(err)
		}
		if b.String() != out[from:] {
			t.Errorf("stage %s from %d: %q, want %q", id, from, b.String(), out[from:])
		}
	}
}
