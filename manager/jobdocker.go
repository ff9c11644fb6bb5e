package manager

import (
	"context"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/containerrun"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
	"github.com/mayfly-ci/mayfly/manager/stagerun"
	"github.com/mayfly-ci/mayfly/vmexec"
)

// vmDialer is a connection that opens connections from the VM (sshexec's
// DialContext): the container runner reaches the VM's Docker Engine and
// services' ports through it.
type vmDialer interface {
	DialContext(ctx context.Context, network, addr string) (net.Conn, error)
}

// containerCloseTimeout bounds removing a job's containers from a VM that
// runs more jobs.
const containerCloseTimeout = time.Minute

// containerStages returns the runner of a job's stages: the shell runner
// itself, or, for a job with an image on a runner whose VMs run Docker
// ([runners.docker] of docker+machine or docker-autoscaler), the
// container runner around it.
func (m *Manager) containerStages(r *runner, job *runnerapi.JobResponse, plan *buildscript.Plan, exec vmexec.Executor, shell stagerun.Runner) (stagerun.Runner, func(), error) {
	d := r.cfg.Docker
	if !containerrun.HasImage(job, d) {
		return shell, func() {}, nil
	}
	dialer, ok := exec.(vmDialer)
	if !ok {
		return nil, nil, fmt.Errorf("the connection to the VM cannot reach its Docker Engine: jobs with an image need SSH to a Linux VM")
	}
	c, err := containerrun.NewClient(dialer.DialContext, d.Host)
	if err != nil {
		return nil, nil, err
	}
	cr, err := containerrun.New(containerrun.Options{
		Job: job, Docker: *d, BuildsDir: plan.BuildsDir, Shell: shell,
		Client: c, Dial: dialer.DialContext, Logger: m.log,
	})
	if err != nil {
		c.Close()
		return nil, nil, err
	}
	// A VM used once is deleted with its containers; one that runs more
	// jobs is cleaned.
	remove := r.cfg.Fleet.MaxUses != 1
	return cr, func() {
		ctx, cancel := context.WithTimeout(context.Background(), containerCloseTimeout)
		defer cancel()
		if err := cr.Close(ctx, remove); err != nil {
			m.log.Warn("remove the job's containers", "job", job.ID, "err", err)
		}
		c.Close()
	}, nil
}

// imageIgnored is the warning for a job with an image or services on a
// runner that runs every job in the VM's shell. gitlab-runner's shell
// executors ignore image and services without a word; mayfly says so.
func imageIgnored(r *runner, job *runnerapi.JobResponse) []string {
	if r.cfg.Docker != nil {
		return nil
	}
	var what []string
	if job.Image != nil && job.Image.Name != "" {
		what = append(what, fmt.Sprintf("image %q", job.Image.Name))
	}
	if len(job.Services) > 0 {
		what = append(what, fmt.Sprintf("%d services", len(job.Services)))
	}
	if len(what) == 0 {
		return nil
	}
	where := fmt.Sprintf("the %s executor runs jobs in the VM's own shell", r.cfg.Executor)
	if r.cfg.Fleet.Connector.OS == "windows" {
		where = "jobs on Windows VMs run in the VM's own shell"
	}
	return []string{fmt.Sprintf("%s ignored: %s, as gitlab-runner's shell executor does (use docker+machine or docker-autoscaler with Linux VMs that run Docker)",
		strings.Join(what, " and "), where)}
}
