package fleet

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers/fake"
	"github.com/mayfly-ci/mayfly/schedule"
)

func TestBootTimes(t *testing.T) {
	var b BootTimes
	if b.Mean() != 0 || b.Median() != 0 || b.Shortest() != 0 {
		t.Fatal("empty BootTimes should report 0")
	}
	for _, s := range []int{50, 40, 45, 300} {
		b.Observe(time.Duration(s) * time.Second)
	}
	if got := b.Median(); got != 50*time.Second {
		t.Errorf("median = %v, want 50s (upper middle of 40 45 50 300)", got)
	}
	if got := b.Mean(); got != 108750*time.Millisecond {
		t.Errorf("mean = %v, want 108.75s", got)
	}
	if got := b.Shortest(); got != 40*time.Second {
		t.Errorf("shortest = %v", got)
	}
	for range bootSamples {
		b.Observe(10 * time.Second)
	}
	if b.Median() != 10*time.Second || b.Shortest() != 10*time.Second {
		t.Errorf("after %d new samples the old ones should be gone: median %v", bootSamples, b.Median())
	}
}

func TestReservable(t *testing.T) {
	t0 := time.Date(2026, 11, 23, 10, 0, 0, 0, time.UTC)
	inst := func(st State, createdAgo time.Duration) InstanceView {
		return InstanceView{ID: st.String() + createdAgo.String(), State: st, CreatedAt: t0.Add(-createdAgo)}
	}
	idle := func() InstanceView { return inst(StateIdle, time.Hour) }
	pool := schedule.Policy{IdleCount: 5, IdleTime: time.Hour}
	window := Limits{OnDemandWithin: 90 * time.Second}
	for _, tt := range []struct {
		name     string
		snap     Snapshot
		p        schedule.Policy
		l        Limits
		boot     time.Duration
		wantOK   bool
		wantWait time.Duration
	}{
		{"idle and unpromised", Snapshot{Instances: []InstanceView{idle()}}, pool, Limits{}, 0, true, 0},
		{"idle but promised, on demand off", Snapshot{Instances: []InstanceView{idle()}, Reserved: 1}, pool, Limits{}, 45 * time.Second, false, 0},
		{"no boot measured yet: taken, a minute expected", Snapshot{}, pool, window, 0, true, time.Minute},
		{"new instance within the window", Snapshot{}, pool, window, 45 * time.Second, true, 45 * time.Second},
		{"boots slower than the window are still taken (no runaway queue)", Snapshot{}, pool, window, 300 * time.Second, true, 300 * time.Second},
		{"slow boot on its way beyond the window, a new one allowed: the sooner", Snapshot{Instances: []InstanceView{inst(StateCreating, 100*time.Second)}}, pool, window, 300 * time.Second, true, 200 * time.Second},
		{"slow boot on its way beyond the window, no new one allowed: refused", Snapshot{Instances: []InstanceView{inst(StateCreating, 100*time.Second)}}, pool, Limits{OnDemandWithin: 90 * time.Second, MaxInstances: 1}, 300 * time.Second, false, 0},
		{"on its way within the window although no new one is allowed", Snapshot{Instances: []InstanceView{inst(StateCreating, 250*time.Second)}}, pool, Limits{OnDemandWithin: 90 * time.Second, MaxInstances: 1}, 300 * time.Second, true, 50 * time.Second},
		{"one booting, 30s left", Snapshot{Instances: []InstanceView{inst(StateCreating, 15*time.Second)}}, pool, window, 45 * time.Second, true, 30 * time.Second},
		{"booting one already promised: a new one", Snapshot{Instances: []InstanceView{inst(StateCreating, 15*time.Second)}, Reserved: 1}, pool, window, 45 * time.Second, true, 45 * time.Second},
		{"earliest created serves the first promise", Snapshot{Instances: []InstanceView{inst(StateProvisioning, 40*time.Second), inst(StateCreating, 5*time.Second)}, Reserved: 1}, pool, window, 45 * time.Second, true, 40 * time.Second},
		{"late boot: expected now", Snapshot{Instances: []InstanceView{inst(StateCreating, 2*time.Minute)}}, pool, window, 45 * time.Second, true, 0},
		{"slow boot on its way counts if within the window", Snapshot{Instances: []InstanceView{inst(StateCreating, 250*time.Second)}}, pool, window, 300 * time.Second, true, 50 * time.Second},
		{"requested ones come after created ones", Snapshot{Requested: 1, Instances: []InstanceView{inst(StateCreating, 10*time.Second)}, Reserved: 1}, pool, window, 45 * time.Second, true, 45 * time.Second},
		{"MaxInstances reached", Snapshot{Instances: []InstanceView{inst(StateAcquired, time.Hour)}}, pool, Limits{OnDemandWithin: time.Minute, MaxInstances: 1}, 45 * time.Second, false, 0},
		{"unbacked promises count against MaxGrowthRate", Snapshot{Reserved: 1}, pool, Limits{OnDemandWithin: time.Minute, MaxGrowthRate: 1}, 45 * time.Second, false, 0},
		{"MaxGrowthRate leaves room", Snapshot{}, pool, Limits{OnDemandWithin: time.Minute, MaxGrowthRate: 1}, 45 * time.Second, true, 45 * time.Second},
		{"creation backoff", Snapshot{Breaker: Breaker{Failures: 1, RetryAt: t0.Add(time.Minute)}}, pool, window, 45 * time.Second, false, 0},
		{"IdleCount 0: always on demand, even slow and unmeasured", Snapshot{}, schedule.Policy{}, Limits{}, 0, true, time.Minute},
		{"IdleCount 0: slow boots too", Snapshot{Reserved: 3}, schedule.Policy{}, Limits{}, 300 * time.Second, true, 300 * time.Second},
		{"IdleCount 0: still bounded by MaxInstances", Snapshot{Reserved: 1}, schedule.Policy{}, Limits{MaxInstances: 1}, 45 * time.Second, false, 0},
		{"idle instance with its uses spent is not free", Snapshot{Instances: []InstanceView{{ID: "x", State: StateIdle, Uses: 1}}}, pool, Limits{}, 0, false, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tt.snap.Now = t0
			wait, ok := Reservable(tt.snap, tt.p, tt.l, tt.boot)
			if ok != tt.wantOK || wait != tt.wantWait {
				t.Fatalf("Reservable = %v, %v; want %v, %v", wait, ok, tt.wantWait, tt.wantOK)
			}
		})
	}
}

// TestReserveOnDemand: with an idle pool of 1 and a 45 s boot, a job is
// taken on demand when the pool is promised away, and the scaler creates
// an instance for it once the job comes (Acquire waits), not for a
// promise GitLab had no job for.
func TestReserveOnDemand(t *testing.T) {
	h := newHarness(t, Config{
		Schedule: idlePolicy(schedule.Policy{IdleCount: 1, IdleTime: time.Hour}),
		Limits:   Limits{OnDemandWithin: 90 * time.Second},
	}, fake.Options{BootDelay: 45 * time.Second})
	h.start()
	r0, wait, ok := h.f.Reserve()
	if !ok || wait != time.Minute {
		t.Fatalf("Reserve before any boot was measured = %v, %v; want the pool's instance on its way, about a minute", wait, ok)
	}
	r0.Cancel()
	h.until(5*time.Minute, time.Second, "1 idle", func() bool { return h.f.Available() == 1 })

	r1, wait, ok := h.f.Reserve()
	if !ok || wait != 0 {
		t.Fatalf("first Reserve = %v, %v; want the idle instance", wait, ok)
	}
	if h.f.Available() != 0 {
		t.Fatalf("available %d after a promise of the only idle instance", h.f.Available())
	}
	r2, wait, ok := h.f.Reserve()
	if !ok || wait < 40*time.Second || wait > 50*time.Second {
		t.Fatalf("second Reserve = %v, %v; want on demand, about one boot time", wait, ok)
	}
	r3, _, ok := h.f.Reserve()
	if !ok {
		t.Fatal("third Reserve refused with no limit and a 45 s boot")
	}
	r3.Cancel() // GitLab had no job for it
	h.settle()
	if got := h.count(StateCreating) + h.count(StateRequested); got != 0 {
		t.Fatalf("%d instances on their way for promises whose jobs have not come, want 0", got)
	}

	l1, err := r1.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan *Lease, 1)
	go func() {
		l, err := r2.Acquire(context.Background())
		if err != nil {
			t.Error(err)
		}
		got <- l
	}()
	h.waitForWaiters(1)
	h.settle()
	if got := h.count(StateCreating) + h.count(StateRequested); got != 2 {
		t.Fatalf("%d on their way, want 2: the pool's replacement and one for the waiting job", got)
	}
	h.until(5*time.Minute, time.Second, "on-demand job served", func() bool { return h.count(StateAcquired) == 2 })
	l2 := <-got
	if l2 == nil || l2.ID() == l1.ID() {
		t.Fatalf("second lease %v, first %s", l2, l1.ID())
	}
	if _, err := r1.Acquire(context.Background()); err == nil {
		t.Error("a reservation served twice")
	}
	l1.Release(JobSucceeded)
	l2.Release(JobSucceeded)
	// The pool refills to its target; the canceled promises left nothing behind.
	h.until(5*time.Minute, time.Second, "pool back to 1", func() bool {
		return h.f.Available() == 1 && h.count(StateCreating)+h.count(StateRequested) == 0
	})
	st := h.f.Status()
	if st.Reserved != 0 {
		t.Errorf("reserved = %d at the end", st.Reserved)
	}
	if c := len(h.prov.callsOf(OpCreate)); c > 3 {
		t.Errorf("%d Create calls, want at most 3 (pool, replacement, the waiting job)", c)
	}
}

// TestEmptyPollDoesNotChurn: a promise of an idle instance that GitLab has
// no job for must not make the scaler create a replacement.
func TestEmptyPollDoesNotChurn(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 2, IdleTime: time.Hour})}, fake.Options{BootDelay: 10 * time.Second})
	h.start()
	h.until(time.Minute, time.Second, "2 idle", func() bool { return h.f.Available() == 2 })
	creates := len(h.prov.callsOf(OpCreate))
	for range 50 {
		r, _, ok := h.f.Reserve()
		if !ok {
			t.Fatal("Reserve refused with 2 idle")
		}
		h.settle()
		r.Cancel()
		h.settle()
	}
	if got := len(h.prov.callsOf(OpCreate)); got != creates {
		t.Fatalf("50 empty polls made %d Create calls, want none", got-creates)
	}
}

// TestWaitersServedInOrder: instances that become ready while jobs wait go
// to the waiters in the order they began to wait (issue 20: all waiters
// used to wake at once and race, and the first could starve).
func TestWaitersServedInOrder(t *testing.T) {
	const n = 5
	h := newHarness(t, Config{
		Schedule: idlePolicy(schedule.Policy{IdleCount: 0}),
		Limits:   Limits{MaxGrowthRate: 1}, // one instance becomes ready at a time
	}, fake.Options{BootDelay: 10 * time.Second})
	h.start()
	type served struct {
		waiter int
		l      *Lease
	}
	got := make(chan served, n)
	for i := range n {
		go func() {
			l, err := h.f.Acquire(context.Background())
			if err != nil {
				t.Error(err)
			}
			got <- served{i, l}
		}()
		h.waitForWaiters(i + 1) // the next waiter starts only once this one waits
	}
	var order []int
	wallDeadline := time.Now().Add(20 * time.Second)
	for len(order) < n && time.Now().Before(wallDeadline) {
		h.settle()
		h.clk.Advance(time.Second)
		select {
		case s := <-got: // a served waiter commits to the journal on disk: wall time
			order = append(order, s.waiter)
			s.l.Release(JobSucceeded)
		case <-time.After(20 * time.Millisecond):
		}
	}
	if !slices.Equal(order, []int{0, 1, 2, 3, 4}) {
		t.Errorf("waiters served in order %v, want first come first served", order)
	}
	if c := len(h.prov.callsOf(OpCreate)); c != n {
		t.Errorf("%d Create calls for %d waiters, want %d", c, n, n)
	}
}

// TestHandedOverToCanceledWaiterGoesToNext: an instance handed to a waiter
// whose context ends at that moment goes to the next waiter, unused.
func TestHandedOverToCanceledWaiterGoesToNext(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 0}), Limits: Limits{MaxGrowthRate: 1}}, fake.Options{BootDelay: 10 * time.Second})
	h.start()
	ctx1, cancel1 := context.WithCancel(context.Background())
	err1 := make(chan error, 1)
	go func() {
		l, err := h.f.Acquire(ctx1)
		if l != nil {
			t.Error("a canceled waiter got a lease")
		}
		err1 <- err
	}()
	h.waitForWaiters(1)
	got2 := make(chan *Lease, 1)
	go func() {
		l, err := h.f.Acquire(context.Background())
		if err != nil {
			t.Error(err)
		}
		got2 <- l
	}()
	h.waitForWaiters(2)
	cancel1()
	if err := <-err1; !errors.Is(err, context.Canceled) {
		t.Fatalf("canceled waiter: %v", err)
	}
	h.until(5*time.Minute, time.Second, "second waiter served", func() bool { return h.count(StateAcquired) == 1 })
	l := <-got2
	if l == nil {
		t.Fatal("no lease")
	}
	l.Release(JobSucceeded)
	h.settle()
	if st := h.f.Status(); st.Reserved != 0 {
		t.Errorf("reserved = %d at the end", st.Reserved)
	}
}

// waitForWaiters waits (in wall time, bounded) until n Acquire calls are
// blocked waiting for an instance.
func (h *harness) waitForWaiters(n int) {
	h.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		h.f.mu.Lock()
		w := len(h.f.waiters)
		h.f.mu.Unlock()
		if w == n {
			return
		}
		time.Sleep(100 * time.Microsecond)
	}
	h.t.Fatalf("%d waiters not reached within 5s", n)
}

// TestSlowBootsWaitingJobsWasteNothing is issue 20's repro at the fleet
// level: boots of 20 s, IdleCount 0 and IdleTime unset, two job slots and
// four one-second jobs. Every job must run, on at most four instances, none
// deleted unused, each starting within one boot time plus check_interval of
// its pick-up (GitLab's answer). GitLab's answer takes requestLatency
// between the promise and the acquisition: an instance may become ready in
// between.
func TestSlowBootsWaitingJobsWasteNothing(t *testing.T) {
	for _, latency := range []time.Duration{0, 25 * time.Second} {
		t.Run(fmt.Sprintf("request_latency=%v", latency), func(t *testing.T) { slowBootsWasteNothing(t, latency) })
	}
}

func slowBootsWasteNothing(t *testing.T, requestLatency time.Duration) {
	const (
		jobs      = 4
		slots     = 2
		boot      = 20 * time.Second
		checkIntv = 3 * time.Second
	)
	h := newHarness(t, Config{
		Schedule: idlePolicy(schedule.Policy{IdleCount: 0}),
		Limits:   Limits{CheckInterval: checkIntv},
	}, fake.Options{BootDelay: boot})
	h.start()

	type slot struct {
		busy     bool
		pickedUp time.Time
		lease    chan *Lease
		l        *Lease
		started  time.Time
	}
	var ss [slots]slot
	done, taken := 0, 0
	var starts []time.Duration
	wallDeadline := time.Now().Add(30 * time.Second)
	for done < jobs {
		if time.Now().After(wallDeadline) || h.clk.Now().Sub(t0) > 10*time.Minute {
			t.Fatalf("%d of %d jobs done at %v; status %+v", done, jobs, h.clk.Now().Sub(t0), h.f.Status())
		}
		now := h.clk.Now()
		for i := range ss {
			s := &ss[i]
			switch {
			case !s.busy && taken < jobs:
				r, _, ok := h.f.Reserve()
				if !ok {
					continue
				}
				taken++
				s.busy, s.pickedUp, s.l = true, now, nil
				s.lease = make(chan *Lease, 1)
				acquireAt := now.Add(requestLatency)
				go func() {
					for h.clk.Now().Before(acquireAt) {
						time.Sleep(100 * time.Microsecond)
					}
					l, err := r.Acquire(context.Background())
					if err != nil {
						t.Error(err)
					}
					s.lease <- l
				}()
			case s.busy && s.l == nil:
				select {
				case s.l = <-s.lease:
					s.started = now
					starts = append(starts, now.Sub(s.pickedUp))
				case <-time.After(20 * time.Millisecond): // the journal write is wall time
				}
			case s.busy && now.Sub(s.started) >= time.Second:
				s.l.Release(JobSucceeded)
				s.busy = false
				done++
			}
		}
		h.settle()
		h.clk.Advance(time.Second)
	}
	h.settle()
	st := h.f.Status()
	if st.DeletedUnusedWhileWaiting != 0 {
		t.Errorf("%d instances deleted unused while jobs waited", st.DeletedUnusedWhileWaiting)
	}
	created := 0
	for _, c := range h.prov.callsOf(OpCreate) {
		created += len(c.ids)
	}
	if created > jobs {
		t.Errorf("%d instances created for %d jobs with IdleCount 0", created, jobs)
	}
	for i, d := range starts {
		// GitLab hands the job out when its answer comes (requestLatency
		// after the promise); an instance is created for it then, not for
		// the promise (most promises end in an empty poll).
		if d > requestLatency+boot+checkIntv+time.Second { // one tick of this loop
			t.Errorf("job %d started %v after the promise, want within GitLab's answer (%v) + a boot (%v) + check_interval", i, d, requestLatency, boot)
		}
	}
}
