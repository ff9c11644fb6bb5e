package manager

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"path"
	"sync"
	"time"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/stagerun"
	"github.com/mayfly-ci/mayfly/vmexec"
	"github.com/mayfly-ci/mayfly/vmexec/detach"
)

// jobRunner is the job's stage runner as the manager uses it: every Run
// of a stage is timed as that stage's phase, and once the VM is lost
// (lost closed) nothing more is asked of it.
//
// The first byte of output any stage writes asks the trace to go out at
// once (firstOutput), rather than at the next trace interval.
type jobRunner struct {
	stagerun.Runner
	now         func() time.Time
	phases      *phaseLog
	lost        <-chan struct{}
	firstOutput *sync.Once
	flush       func()
	handover    func() bool // the manager hands its jobs over: stop nothing
}

func (t jobRunner) Run(ctx context.Context, s stagerun.Stage, out io.Writer) (int, error) {
	if t.isLost() {
		return -1, fmt.Errorf("stage %s: %w: the VM is gone", s.ID, stagerun.ErrLost)
	}
	start := t.now()
	defer func() {
		_, name, _, _ := stagerun.ParseStageID(s.ID)
		t.phases.since(stagePhase(buildscript.StageName(name)), start)
	}()
	if t.firstOutput != nil && t.flush != nil {
		out = &onFirstWrite{w: out, once: t.firstOutput, f: t.flush}
	}
	return t.Runner.Run(ctx, s, out)
}

// onFirstWrite calls f after the first non-empty write through it.
type onFirstWrite struct {
	w    io.Writer
	once *sync.Once
	f    func()
}

func (o *onFirstWrite) Write(p []byte) (int, error) {
	n, err := o.w.Write(p)
	if n > 0 {
		o.once.Do(o.f)
	}
	return n, err
}

func (t jobRunner) Stop(ctx context.Context, id string) error {
	if t.isLost() {
		return nil // nothing runs on a VM that is gone
	}
	if t.handover != nil && t.handover() {
		return errors.New("the manager hands the job over: its stages run on")
	}
	return t.Runner.Stop(ctx, id)
}

func (t jobRunner) isLost() bool {
	select {
	case <-t.lost:
		return true
	default:
		return false
	}
}

// detachedRunner is a detach.Runner seen as a stagerun.Runner.
type detachedRunner struct{ r *detach.Runner }

func toDetach(s stagerun.Stage) detach.Stage {
	d := detach.Stage{ID: s.ID, Script: s.Script, Env: s.Env, From: s.From}
	for _, n := range s.Then {
		d.Then = append(d.Then, toDetach(n))
	}
	return d
}

func (d detachedRunner) Run(ctx context.Context, s stagerun.Stage, out io.Writer) (int, error) {
	code, err := d.r.Run(ctx, toDetach(s), out)
	if errors.Is(err, detach.ErrLost) {
		err = fmt.Errorf("%w: %w", stagerun.ErrLost, err)
	}
	return code, err
}

func (d detachedRunner) Stop(ctx context.Context, id string) error { return d.r.Stop(ctx, id) }

// detachable reports whether stages of this shell can run detached.
func detachable(shell string) bool {
	return shell == buildscript.ShellSh || shell == buildscript.ShellBash
}

// jobDir is where a job's detached stages keep their files on the VM: under
// the builds directory, named by the job and a random part, so that jobs
// sharing a machine (only in tests: VMs are single-use) never meet.
func jobDir(plan *buildscript.Plan, jobID int64) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return path.Join(plan.BuildsDir, ".mayfly", fmt.Sprintf("job-%d-%x", jobID, b))
}

// newStageRunner returns the runner of a job's stages on exec: detached
// for POSIX shells, attached otherwise. redial opens a new connection.
func (m *Manager) newStageRunner(plan *buildscript.Plan, dir string, exec vmexec.Executor, redial func(context.Context) (vmexec.Executor, error)) (stagerun.Runner, func(), error) {
	if !detachable(plan.Shell) {
		return &stagerun.Attached{Exec: exec, Shell: plan.Shell}, func() {}, nil
	}
	scripts := make([]string, 0, len(plan.Stages))
	for _, st := range plan.Stages {
		scripts = append(scripts, st.Script)
	}
	files := make([]detach.File, 0, len(plan.Files))
	for _, f := range plan.Files {
		files = append(files, detach.File{Path: f.Path, Content: f.Content})
	}
	r, err := detach.New(detach.Options{
		Dir: dir, Shell: plan.Shell, Scripts: scripts, Files: files,
		Exec: exec, Redial: redial, Logger: m.log,
	})
	if err != nil {
		return nil, nil, err
	}
	return detachedRunner{r}, func() { r.Close() }, nil
}
