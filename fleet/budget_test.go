package fleet

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/fake"
	"github.com/mayfly-ci/mayfly/schedule"
)

// listingProvider is the fake with connect info in its list, as a
// provider whose list API tells how to reach each running instance.
type listingProvider struct{ *recProvider }

func (p listingProvider) List(ctx context.Context) ([]providers.Instance, error) {
	list, err := p.recProvider.List(ctx)
	for i := range list {
		if list[i].State == providers.StateRunning {
			ci, cerr := p.Fake.ConnectInfo(ctx, list[i].ID)
			if cerr == nil {
				list[i].ConnectInfo = &ci
			}
		}
	}
	return list, err
}

// launchingProvider is the fake as a providers.Launcher: Create returns
// each instance with its connect info.
type launchingProvider struct{ *recProvider }

func (p launchingProvider) Launch(ctx context.Context, n int, labels map[string]string) ([]providers.Instance, error) {
	ids, err := p.recProvider.Create(ctx, n, labels)
	out := make([]providers.Instance, 0, len(ids))
	for _, id := range ids {
		ci, cerr := p.Fake.ConnectInfo(ctx, id)
		if cerr != nil {
			return out, cerr
		}
		out = append(out, providers.Instance{ID: id, State: providers.StateCreating, ConnectInfo: &ci})
	}
	return out, err
}

// bootWait is a Provisioner that waits, on the fleet's clock (Sleep), until
// the fake reports the instance running, checking every second, as a
// provisioner waits for SSH.
type bootWait struct {
	fk     *fake.Fake
	boot   time.Duration    // when set, the first check waits until the boot should be over
	now    func() time.Time // the fleet's clock, with boot
	checks atomic.Int64
}

func (b *bootWait) Provision(ctx context.Context, inst providers.Instance, ci providers.ConnectInfo) error {
	if b.boot > 0 {
		if err := Sleep(ctx, inst.CreatedAt.Add(b.boot).Sub(b.now())); err != nil {
			return err
		}
	}
	for {
		b.checks.Add(1)
		list, _ := b.fk.List(ctx) // the instance's own port, not a provider API call
		for _, in := range list {
			if in.ID == inst.ID && in.State == providers.StateRunning {
				return nil
			}
		}
		if err := Sleep(ctx, time.Second); err != nil {
			return err
		}
	}
}

// TestConnectInfoFromList: a provider whose list carries connect info
// costs no ConnectInfo call per instance.
func TestConnectInfoFromList(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 3})}, fake.Options{BootDelay: 20 * time.Second})
	h.f.api.prov = listingProvider{h.prov}
	h.start()
	h.until(2*time.Minute, time.Second, "3 idle", func() bool { return h.f.Available() == 3 })
	if n := h.f.Status().APICalls[OpConnectInfo]; n != 0 {
		t.Errorf("%d ConnectInfo calls, want 0: the list told how to reach every instance", n)
	}
}

// TestLauncherNeedsNoListToBoot: a providers.Launcher gives connect info
// with the instance, so the provisioner waits for it to boot and no list
// is read for that (only the periodic one, every ListInterval) and no
// ConnectInfo call is made. The wait runs on the fleet's fake clock
// through Sleep.
func TestLauncherNeedsNoListToBoot(t *testing.T) {
	const boot = 45 * time.Second
	bw := &bootWait{}
	h := newHarness(t, Config{
		Schedule:    idlePolicy(schedule.Policy{IdleCount: 2}),
		Provisioner: bw,
		Limits:      Limits{ListInterval: time.Minute, ListIntervalBooting: 2 * time.Second},
	}, fake.Options{BootDelay: boot})
	bw.fk = h.prov.Fake
	h.f.api.prov = launchingProvider{h.prov}
	h.start()
	start := h.clk.Now()
	h.until(2*time.Minute, time.Second, "2 idle", func() bool { return h.f.Available() == 2 })
	if took := h.clk.Now().Sub(start); took > boot+2*time.Second {
		t.Errorf("pool ready after %v, want within a boot (%v) and a provisioner check", took, boot)
	}
	calls := h.f.Status().APICalls
	if calls[OpConnectInfo] != 0 || calls[OpList] > 2 || calls[OpCreate] != 1 {
		t.Errorf("calls %v; want 1 create, no connect_info, at most 2 lists (start-up and one periodic)", calls)
	}
	if n := bw.checks.Load(); n < int64(boot/time.Second) {
		t.Errorf("provisioner checked %d times, want one a second during the boot", n)
	}
}

// TestLossNoticedWithinListInterval: an acquired instance preempted while
// nothing boots is noticed within one ListInterval (the issue asks for two
// update intervals), and the lease's holder is told.
func TestLossNoticedWithinListInterval(t *testing.T) {
	const every = 30 * time.Second
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 1}), Limits: Limits{ListInterval: every}}, fake.Options{})
	h.start()
	h.until(time.Minute, time.Second, "1 idle", func() bool { return h.f.Available() == 1 })
	l := h.acquire()
	h.advance(10*time.Second, time.Second) // the pool's replacement is up: nothing boots
	h.prov.Preempt(l.ID())
	at := h.clk.Now()
	h.until(2*every, time.Second, "loss noticed", func() bool {
		select {
		case <-l.Lost():
			return true
		default:
			return false
		}
	})
	if took := h.clk.Now().Sub(at); took > every+time.Second {
		t.Errorf("preemption noticed after %v, want within one ListInterval (%v)", took, every)
	}
	l.Release(SystemFailure)
}

// TestSleepWithoutFleetUsesWallClock: outside a fleet's provisioning,
// Sleep waits on the wall clock and honours ctx.
func TestSleepWithoutFleetUsesWallClock(t *testing.T) {
	start := time.Now()
	if err := Sleep(context.Background(), 5*time.Millisecond); err != nil || time.Since(start) < 5*time.Millisecond {
		t.Errorf("Sleep returned %v after %v", err, time.Since(start))
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Sleep(ctx, time.Hour); err == nil {
		t.Error("Sleep on an ended context returned nil")
	}
}

// TestBatchedCalls: a burst of jobs taken one request at a time costs one
// Create call for their replacements, and jobs ending within the delete
// window cost one Delete call.
func TestBatchedCalls(t *testing.T) {
	h := newHarness(t, Config{
		Schedule:          idlePolicy(schedule.Policy{IdleCount: 5, IdleTime: time.Hour}),
		CreateBatchWindow: time.Second,
		DeleteBatchWindow: 5 * time.Second,
	}, fake.Options{BootDelay: 10 * time.Second})
	h.start()
	h.until(time.Minute, time.Second, "5 idle", func() bool { return h.f.Available() == 5 })
	creates := len(h.prov.callsOf(OpCreate))
	var leases []*Lease
	for range 5 {
		leases = append(leases, h.acquire())
		h.advance(100*time.Millisecond, 100*time.Millisecond) // GitLab's next answer
	}
	h.until(time.Minute, time.Second, "pool refilled", func() bool { return h.f.Available() == 5 })
	if got := h.prov.callsOf(OpCreate)[creates:]; len(got) != 1 || got[0].n != 5 {
		t.Errorf("replacements of a burst of 5: Create calls %+v, want one for 5", got)
	}
	deletes := len(h.prov.callsOf(OpDelete))
	for _, l := range leases {
		l.Release(JobSucceeded)
		h.advance(time.Second, time.Second)
	}
	h.advance(10*time.Second, time.Second)
	if got := h.prov.callsOf(OpDelete)[deletes:]; len(got) != 1 || got[0].n != 5 {
		t.Errorf("5 jobs ending within 5s: Delete calls %+v, want one for 5", got)
	}
}

// TestDeleteWindowYieldsToMaxInstances: instances being deleted count
// toward MaxInstances, so a deletion waiting in DeleteBatchWindow for
// others to join its call goes out at once when creation is held at the
// cap; without that, the pool stayed empty for the whole window (the
// warm-start benchmark's 20 quick jobs waited 3s at max_instances = 10).
func TestDeleteWindowYieldsToMaxInstances(t *testing.T) {
	for _, max := range []int{2, 0} {
		h := newHarness(t, Config{
			Schedule:          idlePolicy(schedule.Policy{IdleCount: 2, IdleTime: time.Hour}),
			Limits:            Limits{MaxInstances: max},
			DeleteBatchWindow: 5 * time.Second,
		}, fake.Options{})
		h.start()
		h.until(time.Minute, time.Second, "2 idle", func() bool { return h.f.Available() == 2 })
		a, b := h.acquire(), h.acquire()
		deletes := len(h.prov.callsOf(OpDelete))
		a.Release(JobSucceeded)
		b.Release(JobSucceeded)
		h.settle()
		h.advance(time.Second, time.Second) // well within the window
		got, deleted := len(h.prov.callsOf(OpDelete))-deletes, 0
		for _, c := range h.prov.callsOf(OpDelete)[deletes:] {
			deleted += c.n
		}
		switch {
		case max > 0 && deleted != 2:
			// One call, or two when the scaler ran between the releases.
			t.Errorf("max_instances %d reached by 2 deleting: %d deleted in %d calls within 1s, want both at once", max, deleted, got)
		case max > 0 && h.f.Available() != 2:
			t.Errorf("max_instances %d: pool %d after the deletion, want it refilled to 2", max, h.f.Available())
		case max == 0 && got != 0:
			t.Errorf("no cap: %d Delete calls within 1s, want the window kept (0)", got)
		}
		h.stop()
	}
}

// TestWaitingJobsDoNotWaitForTheBatchWindow: jobs waiting for an instance
// on an empty fleet are created for within waitingCreateWindow, in one
// call when their requests follow each other at once; the full
// CreateBatchWindow (1s here) is only for the idle pool.
func TestWaitingJobsDoNotWaitForTheBatchWindow(t *testing.T) {
	h := newHarness(t, Config{
		Schedule:          idlePolicy(schedule.Policy{IdleCount: 0}),
		CreateBatchWindow: time.Second,
	}, fake.Options{BootDelay: 10 * time.Second})
	h.start()
	creates := len(h.prov.callsOf(OpCreate))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	leases := make(chan *Lease, 2)
	for i := range 2 {
		go func() {
			if l, err := h.f.Acquire(ctx); err == nil {
				leases <- l
			}
		}()
		deadline := time.Now().Add(5 * time.Second)
		for h.f.Status().Reserved != i+1 {
			if time.Now().After(deadline) {
				t.Fatalf("Acquire %d is not waiting after 5s", i+1)
			}
			time.Sleep(time.Millisecond)
		}
		h.advance(40*time.Millisecond, 10*time.Millisecond) // the next request of the same poll
	}
	h.advance(100*time.Millisecond, 10*time.Millisecond)
	if got := h.prov.callsOf(OpCreate)[creates:]; len(got) != 1 || got[0].n != 2 {
		t.Fatalf("180ms after two jobs began to wait: Create calls %+v, want one for 2", got)
	}
	// The fleet's side on fake time; the Acquire callers are this test's
	// own goroutines, which fake time does not wait for.
	h.until(time.Minute, time.Second, "both jobs served", func() bool { return h.count(StateAcquired) == 2 })
	for i := range 2 {
		select {
		case l := <-leases:
			l.Release(JobSucceeded)
		case <-time.After(10 * time.Second):
			t.Fatalf("lease %d: Acquire did not return 10s after the fleet handed it out", i+1)
		}
	}
}

// TestFastBootsAreListedSoon: instances that run as soon as they are
// created (a provider that boots faster than ListIntervalBooting, and
// gives no connect info with Create) are found by the lists of the ramp
// after their creation (within twice the boot, or a sixteenth of
// ListIntervalBooting), not the booting cadence, at a cost of at most
// bootRampSteps more lists per Create call; a slow boot keeps the usual
// cadence once one was seen.
func TestFastBootsAreListedSoon(t *testing.T) {
	const every = 2 * time.Second
	for _, tc := range []struct {
		name      string
		boot      time.Duration
		readyWith time.Duration // creation to idle, at most
		lists     int           // per refill, at most
	}{
		{"instant", 0, every/16 + 10*time.Millisecond, bootRampSteps},
		{"300ms", 300 * time.Millisecond, 2*300*time.Millisecond + 10*time.Millisecond, bootRampSteps}, // the ramp doubles
		{"slow", 20 * time.Second, 20*time.Second + every, 20/2 + 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, Config{
				Schedule: idlePolicy(schedule.Policy{IdleCount: 1}),
				Limits:   Limits{ListInterval: time.Minute, ListIntervalBooting: every},
			}, fake.Options{BootDelay: tc.boot})
			h.start()
			h.until(time.Minute, 10*time.Millisecond, "first idle", func() bool { return h.f.Available() == 1 })
			for round := range 3 {
				creates, lists := len(h.prov.callsOf(OpCreate)), len(h.prov.callsOf(OpList))
				l := h.acquire()
				h.until(time.Minute, 10*time.Millisecond, "refill created", func() bool { return len(h.prov.callsOf(OpCreate)) > creates })
				created := h.prov.callsOf(OpCreate)[creates].at
				h.until(time.Minute, 10*time.Millisecond, "refill idle", func() bool { return h.f.Available() == 1 })
				if took := h.clk.Now().Sub(created); took > tc.readyWith {
					t.Errorf("round %d: idle %v after its creation, want within %v", round, took, tc.readyWith)
				}
				if n := len(h.prov.callsOf(OpList)) - lists; n > tc.lists {
					t.Errorf("round %d: %d lists for one refill, want at most %d", round, n, tc.lists)
				}
				l.Release(JobSucceeded)
			}
		})
	}
}

func TestBootRamp(t *testing.T) {
	const every = 1600 * time.Millisecond // steps of 100ms: 100, 200, 400, 800
	c := t0
	ms := func(n int) time.Time { return c.Add(time.Duration(n) * time.Millisecond) }
	for _, tc := range []struct {
		name    string
		created time.Time
		last    time.Time
		want    time.Time
		ok      bool
	}{
		{"nothing created", time.Time{}, ms(0), time.Time{}, false},
		{"listed before the creation", c, ms(-500), ms(100), true},
		{"after the first step", c, ms(100), ms(200), true},
		{"between steps", c, ms(250), ms(400), true},
		{"a list just before a step waits a step", c, ms(390), ms(490), true},
		{"after the last step", c, ms(800), time.Time{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := bootRamp(tc.created, tc.last, every)
			if ok != tc.ok || !got.Equal(tc.want) {
				t.Errorf("bootRamp = %v, %v; want %v, %v", got.Sub(c), ok, tc.want.Sub(c), tc.ok)
			}
		})
	}
}
