package containerrun

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
	"time"

	"github.com/docker/docker/api/types/network"
	"github.com/docker/docker/api/types/volume"
	"github.com/docker/docker/client"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/config"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
	"github.com/mayfly-ci/mayfly/manager/stagerun"
)

// preparation is the preparing of a job before its first container: what
// it printed so far, and once done, how it ended.
type preparation struct {
	mu     sync.Mutex
	out    []byte
	grew   chan struct{} // closed (and replaced) when out grows and when done
	done   chan struct{}
	err    error  // set before done closes: how the preparation failed
	image  string // set before done closes: the image ID of the job's stages
	cancel context.CancelFunc
}

func newPreparation() *preparation {
	return &preparation{grew: make(chan struct{}), done: make(chan struct{}), cancel: func() {}}
}

// Write appends to the output and wakes its readers.
func (p *preparation) Write(b []byte) (int, error) {
	p.mu.Lock()
	p.out = append(p.out, b...)
	close(p.grew)
	p.grew = make(chan struct{})
	p.mu.Unlock()
	return len(b), nil
}

func (p *preparation) printf(format string, args ...any) {
	fmt.Fprint(p, buildscript.LogLine(fmt.Sprintf(format, args...)))
}

func (p *preparation) warnf(format string, args ...any) {
	fmt.Fprint(p, buildscript.WarningLine(fmt.Sprintf(format, args...)))
}

func (p *preparation) finish(image string, err error) {
	p.mu.Lock()
	p.image, p.err = image, err
	close(p.grew)
	p.grew = make(chan struct{})
	p.mu.Unlock()
	close(p.done)
}

// stream writes the output from byte from on as it grows, until the
// preparation is done or ctx ends. It returns the output's whole length.
func (p *preparation) stream(ctx context.Context, from int64, w io.Writer) (int64, error) {
	for {
		p.mu.Lock()
		out, grew := p.out, p.grew
		p.mu.Unlock()
		if from < int64(len(out)) {
			if _, err := w.Write(out[from:]); err != nil {
				return 0, err
			}
			from = int64(len(out))
		}
		select {
		case <-p.done:
			p.mu.Lock()
			n := int64(len(p.out))
			rest := p.out[min(from, n):]
			p.mu.Unlock()
			if len(rest) > 0 {
				if _, err := w.Write(rest); err != nil {
					return 0, err
				}
			}
			return n, nil
		case <-grew:
		case <-ctx.Done():
			return 0, context.Cause(ctx)
		}
	}
}

// The record of a finished preparation: the labels of a volume made once,
// when it ends.
const (
	labelOutput  = "com.mayfly-ci.prepare.output"
	labelImage   = "com.mayfly-ci.prepare.image"
	labelReason  = "com.mayfly-ci.prepare.failure-reason"
	labelMessage = "com.mayfly-ci.prepare.error"
)

// runPrepare runs prepare_script: the preparation, then the stage's own
// script ("Running on <VM> via <manager>") in the VM's shell, which saves
// a container start. Its output is the preparation's followed by the
// script's.
func (r *Runner) runPrepare(ctx context.Context, s stagerun.Stage, out io.Writer) (int, error) {
	p, err := r.startPrepare(ctx, s.From)
	if err != nil {
		return -1, fmt.Errorf("stage %s: %w", s.ID, err)
	}
	n, err := p.stream(ctx, s.From, out)
	if err != nil {
		return -1, fmt.Errorf("stage %s: %w", s.ID, err)
	}
	if p.err != nil {
		return -1, p.err
	}
	s.From = max(0, s.From-n)
	s.Then = shellChain(s.Then)
	return r.o.Shell.Run(ctx, s, out)
}

// startPrepare returns the job's preparation: the one this process runs,
// the record of one that ended, or a new one. A preparation that was
// interrupted (the manager died) is done again only if nothing of it was
// read (from 0): its output could differ.
func (r *Runner) startPrepare(ctx context.Context, from int64) (*preparation, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.prep != nil {
		return r.prep, nil
	}
	if r.closed {
		return nil, errors.New("the runner is closed")
	}
	p, found, err := r.readRecord(ctx)
	if err != nil {
		return nil, r.engineErr(err)
	}
	if found {
		r.prep = p
		return p, nil
	}
	if from > 0 {
		return nil, fmt.Errorf("%w: the preparation of the job's containers was interrupted", stagerun.ErrLost)
	}
	p = newPreparation()
	pctx, cancel := context.WithCancel(r.ctx)
	p.cancel = cancel
	r.prep = p
	r.wg.Add(1)
	go func() { // owned by the Runner: ends with the preparation, at Stop or Close
		defer r.wg.Done()
		defer cancel()
		image, err := r.prepare(pctx, p)
		if err != nil && pctx.Err() != nil {
			err = fmt.Errorf("preparing the job's containers was stopped: %w", err)
		}
		if rerr := r.writeRecord(context.WithoutCancel(pctx), p, image, err); rerr != nil {
			r.log.Warn("record the preparation", "err", rerr)
		}
		p.finish(image, err)
	}()
	return p, nil
}

// engineErr says, as gitlab-runner does, that the VM's Docker Engine does
// not answer (a VM without Docker, or a dropbear that cannot forward its
// socket): a runner system failure.
func (r *Runner) engineErr(err error) error {
	if !client.IsErrConnectionFailed(err) {
		return err
	}
	return &stagerun.Failure{Reason: runnerapi.FailureRunnerSystemFailure,
		Err: fmt.Errorf("Cannot connect to the Docker daemon at %s on the VM. Is the docker daemon running? (%v)", r.o.Docker.Host, err)}
}

// prepared returns the finished preparation that later stages run on.
func (r *Runner) prepared(ctx context.Context) (*preparation, error) {
	r.mu.Lock()
	p := r.prep
	if p == nil {
		var found bool
		var err error
		p, found, err = r.readRecord(ctx)
		if err != nil {
			r.mu.Unlock()
			return nil, err
		}
		if !found {
			r.mu.Unlock()
			return nil, fmt.Errorf("%w: the job's containers were never prepared", stagerun.ErrLost)
		}
		r.prep = p
	}
	r.mu.Unlock()
	select {
	case <-p.done:
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
	if p.err != nil {
		return nil, fmt.Errorf("%w: preparing the job's containers failed: %v", stagerun.ErrLost, p.err)
	}
	return p, nil
}

// readRecord reads the record of a finished preparation.
func (r *Runner) readRecord(ctx context.Context) (*preparation, bool, error) {
	v, err := r.o.Client.VolumeInspect(ctx, recordVolume(r.job))
	switch {
	case client.IsErrNotFound(err):
		return nil, false, nil
	case err != nil:
		return nil, false, fmt.Errorf("read the job's preparation: %w", err)
	}
	p := newPreparation()
	p.out = []byte(v.Labels[labelOutput])
	p.image = v.Labels[labelImage]
	if msg := v.Labels[labelMessage]; msg != "" {
		p.err = &stagerun.Failure{Reason: v.Labels[labelReason], Err: errors.New(msg)}
	}
	close(p.done)
	return p, true, nil
}

// writeRecord makes the record of a finished preparation.
func (r *Runner) writeRecord(ctx context.Context, p *preparation, image string, perr error) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	p.mu.Lock()
	labels := map[string]string{labelJob: strconv.FormatInt(r.job, 10), labelKind: "prepare", labelOutput: string(p.out), labelImage: image}
	p.mu.Unlock()
	if perr != nil {
		labels[labelMessage] = perr.Error()
		labels[labelReason] = runnerapi.FailureRunnerSystemFailure
		var f *stagerun.Failure
		if errors.As(perr, &f) {
			labels[labelReason] = f.Reason
		}
	}
	_, err := r.o.Client.VolumeCreate(ctx, volume.CreateOptions{Name: recordVolume(r.job), Labels: labels})
	return err
}

// prepare pulls the job's image, makes the job's network and starts the
// services, writing what it does to p. It returns the image ID the stages
// run.
func (r *Runner) prepare(ctx context.Context, p *preparation) (string, error) {
	img, err := r.jobImage()
	if err != nil {
		return "", err
	}
	p.printf("Using Docker executor with image %s ...", img.Name)
	if err := r.checkAllowed(p, img.Name, "images", r.o.Docker.AllowedImages, r.o.Docker.Image); err != nil {
		return "", err
	}
	services := r.services()
	if lim := r.o.Docker.ServicesLimit; lim >= 0 && len(services) > lim {
		return "", &stagerun.Failure{Reason: runnerapi.FailureRunnerConfigurationError,
			Err: fmt.Errorf("too many services requested: %d, only %d allowed", len(services), lim)}
	}
	for _, svc := range services {
		if err := r.checkAllowed(p, svc.Name, "services", r.o.Docker.AllowedServices, ""); err != nil {
			return "", err
		}
	}
	if err := r.ensureNetwork(ctx); err != nil {
		return "", fmt.Errorf("create the job's network: %w", err)
	}
	if err := r.ensureVolumes(ctx); err != nil {
		return "", err
	}
	started, err := r.startServices(ctx, p, services)
	if err != nil {
		return "", err
	}
	r.waitForServices(ctx, p, started)
	id, err := r.getImage(ctx, p, img.Name, img.PullPolicy)
	if err != nil {
		return "", err
	}
	return id, nil
}

// jobImage is the job's image, or the runner's default, with variables
// expanded.
func (r *Runner) jobImage() (runnerapi.Image, error) {
	var img runnerapi.Image
	if j := r.o.Job.Image; j != nil {
		img = *j
	}
	img.Name = r.expand(img.Name)
	if img.Name == "" {
		img.Name = r.expand(r.o.Docker.Image)
	}
	if img.Name == "" {
		return img, &stagerun.Failure{Reason: runnerapi.FailureRunnerConfigurationError, Err: errors.New("no Docker image specified to run the build in")}
	}
	return img, nil
}

// HasImage reports whether a job runs in containers: it names an image,
// or the runner has a default one.
func HasImage(job *runnerapi.JobResponse, d *config.Docker) bool {
	if d == nil {
		return false
	}
	return (job.Image != nil && job.Image.Name != "") || d.Image != ""
}

// services are the job's services with variables expanded.
func (r *Runner) services() []runnerapi.Image {
	out := make([]runnerapi.Image, 0, len(r.o.Job.Services))
	for _, s := range r.o.Job.Services {
		s.Name, s.Alias = r.expand(s.Name), r.expand(s.Alias)
		out = append(out, s)
	}
	return out
}

// checkAllowed checks an image against allowed_images (or
// allowed_services), printing what gitlab-runner prints when it is not.
// The runner's default image is always allowed.
func (r *Runner) checkAllowed(p *preparation, name, what string, globs []string, internal string) error {
	if len(globs) == 0 || (internal != "" && name == r.expand(internal)) {
		return nil
	}
	for _, g := range globs {
		if re, err := config.GlobRegexp(g); err == nil && re.MatchString(name) {
			return nil
		}
	}
	fmt.Fprint(p, "\n"+buildscript.ErrorLine(fmt.Sprintf("The %q image is not present on list of allowed %s:", name, what)))
	for _, g := range globs {
		p.printf("- %s", g)
	}
	fmt.Fprint(p, "\n")
	p.printf("Please check runner's allowed_images configuration")
	return &stagerun.Failure{Reason: runnerapi.FailureRunnerConfigurationError, Err: errors.New("disallowed image")}
}

// ensureNetwork makes the job's network unless it exists.
func (r *Runner) ensureNetwork(ctx context.Context) error {
	name := networkName(r.job)
	if _, err := r.o.Client.NetworkInspect(ctx, name, network.InspectOptions{}); err == nil {
		return nil
	} else if !client.IsErrNotFound(err) {
		return err
	}
	_, err := r.o.Client.NetworkCreate(ctx, name, network.CreateOptions{
		Driver:   "bridge",
		Internal: r.o.InternalNetwork,
		Labels:   map[string]string{labelJob: strconv.FormatInt(r.job, 10), labelKind: "network"},
	})
	return err
}
