package manager

import (
	"context"
	"time"

	"github.com/mayfly-ci/mayfly/fleet"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/vmexec"
)

// ConnectFunc opens an executor on an instance.
type ConnectFunc func(ctx context.Context, ci providers.ConnectInfo) (vmexec.Executor, error)

// FromFleet makes a fleet usable by the manager; connect opens executors on
// its instances.
func FromFleet(f *fleet.Fleet, connect ConnectFunc) Fleet {
	return fleetAdapter{f: f, connect: connect}
}

type fleetAdapter struct {
	f       *fleet.Fleet
	connect ConnectFunc
}

func (a fleetAdapter) Reserve() (Reservation, time.Duration, bool) {
	r, wait, ok := a.f.Reserve()
	if !ok {
		return nil, 0, false
	}
	return fleetReservation{r: r, connect: a.connect}, wait, true
}

type fleetReservation struct {
	r       *fleet.Reservation
	connect ConnectFunc
}

func (r fleetReservation) Cancel() { r.r.Cancel() }

func (r fleetReservation) Acquire(ctx context.Context) (Lease, error) {
	l, err := r.r.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	return fleetLease{l: l, connect: r.connect}, nil
}

type fleetLease struct {
	l       *fleet.Lease
	connect ConnectFunc
}

func (l fleetLease) ID() string            { return l.l.ID() }
func (l fleetLease) Lost() <-chan struct{} { return l.l.Lost() }

func (l fleetLease) Connect(ctx context.Context) (vmexec.Executor, error) {
	return l.connect(ctx, l.l.ConnectInfo())
}

func (l fleetLease) Release(jobFailed bool) {
	if jobFailed {
		l.l.Release(fleet.JobFailed)
		return
	}
	l.l.Release(fleet.JobSucceeded)
}
