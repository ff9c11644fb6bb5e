package manager

import (
	"context"

	"github.com/mayfly-ci/mayfly/vmexec"
)

// Fleet is what the manager needs from the fleet of one [[runners]] entry.
type Fleet interface {
	// Available returns how many ready instances could be handed out now.
	// The manager asks GitLab for a job only when this is above zero.
	Available() int
	// Acquire reserves a ready instance. It blocks until one is ready or ctx ends.
	Acquire(ctx context.Context) (Lease, error)
}

// Lease is one acquired instance. Exactly one of Unused or Release is called.
type Lease interface {
	// ID names the instance, for logs and traces.
	ID() string
	// Connect opens an executor on the instance.
	Connect(ctx context.Context) (vmexec.Executor, error)
	// Unused gives the instance back: GitLab had no job, so nothing ran on it.
	Unused()
	// Release ends the lease after a job was started on the instance, whatever
	// its outcome. The fleet deletes the instance when its uses are spent.
	Release(jobFailed bool)
	// Lost is closed when the instance disappeared under the job (preempted,
	// deleted outside mayfly).
	Lost() <-chan struct{}
}
