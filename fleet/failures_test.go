package fleet

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/fake"
	"github.com/mayfly-ci/mayfly/schedule"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestCreationFailuresBackOff(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 3}), CreateBackoff: 5 * time.Second, CreateBackoffMax: time.Minute}, fake.Options{})
	h.prov.InjectError(fake.OpCreate, 4, providers.Transient(errors.New("backend busy")))
	h.start()
	h.until(5*time.Minute, time.Second, "pool after failures", func() bool { return h.f.Available() == 3 })
	calls := h.prov.callsOf(OpCreate)
	if len(calls) != 5 {
		t.Fatalf("create calls %d, want 4 failed + 1", len(calls))
	}
	var gaps []time.Duration
	for i := 1; i < len(calls); i++ {
		gaps = append(gaps, calls[i].at.Sub(calls[i-1].at))
	}
	want := []time.Duration{5 * time.Second, 10 * time.Second, 20 * time.Second, 40 * time.Second}
	for i := range want {
		if gaps[i] != want[i] {
			t.Fatalf("gaps between create calls %v, want %v", gaps, want)
		}
	}
	if got := testutil.ToFloat64(h.f.m.errors.WithLabelValues("linux", OpCreate, "transient")); got != 4 {
		t.Errorf("errors{create,transient} = %v", got)
	}
	if st := h.f.Status(); st.Breaker.Failures != 0 {
		t.Errorf("breaker not reset after success: %+v", st.Breaker)
	}
}

func TestQuotaOpensCircuitThenProbes(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 5}), CreateBackoff: 10 * time.Second}, fake.Options{Quota: 2})
	h.start()
	// The first call makes 2 and fails for 3 with a quota error.
	h.until(time.Minute, time.Second, "2 idle", func() bool { return h.f.Available() == 2 })
	if st := h.f.Status(); !st.Breaker.Open {
		t.Fatalf("circuit not open after a quota error: %+v", st.Breaker)
	}
	h.advance(2*time.Minute, time.Second)
	calls := h.prov.callsOf(OpCreate)
	for _, c := range calls[1:] {
		if c.n != 1 {
			t.Fatalf("call while open asked for %d, want probes of 1: %+v", c.n, calls)
		}
	}
	// 10s, 20s, 40s, 80s backoff: at most 4 probes in two minutes.
	if len(calls) > 5 {
		t.Fatalf("%d create calls in 2 minutes of quota errors", len(calls))
	}
	h.prov.SetQuota(0)
	h.until(10*time.Minute, 5*time.Second, "full pool after quota freed", func() bool { return h.f.Available() == 5 })
	if st := h.f.Status(); st.Breaker.Open {
		t.Errorf("circuit still open: %+v", st.Breaker)
	}
}

func TestDeleteRetriedUntilConfirmed(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 1}), DeleteBackoff: time.Second, DeleteBackoffMax: time.Minute}, fake.Options{})
	h.start()
	h.until(time.Minute, time.Second, "1 idle", func() bool { return h.f.Available() == 1 })
	l := h.acquire()
	h.prov.FailDeletes(l.ID(), 3)
	l.Release(JobSucceeded)
	h.settle()
	h.until(time.Minute, 500*time.Millisecond, "deleted", func() bool { return !contains(h.providerIDs(""), l.ID()) })
	var times []time.Time
	for _, c := range h.prov.callsOf(OpDelete) {
		if contains(c.ids, l.ID()) {
			times = append(times, c.at)
		}
	}
	if len(times) != 4 {
		t.Fatalf("delete calls for %s: %d, want 3 failed + 1", l.ID(), len(times))
	}
	for i, want := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second} {
		if got := times[i+1].Sub(times[i]); got < want || got > want+time.Second {
			t.Errorf("retry %d after %v, want %v", i+1, got, want)
		}
	}
	for _, in := range h.f.Status().Instances {
		if in.ID == l.ID() {
			t.Errorf("deleted instance still in the books as %s", in.State)
		}
	}
}

func TestOrphanWithOurLabelsDeleted(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 1})}, fake.Options{})
	h.start()
	h.until(time.Minute, time.Second, "1 idle", func() bool { return h.f.Available() == 1 })
	ctx := context.Background()
	orphan, err := h.prov.Fake.Create(ctx, 1, h.f.Labels())
	if err != nil {
		t.Fatal(err)
	}
	other, err := h.prov.Fake.Create(ctx, 1, map[string]string{providers.LabelManager: "mgr-2", providers.LabelRunner: "linux"})
	if err != nil {
		t.Fatal(err)
	}
	h.advance(2*time.Minute, 10*time.Second)
	ids := h.providerIDs("")
	if contains(ids, orphan[0]) {
		t.Errorf("orphan %s with our labels not deleted", orphan[0])
	}
	if !contains(ids, other[0]) {
		t.Errorf("instance %s of another manager deleted", other[0])
	}
	if got := testutil.ToFloat64(h.f.m.deletions.WithLabelValues("linux", string(ReasonOrphan))); got != 1 {
		t.Errorf("deletions{orphan} = %v", got)
	}
	// The provider's count of our instances matches the books again: the
	// orphan is gone, and the other manager's instance is not ours.
	h.advance(2*time.Minute, 10*time.Second)
	if got := testutil.ToFloat64(h.f.m.atProvider.WithLabelValues("linux")); got != 1 {
		t.Errorf("provider_instances = %v, want 1", got)
	}
	if h.f.Available() != 1 {
		t.Errorf("available %d, want the pool untouched", h.f.Available())
	}
}

func TestOrphanSparedWhileCreateInFlight(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 1}), OrphanGrace: time.Hour}, fake.Options{})
	h.start()
	h.until(time.Minute, time.Second, "1 idle", func() bool { return h.f.Available() == 1 })
	// Simulate a Create call whose answer has not arrived: its instance
	// is listed before the fleet knows its id.
	h.f.mu.Lock()
	h.f.creating++
	h.f.mu.Unlock()
	ids, _ := h.prov.Fake.Create(context.Background(), 1, h.f.Labels())
	h.advance(5*time.Minute, 10*time.Second)
	if !contains(h.providerIDs(""), ids[0]) {
		t.Fatal("instance of an in-flight Create deleted as an orphan")
	}
	h.f.mu.Lock()
	h.f.creating--
	h.f.mu.Unlock()
	h.advance(5*time.Minute, 10*time.Second)
	if contains(h.providerIDs(""), ids[0]) {
		t.Fatal("orphan kept once no Create call was in flight")
	}
}

func TestLostWhileAcquired(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 2})}, fake.Options{})
	h.start()
	h.until(time.Minute, time.Second, "2 idle", func() bool { return h.f.Available() == 2 })
	vanished, preempted := h.acquire(), h.acquire()
	h.prov.Vanish(vanished.ID())
	h.prov.Preempt(preempted.ID())
	h.advance(2*time.Minute, 10*time.Second)
	for _, l := range []*Lease{vanished, preempted} {
		select {
		case <-l.Lost():
		default:
			t.Fatalf("lease %s not lost", l.ID())
		}
	}
	if contains(h.providerIDs(""), preempted.ID()) {
		t.Error("preempted instance not deleted")
	}
	vanished.Release(SystemFailure)
	preempted.Release(SystemFailure)
	h.settle()
	if n := h.count(StateAcquired); n != 0 {
		t.Errorf("%d still acquired", n)
	}
	h.until(time.Minute, time.Second, "pool refilled", func() bool { return h.f.Available() == 2 })
}

func TestIdleInstanceVanishedIsReplaced(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 2})}, fake.Options{})
	h.start()
	h.until(time.Minute, time.Second, "2 idle", func() bool { return h.f.Available() == 2 })
	gone := h.f.Status().Instances[0].ID
	h.prov.Vanish(gone)
	h.advance(2*time.Minute, 10*time.Second)
	if h.f.Available() != 2 {
		t.Fatalf("available %d, want 2", h.f.Available())
	}
	for _, in := range h.f.Status().Instances {
		if in.ID == gone {
			t.Fatal("vanished instance still in the books")
		}
	}
}

func TestBootWatchdog(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 1}), Limits: Limits{BootTimeout: 5 * time.Minute}}, fake.Options{BootDelay: time.Hour})
	h.start()
	first := h.providerIDs("")
	h.advance(5*time.Minute, 30*time.Second)
	if contains(h.providerIDs(""), first[0]) {
		t.Fatal("instance not ready within BootTimeout not deleted")
	}
	if got := testutil.ToFloat64(h.f.m.errors.WithLabelValues("linux", "boot", "boot_timeout")); got != 1 {
		t.Errorf("errors{boot,boot_timeout} = %v", got)
	}
	if st := h.f.Status(); st.Breaker.Failures != 1 {
		t.Errorf("breaker %+v, want one failure", st.Breaker)
	}
	if n := len(h.prov.callsOf(OpCreate)); n < 2 {
		t.Errorf("no replacement created")
	}
}

func TestProvisionerFailureDeletes(t *testing.T) {
	calls := 0
	prov := ProvisionerFunc(func(ctx context.Context, inst providers.Instance, ci providers.ConnectInfo) error {
		calls++
		if ci.ID != inst.ID || inst.Labels[providers.LabelRunner] != "linux" {
			return errors.New("bad arguments")
		}
		if calls == 1 {
			return errors.New("ssh: handshake failed")
		}
		return nil
	})
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 1}), Provisioner: prov, CreateBackoff: time.Second}, fake.Options{})
	h.start()
	first := h.providerIDs("")[0]
	h.until(time.Minute, time.Second, "replacement ready", func() bool { return h.f.Available() == 1 })
	if contains(h.providerIDs(""), first) {
		t.Error("instance whose provisioning failed not deleted")
	}
	if got := testutil.ToFloat64(h.f.m.errors.WithLabelValues("linux", "provision", "provision")); got != 1 {
		t.Errorf("errors{provision} = %v", got)
	}
}

func TestProviderFailedInstanceDeleted(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 2}), CreateBackoff: time.Second}, fake.Options{BootDelay: 5 * time.Second})
	h.prov.FailBoots(1)
	h.start()
	h.until(time.Minute, time.Second, "2 idle", func() bool { return h.f.Available() == 2 })
	if n := len(h.providerIDs(providers.StateFailed)); n != 0 {
		t.Errorf("%d failed instances left at the provider", n)
	}
	if got := testutil.ToFloat64(h.f.m.deletions.WithLabelValues("linux", string(ReasonFailed))); got != 1 {
		t.Errorf("deletions{failed} = %v", got)
	}
}

func TestRateLimitPausesAllCalls(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 2})}, fake.Options{})
	h.prov.InjectError(fake.OpCreate, 1, providers.RateLimited(30*time.Second, errors.New("429")))
	h.start()
	limitedAt := h.prov.callsOf(OpCreate)[0].at
	h.advance(29*time.Second, time.Second)
	for _, op := range []string{OpCreate, OpList, OpDelete} {
		for _, c := range h.prov.callsOf(op) {
			if c.at.After(limitedAt) && c.at.Before(limitedAt.Add(30*time.Second)) {
				t.Fatalf("%s call at +%v during the 30s pause", op, c.at.Sub(limitedAt))
			}
		}
	}
	h.until(time.Minute, time.Second, "pool after the pause", func() bool { return h.f.Available() == 2 })
	if st := h.f.Status(); st.Breaker.Failures != 0 {
		t.Errorf("a rate limit fed the circuit breaker: %+v", st.Breaker)
	}
}
