package manager

import (
	"context"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/vmexec"
)

// Fleet is what the manager needs from the fleet of one [[runners]] entry.
type Fleet interface {
	// Reserve promises an instance to one job: a ready one (wait 0) or one
	// expected within wait. ok is false when the fleet can promise none;
	// the manager then does not ask GitLab for a job.
	Reserve() (r Reservation, wait time.Duration, ok bool)
}

// Reservation is an instance promised to one job. Exactly one of Acquire
// or Cancel is called.
type Reservation interface {
	// Acquire takes the promised instance, waiting until it is ready or
	// ctx ends.
	Acquire(ctx context.Context) (Lease, error)
	// Cancel gives the promise back: GitLab had no job.
	Cancel()
}

// Lease is one acquired instance.
type Lease interface {
	// ID names the instance, for logs and traces.
	ID() string
	// Connect returns an executor on the instance, which the caller
	// closes: the warm connection made when the instance became ready, if
	// it still answers, or a new one.
	Connect(ctx context.Context) (vmexec.Executor, error)
	// Release ends the lease after a job was started on the instance, whatever
	// its outcome. The fleet deletes the instance when its uses are spent.
	Release(jobFailed bool)
	// Lost is closed when the instance disappeared under the job (preempted,
	// deleted outside mayfly).
	Lost() <-chan struct{}
}

// Claimer is a Fleet that can hand a resumed job the instance its journal
// names (the id, and how to reach it), keeping the instance from the
// clean-up of used instances a restarted fleet does. Claims come before
// the fleet runs.
type Claimer interface {
	Claim(id string, ci providers.ConnectInfo) (Lease, error)
}

// Discarder is a Lease whose instance can be ended as broken: deleted at
// once, whatever its remaining uses (a job failed with
// runner_system_failure on it, or it cannot be reached).
type Discarder interface {
	Discard()
}

// discard ends l as broken when it can say so, else as a failed job.
func discard(l Lease) {
	if d, ok := l.(Discarder); ok {
		d.Discard()
		return
	}
	l.Release(true)
}
