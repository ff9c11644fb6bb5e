package manager_test

import (
	"strings"
	"testing"

	"github.com/mayfly-ci/mayfly/manager/config"
	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/manager/coordinator/gitlabci"
)

// TestImageOnShellRunner: a runner whose jobs run in the VM's shell (the
// instance executor, or Windows VMs) runs a job with image and services in
// the shell as gitlab-runner's shell executor does, and says in the trace
// that they were ignored; it does not advertise image and services.
func TestImageOnShellRunner(t *testing.T) {
	e := newEnv(t, []coordinator.JobSpec{{
		Name:     "with-image",
		Image:    &gitlabci.Image{Name: "registry.example.com/tools/debian:bookworm"},
		Services: []gitlabci.Image{{Name: "redis:7"}},
		Script:   []string{"echo ran in the shell"},
	}}, nil)
	j := e.job("with-image")
	tr := traceOf(t, j)
	if j.Status != "success" {
		t.Fatalf("job %s %s:\n%s", j.Status, j.FailureReason, tr)
	}
	want := `image "registry.example.com/tools/debian:bookworm" and 1 services ignored: the instance executor runs jobs in the VM's own shell`
	if !strings.Contains(tr, "WARNING: "+want) || !strings.Contains(tr, "\nran in the shell\n") {
		t.Errorf("trace lacks the warning %q or the script's output:\n%s", want, tr)
	}
}

// TestJobWithoutImageOnDockerRunner: on a Docker runner without a default
// image, a job that names none runs in the VM's shell.
func TestJobWithoutImageOnDockerRunner(t *testing.T) {
	e := newEnv(t, []coordinator.JobSpec{{Name: "plain", Script: []string{"echo no image"}}}, func(rc *config.Runner) {
		rc.Executor = "docker-autoscaler"
		rc.Docker = &config.Docker{Host: config.DefaultDockerHost, PullPolicy: []string{"always"}, ServicesLimit: -1}
	})
	j := e.job("plain")
	if tr := traceOf(t, j); j.Status != "success" || !strings.Contains(tr, "\nno image\n") || strings.Contains(tr, "WARNING") {
		t.Fatalf("a job without an image on a Docker runner: %s\n%s", j.Status, tr)
	}
}
