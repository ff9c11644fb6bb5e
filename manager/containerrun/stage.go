package containerrun

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/network"
	"github.com/docker/docker/api/types/volume"
	"github.com/docker/docker/client"
	"github.com/docker/docker/errdefs"
	"github.com/docker/docker/pkg/stdcopy"

	"github.com/mayfly-ci/mayfly/manager/stagerun"
)

// scriptDir is where a stage's script is copied in its container.
const scriptDir = "/.mayfly"

// shellCommand runs the stage's script with bash when the image has it,
// else sh (gitlab-runner's shell detection, in short), with stderr on
// stdout so that the log keeps the order the script wrote in.
func shellCommand(script string) []string {
	return []string{"sh", "-c", "exec 2>&1\nif command -v bash >/dev/null 2>&1; then exec bash " + script +
		"; fi\nexec sh " + script}
}

// runStage starts the stage's container unless it exists, and follows its
// output from byte from until it exits.
func (r *Runner) runStage(ctx context.Context, p *preparation, s stagerun.Stage, from int64, out io.Writer) (int, error) {
	name := stageContainer(r.job, s.ID)
	ins, err := r.o.Client.ContainerInspect(ctx, name)
	switch {
	case client.IsErrNotFound(err):
		r.mu.Lock()
		stopped := r.stopped[s.ID]
		r.mu.Unlock()
		if stopped {
			return -1, fmt.Errorf("stage %s: stopped before it started", s.ID)
		}
		if err := r.createStage(ctx, p, s); err != nil {
			return -1, r.runErr(ctx, s.ID, err)
		}
		if err := r.startStage(ctx, s); err != nil {
			return -1, r.runErr(ctx, s.ID, err)
		}
	case err != nil:
		return -1, r.runErr(ctx, s.ID, err)
	case ins.State != nil && ins.State.Status == container.StateCreated:
		// Created by a process that stopped before starting it.
		if err := r.startStage(ctx, s); err != nil {
			return -1, r.runErr(ctx, s.ID, err)
		}
	}
	return r.follow(ctx, s.ID, name, from, out)
}

func (r *Runner) runErr(ctx context.Context, id string, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("stage %s: %w", id, context.Cause(ctx))
	}
	return fmt.Errorf("stage %s: %w", id, err)
}

// createStage creates the stage's container; one made already (by another
// Run) is fine.
func (r *Runner) createStage(ctx context.Context, p *preparation, s stagerun.Stage) error {
	img, _ := r.jobImage()
	cfg := &container.Config{
		Image:      p.image,
		Hostname:   fmt.Sprintf("runner-job%d", r.job),
		Env:        s.Env,
		Cmd:        shellCommand(scriptDir + "/" + s.ID + ".sh"),
		Entrypoint: img.Entrypoint,
		Labels:     map[string]string{labelJob: strconv.FormatInt(r.job, 10), labelKind: "stage"},
	}
	hc := r.hostConfig(true)
	nc := &network.NetworkingConfig{EndpointsConfig: map[string]*network.EndpointSettings{networkName(r.job): {}}}
	if err := r.ensureVolumes(ctx); err != nil {
		return err
	}
	if _, err := r.o.Client.ContainerCreate(ctx, cfg, hc, nc, nil, stageContainer(r.job, s.ID)); err != nil && !errdefs.IsConflict(err) {
		return fmt.Errorf("create its container: %w", err)
	}
	return nil
}

// startStage copies the script into the created container and starts it.
func (r *Runner) startStage(ctx context.Context, s stagerun.Stage) error {
	name := stageContainer(r.job, s.ID)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dir := strings.TrimPrefix(scriptDir, "/")
	_ = tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir + "/", Mode: 0o755})
	_ = tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: dir + "/" + s.ID + ".sh", Mode: 0o644, Size: int64(len(s.Script))})
	_, _ = tw.Write([]byte(s.Script))
	if err := tw.Close(); err != nil {
		return err
	}
	if err := r.o.Client.CopyToContainer(ctx, name, "/", &buf, container.CopyToContainerOptions{}); err != nil {
		return fmt.Errorf("copy its script into its container: %w", err)
	}
	if err := r.o.Client.ContainerStart(ctx, name, container.StartOptions{}); err != nil {
		return fmt.Errorf("start its container: %w", err)
	}
	return nil
}

// follow writes a container's output from byte from on until it exits,
// and returns its exit code.
func (r *Runner) follow(ctx context.Context, id, name string, from int64, out io.Writer) (int, error) {
	var last error
	for attempt := 0; attempt < 3; attempt++ {
		rc, err := r.o.Client.ContainerLogs(ctx, name, container.LogsOptions{ShowStdout: true, ShowStderr: true, Follow: true})
		if err != nil {
			if client.IsErrNotFound(err) {
				return -1, fmt.Errorf("stage %s: %w: its container is gone", id, stagerun.ErrLost)
			}
			return -1, r.runErr(ctx, id, fmt.Errorf("read its output: %w", err))
		}
		w := &offsetWriter{w: out, skip: from}
		_, cerr := stdcopy.StdCopy(w, w, rc)
		rc.Close()
		from = max(from, w.pos)
		if ctx.Err() != nil {
			return -1, fmt.Errorf("stage %s: %w", id, context.Cause(ctx))
		}
		if w.err != nil {
			return -1, fmt.Errorf("stage %s: write its output: %w", id, w.err)
		}
		ins, err := r.o.Client.ContainerInspect(ctx, name)
		if err != nil {
			return -1, r.runErr(ctx, id, err)
		}
		if cerr == nil && ins.State != nil && !ins.State.Running && ins.State.Status != container.StateCreated {
			return ins.State.ExitCode, nil
		}
		last = cerr
	}
	return -1, fmt.Errorf("stage %s: following its output failed: %v", id, last)
}

// offsetWriter writes what comes after the first skip bytes.
type offsetWriter struct {
	w    io.Writer
	skip int64
	pos  int64 // bytes seen so far
	err  error
}

func (o *offsetWriter) Write(b []byte) (int, error) {
	n := len(b)
	start := o.pos
	o.pos += int64(n)
	if o.pos <= o.skip {
		return n, nil
	}
	if start < o.skip {
		b = b[o.skip-start:]
	}
	if _, err := o.w.Write(b); err != nil {
		o.err = err
		return 0, err
	}
	return n, nil
}

// hostConfig is the host side of a job's containers: on the job's
// network, with the builds directory and the runner's volumes, privileged
// and limited as [runners.docker] says. Stage containers (build) run
// docker-init as PID 1, which passes Stop's SIGTERM to the script.
func (r *Runner) hostConfig(build bool) *container.HostConfig {
	d := r.o.Docker
	hc := &container.HostConfig{
		NetworkMode: container.NetworkMode(networkName(r.job)),
		Privileged:  d.Privileged,
		DNS:         d.DNS,
		ExtraHosts:  d.ExtraHosts,
		Resources:   container.Resources{Memory: d.Memory, NanoCPUs: d.NanoCPUs},
		LogConfig:   container.LogConfig{Type: "json-file"},
		Binds:       []string{r.o.BuildsDir + ":" + r.o.BuildsDir},
	}
	for i, v := range d.Volumes {
		if strings.Contains(v, ":") {
			hc.Binds = append(hc.Binds, v)
		} else {
			hc.Binds = append(hc.Binds, jobVolume(r.job, i)+":"+v)
		}
	}
	if build {
		init := true
		hc.Init = &init
	}
	return hc
}

// ensureVolumes makes the job's own volumes (volumes entries without a VM
// path), labelled so that Close finds them.
func (r *Runner) ensureVolumes(ctx context.Context) error {
	for i, v := range r.o.Docker.Volumes {
		if strings.Contains(v, ":") {
			continue
		}
		_, err := r.o.Client.VolumeCreate(ctx, volume.CreateOptions{Name: jobVolume(r.job, i),
			Labels: map[string]string{labelJob: strconv.FormatInt(r.job, 10), labelKind: "volume"}})
		if err != nil {
			return fmt.Errorf("create volume for %s: %w", v, err)
		}
	}
	return nil
}
