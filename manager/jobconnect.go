package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/gitlab"
	"github.com/mayfly-ci/mayfly/vmexec"
)

// connectTimeout bounds reaching a job's VM (its warm connection checked,
// or a new one dialled) before the VM counts as unreachable.
const connectTimeout = time.Minute

// connectJob returns an executor on lease's VM: the warm connection made
// when the VM became ready, if it still answers, or a new one, its host key
// pinned. When the VM cannot be reached it is discarded and, once, another
// is taken for the job. It returns the lease in use: the one it was given
// or its replacement.
func (m *Manager) connectJob(r *runner, lease Lease, tr *gitlab.JobTrace, out io.Writer, phases *phaseLog, log *slog.Logger) (Lease, vmexec.Executor, error) {
	for attempt := 1; ; attempt++ {
		ctx, cancel := context.WithCancelCause(m.jobsCtx)
		ctx, stop := context.WithTimeout(ctx, connectTimeout)
		lost := lease.Lost()
		go func() {
			select {
			case <-tr.Canceled():
				cancel(errCanceled)
			case <-lost:
				cancel(errInstanceLost)
			case <-ctx.Done():
			}
		}()
		start := m.now()
		exec, err := lease.Connect(ctx)
		phase := PhaseConnect
		if isBorrowed(exec) {
			phase = PhaseReadyCheck
		}
		phases.since(phase, start)
		cause := context.Cause(ctx)
		stop()
		cancel(nil)
		switch {
		case err == nil:
			return lease, exec, nil
		case errors.Is(cause, errCanceled) || errors.Is(cause, ErrAborted):
			return lease, nil, cause
		case attempt == 2:
			return lease, nil, fmt.Errorf("cannot reach the VM %s either: %w", lease.ID(), err)
		}
		log.Warn("the job's VM cannot be reached; taking another", "instance", lease.ID(), "err", err)
		fmt.Fprint(out, buildscript.LogLine(fmt.Sprintf("The VM %s cannot be reached; taking another one", lease.ID())))
		discard(lease)
		res, wait, ok := r.fleet.Reserve()
		if !ok {
			return nil, nil, fmt.Errorf("cannot reach the VM %s (%v), and no other VM can be had now", lease.ID(), err)
		}
		next, aerr := m.acquire(r, res, wait, tr, out)
		if aerr != nil {
			return nil, nil, fmt.Errorf("cannot reach the VM %s (%v), and no other VM came: %w", lease.ID(), err, aerr)
		}
		lease = next
	}
}
