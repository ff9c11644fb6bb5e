package manager

import (
	"context"
	"net"
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

// Claim implements Claimer: fleet.Claim, before the fleet runs.
func (a fleetAdapter) Claim(id string, ci providers.ConnectInfo) (Lease, error) {
	l, err := a.f.Claim(id)
	if err != nil {
		return nil, err
	}
	return fleetLease{l: l, connect: a.connect, ci: &ci}, nil
}

type fleetLease struct {
	l       *fleet.Lease
	connect ConnectFunc
	ci      *providers.ConnectInfo // a claimed instance's, from the job journal
}

func (l fleetLease) ID() string            { return l.l.ID() }
func (l fleetLease) Lost() <-chan struct{} { return l.l.Lost() }

// ConnectInfo returns how to reach the instance, for the job journal.
func (l fleetLease) ConnectInfo() providers.ConnectInfo {
	if l.ci != nil {
		return *l.ci
	}
	return l.l.ConnectInfo()
}

func (l fleetLease) Connect(ctx context.Context) (vmexec.Executor, error) {
	if e, ok := l.l.Attachment().(vmexec.Executor); ok && e != nil && answers(ctx, e) {
		return lend(e), nil
	}
	return l.connect(ctx, l.ConnectInfo())
}

// Discard implements Discarder.
func (l fleetLease) Discard() { l.l.Release(fleet.SystemFailure) }

// pinger is an executor that can tell whether its connection still answers.
type pinger interface {
	Ping(ctx context.Context) error
}

// answers reports whether e's connection still answers; an executor that
// cannot tell (WinRM speaks plain requests) is taken to.
func answers(ctx context.Context, e vmexec.Executor) bool {
	p, ok := e.(pinger)
	return !ok || p.Ping(ctx) == nil
}

// borrowed is a warm connection lent to a job: the fleet closes it with
// the instance, so the job's Close does not.
type borrowed struct{ vmexec.Executor }

func (borrowed) Close() error { return nil }

// Stream runs cmd with the connection's Stream when it has one.
func (b borrowed) Stream(ctx context.Context, cmd vmexec.Command) (int, error) {
	if s, ok := b.Executor.(vmexec.Streamer); ok {
		return s.Stream(ctx, cmd)
	}
	return b.Run(ctx, cmd)
}

// borrowedDialer is a borrowed connection that also opens connections
// from the VM (for the Docker Engine of image: jobs).
type borrowedDialer struct {
	borrowed
	d vmDialer
}

func (b borrowedDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return b.d.DialContext(ctx, network, addr)
}

// lend wraps a warm connection for a job, keeping what it can do.
func lend(e vmexec.Executor) vmexec.Executor {
	if d, ok := e.(vmDialer); ok {
		return borrowedDialer{borrowed{e}, d}
	}
	return borrowed{e}
}

// isBorrowed reports whether e is a warm connection lent to the job.
func isBorrowed(e vmexec.Executor) bool {
	switch e.(type) {
	case borrowed, borrowedDialer:
		return true
	}
	return false
}

func (l fleetLease) Release(jobFailed bool) {
	if jobFailed {
		l.l.Release(fleet.JobFailed)
		return
	}
	l.l.Release(fleet.JobSucceeded)
}
