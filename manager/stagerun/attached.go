package stagerun

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/mayfly-ci/mayfly/vmexec"
)

// Attached runs each stage as one command on Exec, attached to the
// connection, for transports that cannot detach a stage (WinRM today):
// when the context ends the command is killed at once, and a stage cannot
// be found again by another Runner or manager process (Run returns ErrLost).
// Stage.Then is ignored.
type Attached struct {
	// Exec runs the commands.
	Exec vmexec.Executor
	// Shell interprets the scripts; empty is the transport's default.
	Shell string

	mu      sync.Mutex
	started map[string]bool
	running map[string]*attachedRun
}

type attachedRun struct {
	cancel context.CancelCauseFunc
	done   chan struct{}
}

var _ Runner = (*Attached)(nil)

// errStopped is the cause of a stage context ended by Stop.
var errStopped = errors.New("stage stopped")

// Run implements Runner.
func (a *Attached) Run(ctx context.Context, s Stage, out io.Writer) (int, error) {
	a.mu.Lock()
	if a.started == nil {
		a.started, a.running = map[string]bool{}, map[string]*attachedRun{}
	}
	if a.started[s.ID] || s.From > 0 {
		a.mu.Unlock()
		return -1, fmt.Errorf("stage %s: %w: it ran attached to a connection and cannot be followed again", s.ID, ErrLost)
	}
	a.started[s.ID] = true
	rctx, cancel := context.WithCancelCause(ctx)
	run := &attachedRun{cancel: cancel, done: make(chan struct{})}
	a.running[s.ID] = run
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.running, s.ID)
		a.mu.Unlock()
		cancel(nil)
		close(run.done)
	}()
	code, err := a.Exec.Run(rctx, vmexec.Command{Script: s.Script, Shell: a.Shell, Env: s.Env, Stdout: out, Stderr: out})
	switch {
	case err == nil:
		return code, nil
	case ctx.Err() != nil:
		return -1, fmt.Errorf("stage %s: %w", s.ID, context.Cause(ctx))
	case errors.Is(context.Cause(rctx), errStopped):
		return -1, fmt.Errorf("stage %s: %w", s.ID, errStopped)
	}
	return -1, fmt.Errorf("stage %s: %w", s.ID, err)
}

// Stop implements Runner: it kills a stage still running and waits for
// its Run to return.
func (a *Attached) Stop(ctx context.Context, id string) error {
	a.mu.Lock()
	run := a.running[id]
	a.mu.Unlock()
	if run == nil {
		return nil
	}
	run.cancel(errStopped)
	select {
	case <-run.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("stop stage %s: %w", id, context.Cause(ctx))
	}
}
