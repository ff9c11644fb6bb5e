// Package containerrun runs the stages of a job with an image as
// gitlab-runner's docker+machine executor does, on the job's own VM: the
// user's stages (step_*, after_script) each in a container of the job's
// image on the VM's Docker Engine, the runner's stages (get_sources, cache,
// artifacts) in the VM's own shell through another stagerun.Runner, all on
// one build directory of the VM bind-mounted into every container at the
// same path.
//
// The prepare_script stage first prepares the job: it pulls the image (pull
// policies, the job token as registry credentials), makes a network for the
// job, starts the services on it under their aliases and waits for their
// ports; then its own script ("Running on ...") runs in the VM's shell
// (gitlab-runner runs it in a container: one container start less). What
// the preparation prints is kept on the VM's Docker Engine (the labels of a
// volume written once when preparing ends), so a restarted manager reads
// the very same output again.
//
// Every container is named from the job id and the stage ID, and keeps its
// output in the Docker Engine's json-file log, so that Run can attach to a
// stage from any process and read its output from any byte offset (see
// stagerun). Stop stops the container: SIGTERM through docker-init, then
// SIGKILL after a grace period.
package containerrun

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/api/types/network"
	"github.com/docker/docker/api/types/volume"
	"github.com/docker/docker/client"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/config"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
	"github.com/mayfly-ci/mayfly/manager/stagerun"
)

// DialFunc opens a connection from the VM (network "unix" or "tcp"), as
// sshexec.Client.DialContext does over the job's SSH connection.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// NewClient returns a Docker Engine API client for the socket named by
// host (unix:///path) on the VM, reached through dial. The API version is
// negotiated down to the engine's (Debian's docker.io 20.10 speaks 1.41).
func NewClient(dial DialFunc, host string) (*client.Client, error) {
	u, err := url.Parse(host)
	if err != nil || u.Scheme != "unix" || u.Path == "" {
		return nil, fmt.Errorf("docker host %q: want unix:///path/to/docker.sock", host)
	}
	return client.NewClientWithOpts(client.WithHost("unix://"+u.Path), client.WithAPIVersionNegotiation(),
		client.WithDialContext(func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dial(ctx, "unix", u.Path)
		}))
}

// Options configure a Runner for one job.
type Options struct {
	// Job is the job's payload: its image, services, variables and
	// registry credentials.
	Job *runnerapi.JobResponse
	// Docker is the runner's [runners.docker].
	Docker config.Docker
	// BuildsDir is the VM directory mounted at the same path in every
	// container (the plan's BuildsDir).
	BuildsDir string
	// Shell runs the stages that are not the user's, in the VM's shell.
	Shell stagerun.Runner
	// Client talks to the VM's Docker Engine (see NewClient).
	Client *client.Client
	// Dial opens TCP connections from the VM, to wait for services' ports;
	// nil skips the wait.
	Dial DialFunc
	// InternalNetwork makes the job's network internal (no route out):
	// for tests, whose containers must not reach beyond them.
	InternalNetwork bool
	// StopGrace is how long Stop waits after SIGTERM (default 10 s).
	StopGrace time.Duration
	// Logger receives the runner's own log.
	Logger *slog.Logger
}

// Runner runs one job's stages; see the package documentation.
type Runner struct {
	o      Options
	job    int64
	expand func(string) string
	log    *slog.Logger

	mu      sync.Mutex
	prep    *preparation
	stopped map[string]bool // stages Stop ended before they started
	closed  bool
	ctx     context.Context // ends at Close: preparations in flight stop
	cancel  context.CancelFunc
	wg      sync.WaitGroup
}

var _ stagerun.Runner = (*Runner)(nil)

// New returns the runner of one job. It talks to the VM only when a stage
// runs.
func New(o Options) (*Runner, error) {
	switch {
	case o.Job == nil:
		return nil, errors.New("containerrun: no job")
	case o.Shell == nil:
		return nil, errors.New("containerrun: no shell runner for the runner's stages")
	case o.Client == nil:
		return nil, errors.New("containerrun: no Docker client")
	case !strings.HasPrefix(o.BuildsDir, "/"):
		return nil, fmt.Errorf("containerrun: builds dir %q: want an absolute path", o.BuildsDir)
	}
	if o.StopGrace <= 0 {
		o.StopGrace = 10 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Runner{o: o, job: o.Job.ID, expand: expander(o.Job.Variables), log: o.Logger.With("job", o.Job.ID),
		stopped: map[string]bool{}, ctx: ctx, cancel: cancel}, nil
}

// InContainer reports whether the stage named name runs in a container:
// the user's stages (step_*, after_script) do; prepare_script (after the
// preparation), get_sources, cache and artifacts stages run in the VM's
// shell.
func InContainer(name string) bool {
	return buildscript.StageName(name) == buildscript.StageAfterScript || strings.HasPrefix(name, "step_")
}

// shellChain is the part of a chain the shell may start on its own: the
// stages up to the first that runs in a container.
func shellChain(then []stagerun.Stage) []stagerun.Stage {
	for i, n := range then {
		if _, name, _, _ := stagerun.ParseStageID(n.ID); InContainer(name) {
			return then[:i]
		}
	}
	return then
}

// Run implements stagerun.Runner.
func (r *Runner) Run(ctx context.Context, s stagerun.Stage, out io.Writer) (int, error) {
	_, name, _, ok := stagerun.ParseStageID(s.ID)
	if !ok {
		return -1, fmt.Errorf("stage %q: not a stage ID", s.ID)
	}
	if buildscript.StageName(name) == buildscript.StagePrepare {
		return r.runPrepare(ctx, s, out)
	}
	if !InContainer(name) {
		s.Then = shellChain(s.Then)
		return r.o.Shell.Run(ctx, s, out)
	}
	p, err := r.prepared(ctx)
	if err != nil {
		return -1, fmt.Errorf("stage %s: %w", s.ID, err)
	}
	return r.runStage(ctx, p, s, s.From, out)
}

// Stop implements stagerun.Runner.
func (r *Runner) Stop(ctx context.Context, id string) error {
	_, name, _, ok := stagerun.ParseStageID(id)
	if !ok {
		return fmt.Errorf("stop stage %q: not a stage ID", id)
	}
	if buildscript.StageName(name) == buildscript.StagePrepare {
		r.mu.Lock()
		p := r.prep
		r.mu.Unlock()
		if p != nil {
			p.cancel()
			select {
			case <-p.done:
			case <-ctx.Done():
				return fmt.Errorf("stop stage %s: %w", id, context.Cause(ctx))
			}
		}
	}
	if !InContainer(name) {
		return r.o.Shell.Stop(ctx, id)
	}
	return r.stopContainer(ctx, id)
}

// stopContainer stops a stage's container and waits until it is gone. A
// container created but never started is removed, so that no later Run
// starts it.
func (r *Runner) stopContainer(ctx context.Context, id string) error {
	name := stageContainer(r.job, id)
	ins, err := r.o.Client.ContainerInspect(ctx, name)
	switch {
	case client.IsErrNotFound(err):
		r.mu.Lock()
		r.stopped[id] = true
		r.mu.Unlock()
		return nil
	case err != nil:
		return fmt.Errorf("stop stage %s: %w", id, err)
	case ins.State != nil && ins.State.Status == container.StateCreated:
		r.mu.Lock()
		r.stopped[id] = true
		r.mu.Unlock()
		if err := r.o.Client.ContainerRemove(ctx, name, container.RemoveOptions{Force: true}); err != nil && !client.IsErrNotFound(err) {
			return fmt.Errorf("stop stage %s: remove its container: %w", id, err)
		}
		return nil
	}
	grace := int(r.o.StopGrace.Round(time.Second) / time.Second)
	if err := r.o.Client.ContainerStop(ctx, name, container.StopOptions{Timeout: &grace}); err != nil && !client.IsErrNotFound(err) {
		return fmt.Errorf("stop stage %s: %w", id, err)
	}
	return nil
}

// Close stops a preparation still in flight. With remove, it also removes
// the job's containers, network and volumes from the VM's Docker Engine
// (for VMs that run more than one job); ctx bounds that.
func (r *Runner) Close(ctx context.Context, remove bool) error {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	r.cancel()
	r.wg.Wait()
	if !remove {
		return nil
	}
	return r.removeAll(ctx)
}

// removeAll removes every object labelled with the job.
func (r *Runner) removeAll(ctx context.Context) error {
	c := r.o.Client
	f := filters.NewArgs(filters.Arg("label", fmt.Sprintf("%s=%d", labelJob, r.job)))
	var errs []error
	cs, err := c.ContainerList(ctx, container.ListOptions{All: true, Filters: f})
	if err != nil {
		return fmt.Errorf("list the job's containers: %w", err)
	}
	for _, ct := range cs {
		if err := c.ContainerRemove(ctx, ct.ID, container.RemoveOptions{Force: true, RemoveVolumes: true}); err != nil && !client.IsErrNotFound(err) {
			errs = append(errs, fmt.Errorf("remove container %s: %w", ct.ID[:12], err))
		}
	}
	nets, err := c.NetworkList(ctx, network.ListOptions{Filters: f})
	if err != nil {
		errs = append(errs, fmt.Errorf("list the job's networks: %w", err))
	}
	for _, n := range nets {
		if err := c.NetworkRemove(ctx, n.ID); err != nil && !client.IsErrNotFound(err) {
			errs = append(errs, fmt.Errorf("remove network %s: %w", n.Name, err))
		}
	}
	vols, err := c.VolumeList(ctx, volume.ListOptions{Filters: f})
	if err != nil {
		errs = append(errs, fmt.Errorf("list the job's volumes: %w", err))
	} else {
		for _, v := range vols.Volumes {
			if err := c.VolumeRemove(ctx, v.Name, true); err != nil && !client.IsErrNotFound(err) {
				errs = append(errs, fmt.Errorf("remove volume %s: %w", v.Name, err))
			}
		}
	}
	return errors.Join(errs...)
}
