package fleet

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/fake"
	"github.com/mayfly-ci/mayfly/schedule"
)

func TestIdlePoolReachesAndHoldsIdleCount(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 5, IdleTime: 30 * time.Minute})}, fake.Options{BootDelay: 30 * time.Second})
	h.start()
	if got := h.count(StateCreating); got != 5 {
		t.Fatalf("after start: %d creating, want 5", got)
	}
	if c := h.prov.callsOf(OpCreate); len(c) != 1 || c[0].n != 5 {
		t.Fatalf("create calls %+v, want one call for 5", c)
	}
	if h.f.Available() != 0 {
		t.Fatal("available before boot")
	}
	h.until(time.Minute, time.Second, "5 idle", func() bool { return h.f.Available() == 5 })

	// Hold for two hours: no churn.
	h.advance(2*time.Hour, time.Minute)
	if h.f.Available() != 5 || h.count(StateIdle) != 5 {
		t.Fatalf("after 2h: available %d", h.f.Available())
	}
	if n := len(h.prov.callsOf(OpCreate)); n != 1 {
		t.Errorf("create calls = %d, want 1", n)
	}
	if n := len(h.prov.callsOf(OpDelete)); n != 0 {
		t.Errorf("delete calls = %d, want 0", n)
	}
	if n := len(h.prov.callsOf(OpList)); n > 2*60+30 {
		t.Errorf("list calls = %d in 2h, want about one a minute once steady", n)
	}
	if got := testutil.ToFloat64(h.f.m.states.WithLabelValues("linux", "idle")); got != 5 {
		t.Errorf("states{idle} = %v", got)
	}
	if got := testutil.ToFloat64(h.f.m.idleTarget.WithLabelValues("linux")); got != 5 {
		t.Errorf("idle target gauge = %v", got)
	}
	if got := testutil.ToFloat64(h.f.m.calls.WithLabelValues("linux", OpCreate)); got != 1 {
		t.Errorf("calls{create} = %v", got)
	}
	if n := testutil.CollectAndCount(h.reg, "gitlab_runner_autoscaling_machine_creation_duration_seconds"); n != 1 {
		t.Errorf("creation histogram series = %d", n)
	}
	// Every instance carries the fleet's identity.
	for _, in := range h.prov.Instances() {
		if in.Labels[providers.LabelManager] != "mgr-1" || in.Labels[providers.LabelRunner] != "linux" {
			t.Errorf("instance %s labels %v", in.ID, in.Labels)
		}
	}
}

func TestAcquireSingleUseDeletesAndReplaces(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 2})}, fake.Options{})
	h.start()
	h.until(time.Minute, time.Second, "2 idle", func() bool { return h.f.Available() == 2 })

	l := h.acquire()
	id := l.ID()
	if err := l.ConnectInfo().Validate(); err != nil {
		t.Fatalf("lease connect info: %v", err)
	}
	if l.Instance().ID != id || l.Instance().Labels[providers.LabelManager] != "mgr-1" {
		t.Fatalf("lease instance %+v", l.Instance())
	}
	if h.count(StateAcquired) != 1 || h.f.Available() != 1 {
		t.Fatalf("acquired %d available %d", h.count(StateAcquired), h.f.Available())
	}
	l.Release(JobSucceeded)
	l.Release(JobFailed) // second call does nothing
	l.Unused()
	h.settle()
	if ids := h.providerIDs(""); contains(ids, id) {
		t.Fatalf("released instance %s still at the provider: %v", id, ids)
	}
	h.until(time.Minute, time.Second, "pool refilled", func() bool { return h.f.Available() == 2 })
	for range 2 {
		l2 := h.acquire()
		if l2.ID() == id {
			t.Fatalf("instance %s handed out again", id)
		}
		defer l2.Release(JobSucceeded)
	}
}

func TestUnusedReturnsToIdleUncounted(t *testing.T) {
	// IdleTime keeps the pool as it is while the refill made for the
	// acquired instance makes it one too many once the instance is back:
	// with none, a surplus instance idle since an earlier moment of the
	// fake clock is deleted, as it should be.
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 2, IdleTime: time.Hour})}, fake.Options{})
	h.start()
	h.until(time.Minute, time.Second, "2 idle", func() bool { return h.f.Available() == 2 })
	l := h.acquire()
	l.Unused()
	h.settle()
	if h.f.Available() != 2 || len(h.prov.callsOf(OpDelete)) != 0 {
		t.Fatalf("after Unused: available %d, deletes %d", h.f.Available(), len(h.prov.callsOf(OpDelete)))
	}
	l2 := h.acquire()
	if l2.ID() != l.ID() {
		t.Fatalf("Unused instance lost its place: got %s, want %s", l2.ID(), l.ID())
	}
	l2.Release(JobFailed) // first and only job: deleted
	h.settle()
	if contains(h.providerIDs(""), l.ID()) {
		t.Fatal("instance not deleted after its one job")
	}
}

func TestMaxUsesReuseThenDelete(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 1}), Limits: Limits{MaxUses: 2}}, fake.Options{})
	h.start()
	h.until(time.Minute, time.Second, "1 idle", func() bool { return h.f.Available() == 1 })
	l := h.acquire()
	l.Release(JobSucceeded)
	h.settle()
	if h.f.Available() != 1 {
		t.Fatal("instance with a use left not idle again")
	}
	l2 := h.acquire()
	if l2.ID() != l.ID() {
		t.Fatalf("got %s, want the reused %s", l2.ID(), l.ID())
	}
	l2.Release(JobSucceeded)
	h.settle()
	if contains(h.providerIDs(""), l.ID()) {
		t.Fatal("instance not deleted after MaxUses jobs")
	}

	// A system failure deletes at once, uses left or not.
	h.until(time.Minute, time.Second, "refill", func() bool { return h.f.Available() == 1 })
	l3 := h.acquire()
	l3.Release(SystemFailure)
	h.settle()
	if contains(h.providerIDs(""), l3.ID()) {
		t.Fatal("instance kept after a system failure")
	}
	if got := testutil.ToFloat64(h.f.m.deletions.WithLabelValues("linux", string(ReasonSystemFailure))); got != 1 {
		t.Errorf("deletions{system_failure} = %v", got)
	}
}

// hostedSchedule mirrors the hosted Linux fleet's periods, scaled down:
// default 5, weekends 7, the 03:30–04:30 spike 20.
func hostedSchedule(t *testing.T) schedule.Schedule {
	t.Helper()
	per := func(exprs ...string) []schedule.Period {
		var out []schedule.Period
		for _, e := range exprs {
			p, err := schedule.ParsePeriod(e, time.UTC)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, p)
		}
		return out
	}
	return schedule.Schedule{
		Default: schedule.Policy{IdleCount: 5, IdleTime: time.Hour},
		Entries: []schedule.Entry{
			{Periods: per("* * * * * sat,sun *"), Policy: schedule.Policy{IdleCount: 7, IdleTime: time.Hour}},
			{Periods: per("* 30-59 3 * * * *", "* 0-30 4 * * * *"), Policy: schedule.Policy{IdleCount: 20, IdleTime: 10 * time.Minute}},
		},
	}
}

func TestPeriodChangeMovesTarget(t *testing.T) {
	friday := time.Date(2026, 3, 6, 23, 58, 0, 0, time.UTC)
	h := newHarness(t, Config{Schedule: hostedSchedule(t), Clock: newClock(friday)}, fake.Options{BootDelay: 10 * time.Second})
	h.start()
	h.until(time.Minute, time.Second, "weekday pool", func() bool { return h.f.Available() == 5 })
	if st := h.f.Status(); st.IdleTarget != 5 || st.PolicyEntry != schedule.NoEntry {
		t.Fatalf("friday: target %d entry %d", st.IdleTarget, st.PolicyEntry)
	}

	// Saturday 00:00: the weekend entry asks for 7.
	h.clk.AdvanceTo(time.Date(2026, 3, 7, 0, 0, 0, 0, time.UTC))
	h.settle()
	if st := h.f.Status(); st.IdleTarget != 7 || st.PolicyEntry != 0 {
		t.Fatalf("saturday: target %d entry %d", st.IdleTarget, st.PolicyEntry)
	}
	h.until(time.Minute, time.Second, "weekend pool", func() bool { return h.f.Available() == 7 })

	// 03:30: the spike.
	h.clk.AdvanceTo(time.Date(2026, 3, 7, 3, 30, 0, 0, time.UTC))
	h.settle()
	if st := h.f.Status(); st.IdleTarget != 20 || st.PolicyEntry != 1 {
		t.Fatalf("03:30: target %d entry %d", st.IdleTarget, st.PolicyEntry)
	}
	h.until(time.Minute, time.Second, "spike pool", func() bool { return h.f.Available() == 20 })

	// After 04:30 the weekend policy is back. Every idle instance has been
	// idle for over its IdleTime (1h): the 13 surplus go at once, the
	// longest idle (the weekend pool from 00:00) first.
	weekendPool := h.f.Status().Instances[:7]
	h.clk.AdvanceTo(time.Date(2026, 3, 7, 4, 31, 0, 0, time.UTC))
	h.settle()
	if st := h.f.Status(); st.IdleTarget != 7 || h.f.Available() != 7 {
		t.Fatalf("04:31: target %d available %d, want 7 and 7", st.IdleTarget, h.f.Available())
	}
	for _, in := range weekendPool {
		for _, now := range h.f.Status().Instances {
			if now.ID == in.ID {
				t.Errorf("instance %s idle since 00:00 kept over younger ones", in.ID)
			}
		}
	}
	if got := testutil.ToFloat64(h.f.m.deletions.WithLabelValues("linux", string(ReasonIdleTime))); got != 13 {
		t.Errorf("deletions{idle_time} = %v, want 13", got)
	}
}

func TestIdleScaleFactorAndIdleTime(t *testing.T) {
	policy := schedule.Policy{IdleCount: 10, IdleCountMin: 2, ScaleFactor: 1.0, IdleTime: 10 * time.Minute}
	h := newHarness(t, Config{Schedule: idlePolicy(policy)}, fake.Options{})
	h.start()
	h.until(time.Minute, time.Second, "IdleCountMin", func() bool { return h.f.Available() == 2 })
	h.advance(5*time.Minute, time.Minute)
	if h.f.Available() != 2 {
		t.Fatalf("with nothing in use: %d idle, want IdleCountMin 2", h.f.Available())
	}
	var leases []*Lease
	for range 4 {
		leases = append(leases, h.acquire())
		h.until(time.Minute, time.Second, "scaled", func() bool {
			return h.f.Available() >= min(max(2, len(leases)), 10)
		})
	}
	if st := h.f.Status(); st.IdleTarget != 4 || h.f.Available() != 4 {
		t.Fatalf("4 in use: target %d available %d, want 4 and 4", st.IdleTarget, h.f.Available())
	}
	idleIDs := func() []string {
		var ids []string
		for _, in := range h.f.Status().Instances {
			if in.State == StateIdle {
				ids = append(ids, in.ID)
			}
		}
		return ids
	}
	before := idleIDs() // sorted by creation: the oldest idle first
	for _, l := range leases {
		l.Release(JobSucceeded)
	}
	h.settle()
	if st := h.f.Status(); st.IdleTarget != 2 {
		t.Fatalf("after release: target %d, want 2", st.IdleTarget)
	}
	h.advance(9*time.Minute, time.Minute)
	if h.f.Available() != 4 {
		t.Fatalf("surplus removed before IdleTime: %d", h.f.Available())
	}
	h.advance(5*time.Minute, time.Minute)
	after := idleIDs()
	if len(after) != 2 {
		t.Fatalf("after IdleTime: %d idle, want 2", len(after))
	}
	// The two that became idle first are the ones removed.
	if contains(after, before[0]) || contains(after, before[1]) {
		t.Errorf("kept %v of %v: want the newest kept", after, before)
	}
}

func TestMaxGrowthRateNeverExceeded(t *testing.T) {
	const rate = 3
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 20}), Limits: Limits{MaxGrowthRate: rate}}, fake.Options{BootDelay: 7 * time.Second})
	h.start()
	maxSeen := 0
	for i := 0; i < 200 && h.f.Available() < 20; i++ {
		st := h.f.Status()
		inflight := st.Counts["requested"] + st.Counts["creating"] + st.Counts["provisioning"]
		atProvider := len(h.providerIDs(providers.StateCreating))
		maxSeen = max(maxSeen, inflight, atProvider)
		if inflight > rate || atProvider > rate {
			t.Fatalf("step %d: %d in flight in the books, %d creating at the provider; MaxGrowthRate %d", i, inflight, atProvider, rate)
		}
		h.advance(time.Second, time.Second)
	}
	if h.f.Available() != 20 {
		t.Fatalf("pool %d, want 20", h.f.Available())
	}
	if maxSeen != rate {
		t.Errorf("max in flight %d, want the limit %d reached", maxSeen, rate)
	}
	for _, c := range h.prov.callsOf(OpCreate) {
		if c.n > rate {
			t.Errorf("create call for %d > MaxGrowthRate", c.n)
		}
	}
	if st := h.f.Status(); st.Held != "" {
		t.Errorf("held %q at target", st.Held)
	}
}

func TestMaxInstancesCap(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 10}), Limits: Limits{MaxInstances: 4}}, fake.Options{})
	h.start()
	h.advance(time.Minute, time.Second)
	if n := len(h.providerIDs("")); n != 4 || h.f.Available() != 4 {
		t.Fatalf("%d at provider, %d available; want 4", n, h.f.Available())
	}
	if st := h.f.Status(); st.Held != HeldMaxInstances {
		t.Errorf("held %q", st.Held)
	}
}

func TestDeleteOnShutdown(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 3}), DeleteOnShutdown: true}, fake.Options{})
	h.start()
	h.until(time.Minute, time.Second, "3 idle", func() bool { return h.f.Available() == 3 })
	l := h.acquire()
	h.stop()
	if ids := h.providerIDs(""); len(ids) != 1 || ids[0] != l.ID() {
		t.Fatalf("after shutdown the provider holds %v, want only the leased %s", ids, l.ID())
	}
	if _, err := h.f.Acquire(context.Background()); !errors.Is(err, ErrStopped) {
		t.Fatalf("Acquire after Run: %v, want ErrStopped", err)
	}
	if h.f.Available() != 0 {
		t.Fatal("available after Run")
	}
}

func TestAcquireWaitsAndCounts(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 0})}, fake.Options{BootDelay: 10 * time.Second})
	h.start()
	got := make(chan *Lease, 1)
	go func() {
		l, err := h.f.Acquire(context.Background())
		if err != nil {
			t.Error(err)
		}
		got <- l
	}()
	// The waiter is demand: one instance is created although IdleCount is 0.
	deadline := time.Now().Add(5 * time.Second)
	for h.f.Status().Reserved == 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Microsecond)
	}
	h.settle()
	h.until(time.Minute, time.Second, "waiter served", func() bool { return h.count(StateAcquired) == 1 })
	var l *Lease
	select {
	case l = <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("Acquire did not return")
	}
	l.Release(JobSucceeded)
	if got := testutil.ToFloat64(h.f.m.waits.WithLabelValues("linux")); got != 1 {
		t.Errorf("waits = %v", got)
	}
	// A cancelled wait returns the context's error.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := h.f.Acquire(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Acquire with a cancelled context: %v", err)
	}
}

func TestConfigErrorsNameTheField(t *testing.T) {
	fk, _ := fake.New(fake.Options{})
	for _, tt := range []struct {
		cfg  Config
		want string
	}{
		{Config{ManagerID: "m", Provider: fk}, "Name"},
		{Config{Name: "r", Provider: fk}, "ManagerID"},
		{Config{Name: "r", ManagerID: "m"}, "Provider"},
		{Config{Name: "r", ManagerID: "m", Provider: fk, Limits: Limits{MaxGrowthRate: -1}}, "MaxGrowthRate"},
		{Config{Name: "r", ManagerID: "m", Provider: fk, Limits: Limits{BootTimeout: -time.Second}}, "BootTimeout"},
	} {
		_, err := New(tt.cfg)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("New(%+v) = %v, want an error naming %s", tt.cfg, err, tt.want)
		}
	}
}

func TestRunTwice(t *testing.T) {
	h := newHarness(t, Config{}, fake.Options{})
	h.start()
	if err := h.f.Run(context.Background()); err == nil {
		t.Fatal("second Run returned nil")
	}
}

func contains(ids []string, id string) bool {
	for _, x := range ids {
		if x == id {
			return true
		}
	}
	return false
}

// An SSH host key published only after boot is waited for, never skipped:
// the instance becomes ready once the key appears, and an instance whose key
// never appears is deleted by the boot watchdog.
func TestWaitsForPublishedHostKey(t *testing.T) {
	tests := []struct {
		name      string
		emptyFor  int // ConnectInfo calls answered without a host key
		wantReady bool
	}{
		{"key appears on the fourth call", 3, true},
		{"key never appears", 1 << 30, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pub, priv, err := ed25519.GenerateKey(rand.Reader)
			if err != nil {
				t.Fatal(err)
			}
			block, err := ssh.MarshalPrivateKey(priv, "")
			if err != nil {
				t.Fatal(err)
			}
			privPEM := pem.EncodeToMemory(block)
			sshPub, err := ssh.NewPublicKey(pub)
			if err != nil {
				t.Fatal(err)
			}
			hostKey := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sshPub)))
			var mu sync.Mutex
			calls := map[string]int{}
			ci := func(id string) (providers.ConnectInfo, error) {
				mu.Lock()
				defer mu.Unlock()
				calls[id]++
				c := providers.ConnectInfo{ID: id, Address: "127.0.0.1", Port: 22, Protocol: providers.ProtocolSSH, OS: "linux", Arch: "amd64", Username: "root", PrivateKey: privPEM}
				if calls[id] > tt.emptyFor {
					c.HostKey = hostKey
				}
				return c, nil
			}
			h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 1}), Limits: Limits{BootTimeout: 5 * time.Minute}}, fake.Options{ConnectInfo: ci})
			h.start()
			first := h.providerIDs("")
			h.advance(6*time.Minute, 10*time.Second)
			ready := h.f.Available() == 1 && contains(h.providerIDs(""), first[0])
			if ready != tt.wantReady {
				t.Errorf("first instance ready = %v, want %v (ConnectInfo calls %v)", ready, tt.wantReady, calls)
			}
			if !tt.wantReady && contains(h.providerIDs(""), first[0]) {
				t.Errorf("instance without a host key was not deleted")
			}
		})
	}
}

// slowCreate makes its instances at once but answers only when gate is
// closed, or with the context's error and no ids when the call's context
// ends first, as a plugin whose caller gave up does.
type slowCreate struct {
	*fake.Fake
	gate     chan struct{}
	inFlight chan struct{}
}

func (s *slowCreate) Create(ctx context.Context, n int, labels map[string]string) ([]string, error) {
	ids, err := s.Fake.Create(ctx, n, labels)
	close(s.inFlight)
	select {
	case <-s.gate:
		return ids, err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// A Create in flight when Run ends still reports its instances, which are
// deleted with DeleteOnShutdown: none is left behind.
func TestShutdownDuringCreateLeaksNothing(t *testing.T) {
	fk, err := fake.New(fake.Options{})
	if err != nil {
		t.Fatal(err)
	}
	prov := &slowCreate{Fake: fk, gate: make(chan struct{}), inFlight: make(chan struct{})}
	h := newHarness(t, Config{Provider: prov, Schedule: idlePolicy(schedule.Policy{IdleCount: 2}), DeleteOnShutdown: true}, providers0())
	h.startNoSettle()
	select {
	case <-prov.inFlight:
	case <-time.After(10 * time.Second):
		t.Fatal("no Create call")
	}
	go func() {
		time.Sleep(100 * time.Millisecond) // Run has been canceled by then
		close(prov.gate)
	}()
	h.stop()
	list, err := fk.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range list {
		if in.State != providers.StateDeleting && in.State != providers.StateGone {
			t.Errorf("instance %s is %s after shutdown, want deleted", in.ID, in.State)
		}
	}
}
