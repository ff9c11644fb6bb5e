package fleet

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
)

// maxDeleteBatch caps the ids of one Delete call.
const maxDeleteBatch = 500

// create runs one Create call for n instances.
func (f *Fleet) create(ctx context.Context, n int) {
	start := f.clock.Now()
	made, err := f.api.Create(ctx, n, f.labels)
	f.mu.Lock()
	now := f.clock.Now()
	f.requested -= n
	f.counts[StateRequested] -= n
	f.creating--
	for i := range made {
		id := made[i].ID
		if old := f.books[id]; old != nil {
			f.log.Error("provider returned an id already in the books", "instance", id, "state", old.state)
			continue
		}
		in := f.addLocked(id, StateCreating, now)
		in.requestedAt = start
		if ci := made[i].ConnectInfo; ci != nil {
			// Launched with its connect info: wait for SSH or WinRM now.
			f.startProvisionLocked(in, ci)
		}
	}
	if err != nil {
		_, rateLimited := providers.IsRateLimited(err)
		_, quota := providers.IsQuotaExceeded(err)
		_, capacity := providers.IsCapacityExhausted(err)
		if !rateLimited && ctx.Err() == nil {
			f.breaker.Fail(now, quota || capacity, f.cfg.CreateBackoff, f.cfg.CreateBackoffMax)
		}
		f.log.Warn("create instances failed", "requested", n, "created", len(made), "kind", providers.KindOf(err), "failures", f.breaker.Failures, "retry_at", f.breaker.RetryAt, "error", err)
	} else {
		f.log.Info("instances created", "count", len(made))
	}
	f.mu.Unlock()
	f.kick()
}

// dispatchDeletesLocked starts one batched Delete call once a deletion is
// due, and reports the next due time through at. A new deletion is due
// DeleteBatchWindow after it was decided; the call then takes every
// deletion not backing off from a failure, due or not, so that instances
// deleted close together cost one call. When roomWanted (creation is held
// at MaxInstances, which counts instances being deleted), a deletion
// waiting only for others to join its call is due at once: the window
// spares API calls, it must not keep a job from an instance.
func (f *Fleet) dispatchDeletesLocked(ctx context.Context, now time.Time, at func(time.Time), roomWanted bool) {
	if f.counts[StateDeleting] == 0 {
		return
	}
	var ids []string
	due := false
	var next time.Time
	for _, in := range f.books {
		if in.state != StateDeleting || in.delInFlight {
			continue
		}
		if !now.Before(in.delNext) || (roomWanted && in.delFailures == 0) {
			due = true
		} else if next.IsZero() || in.delNext.Before(next) {
			next = in.delNext
		}
		if in.delFailures == 0 || !now.Before(in.delNext) {
			ids = append(ids, in.id)
		}
	}
	if !next.IsZero() {
		at(next)
	}
	if !due || f.deleting || ctx.Err() != nil || len(ids) == 0 {
		return
	}
	slices.Sort(ids)
	if len(ids) > maxDeleteBatch {
		ids = ids[:maxDeleteBatch]
		at(now) // the rest in the next call
	}
	for _, id := range ids {
		f.books[id].delInFlight = true
	}
	f.deleting = true
	f.spawn(func() { f.deleteBatch(ctx, ids) })
}

// deleteBatch runs one Delete call; the ids the provider did not confirm
// are retried with backoff.
func (f *Fleet) deleteBatch(ctx context.Context, ids []string) {
	done, err := f.api.Delete(ctx, ids)
	f.mu.Lock()
	now := f.clock.Now()
	confirmed := make(map[string]bool, len(done))
	for _, id := range done {
		confirmed[id] = true
	}
	failed := 0
	for _, id := range ids {
		in := f.books[id]
		if in == nil {
			continue
		}
		in.delInFlight = false
		if in.state != StateDeleting {
			continue
		}
		if confirmed[id] {
			f.goneLocked(in)
			continue
		}
		failed++
		in.delFailures++
		in.delNext = now.Add(Backoff(f.cfg.DeleteBackoff, f.cfg.DeleteBackoffMax, in.delFailures))
	}
	f.deleting = false
	f.mu.Unlock()
	if err != nil || failed > 0 {
		f.log.Warn("delete instances: not all confirmed; retrying later", "requested", len(ids), "confirmed", len(done), "error", err)
	}
	f.flushGone()
	f.kick()
}

// provision makes an instance ready: connect info (unless the provider
// gave it with the instance: known), then the provisioner. Transient
// connect-info errors are retried until the boot watchdog cancels ctx.
func (f *Fleet) provision(ctx context.Context, in *instance, inst providers.Instance, known *providers.ConnectInfo) {
	var ci providers.ConnectInfo
	var err error
	op := OpConnectInfo
	if known != nil {
		ci = *known
	}
	for attempt := 1; known == nil; attempt++ {
		ci, err = f.api.ConnectInfo(ctx, in.id)
		switch {
		case err == nil && ci.Protocol == providers.ProtocolSSH && ci.HostKey == "":
			// Some clouds publish the SSH host key only after boot (GCE guest
			// attributes, EC2 console output). The key is pinned, never trusted
			// on first use, so ask again until it appears or the boot watchdog
			// gives up.
			err = providers.Transient(fmt.Errorf("instance %s: no SSH host key published yet", in.id))
		case err == nil && ci.Protocol == providers.ProtocolWinRM && len(ci.TLSCert) == 0:
			// The same for the WinRM certificate, which the startup script
			// publishes once the HTTPS listener exists.
			err = providers.Transient(fmt.Errorf("instance %s: no WinRM certificate published yet", in.id))
		}
		if err == nil || !providers.IsTransient(err) || ctx.Err() != nil {
			break
		}
		if f.sleep(ctx, Backoff(time.Second, 30*time.Second, attempt)) != nil {
			break
		}
	}
	if err == nil {
		if err = ci.Validate(); err != nil {
			err = providers.Permanent(err)
		}
	}
	var attach Attachment
	if err == nil && f.cfg.Provisioner != nil {
		op = "provision"
		attach, err = f.provisionAttach(ctx, inst, ci)
	}
	f.mu.Lock()
	if in.state != StateProvisioning {
		f.mu.Unlock()
		if attach != nil {
			attach.Close()
		}
		return // deleted meanwhile (boot watchdog, shutdown, vanished)
	}
	in.attach = attach
	in.cancel = nil
	if err != nil {
		kind := providers.KindOf(err).String()
		if op == "provision" {
			kind = "provision"
		}
		f.failLocked(in, op, kind, err)
	} else {
		now := f.clock.Now()
		in.ci = ci
		in.idleSince = now
		if !in.requestedAt.IsZero() {
			f.m.creation.WithLabelValues(f.cfg.Name).Observe(now.Sub(in.requestedAt).Seconds())
			f.demand.Booted(now.Sub(in.createdAt))
		}
		f.breaker.Succeed(in.createdAt)
		f.becomeIdleLocked(in, false)
		f.log.Info("instance ready", "instance", in.id)
	}
	f.mu.Unlock()
	f.kick()
}

// startProvisionLocked moves in from creating to provisioning and starts
// making it ready; ci is its connect info when the provider gave it (nil:
// ask). A connect info that does not validate is ignored.
func (f *Fleet) startProvisionLocked(in *instance, ci *providers.ConnectInfo) {
	if ci != nil && ci.Validate() != nil {
		f.log.Warn("provider gave connect info that does not validate; asking for it", "instance", in.id, "error", ci.Validate())
		ci = nil
	}
	if !f.setStateLocked(in, StateProvisioning) || f.stopped {
		return
	}
	ctx, cancel := context.WithCancel(context.WithValue(f.runCtx, sleepKey{}, f.sleep))
	in.cancel = cancel
	inst := f.instanceOf(in)
	f.spawn(func() {
		defer cancel()
		f.provision(ctx, in, inst, ci)
	})
}

type sleepKey struct{}

// Sleep waits d or until ctx ends, and returns ctx's error if it ended
// first. Called by a Provisioner with the context the fleet gave it, it
// waits on the fleet's clock, so that a fleet on a fake clock (tests, the
// simulator) replays the wait in virtual time; with any other context it
// waits on the wall clock.
func Sleep(ctx context.Context, d time.Duration) error {
	if sleep, ok := ctx.Value(sleepKey{}).(func(context.Context, time.Duration) error); ok {
		return sleep(ctx, d)
	}
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
