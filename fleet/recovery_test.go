package fleet

import (
	"context"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/fake"
	"github.com/mayfly-ci/mayfly/schedule"
)

// crashAfterAcquire runs a fleet with 3 idle instances, acquires one and
// stops the fleet without releasing it, as a crashed manager would leave
// things. It returns the harness (stopped), the acquired id and the ids
// that were idle.
func crashAfterAcquire(t *testing.T) (*harness, string, []string) {
	t.Helper()
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 3})}, fake.Options{})
	h.start()
	h.until(time.Minute, time.Second, "3 idle", func() bool { return h.f.Available() == 3 })
	l := h.acquire()
	h.until(time.Minute, time.Second, "replacement", func() bool { return h.f.Available() == 3 })
	var idle []string
	for _, in := range h.f.Status().Instances {
		if in.State == StateIdle {
			idle = append(idle, in.ID)
		}
	}
	h.stop() // no Release: the lease dies with the "crashed" manager
	if !contains(h.providerIDs(""), l.ID()) {
		t.Fatal("stop deleted the leased instance")
	}
	return h, l.ID(), idle
}

// restart starts a new fleet on the same provider, journal and clock.
func restart(t *testing.T, old *harness) *harness {
	t.Helper()
	cfg := old.cfg
	cfg.Registerer = nil
	h := newHarness(t, cfg, fake.Options{})
	h.prov = old.prov
	h.start()
	return h
}

func TestRestartNeverHandsOutAcquiredInstance(t *testing.T) {
	old, used, idle := crashAfterAcquire(t)
	h := restart(t, old)
	h.settle()
	h.advance(30*time.Second, time.Second)
	if contains(h.providerIDs(""), used) {
		t.Fatalf("instance %s acquired before the crash still exists", used)
	}
	for _, in := range h.f.Status().Instances {
		if in.ID == used {
			t.Fatalf("instance %s acquired before the crash is in the books as %s", used, in.State)
		}
	}
	// The never-acquired ones were adopted, not deleted.
	if h.f.Available() != 3 {
		t.Fatalf("available %d after restart, want the 3 adopted", h.f.Available())
	}
	var got []string
	for range 3 {
		l := h.acquire()
		if l.ID() == used {
			t.Fatalf("instance %s handed out again after a restart", used)
		}
		got = append(got, l.ID())
		defer l.Release(JobSucceeded)
	}
	slices.Sort(got)
	slices.Sort(idle)
	if !slices.Equal(got, idle) {
		t.Errorf("adopted %v, want the idle %v", got, idle)
	}
	if got := testutil.ToFloat64(h.f.m.deletions.WithLabelValues("linux", string(ReasonRecovery))); got != 1 {
		t.Errorf("deletions{recovery} = %v, want 1", got)
	}
	// Creates after the restart: none needed.
	if n := len(h.prov.callsOf(OpCreate)); n != len(old.prov.callsOf(OpCreate)) {
		t.Logf("create calls %d", n)
	}
}

func TestRestartWithoutJournalDeletesEverything(t *testing.T) {
	for name, damage := range map[string]func(path string) error{
		"missing": os.Remove,
		"corrupt": func(path string) error {
			f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = f.WriteString("a torn-")
			return err
		},
	} {
		t.Run(name, func(t *testing.T) {
			old, used, idle := crashAfterAcquire(t)
			if err := damage(old.cfg.JournalPath); err != nil {
				t.Fatal(err)
			}
			h := restart(t, old)
			h.advance(10*time.Second, time.Second)
			ids := h.providerIDs("")
			for _, id := range append(idle, used) {
				if contains(ids, id) {
					t.Errorf("instance %s from before the restart survived a %s journal", id, name)
				}
			}
			h.until(time.Minute, time.Second, "new pool", func() bool { return h.f.Available() == 3 })
		})
	}
}

func TestRestartDuringRecoveryStillDeletes(t *testing.T) {
	old, used, _ := crashAfterAcquire(t)
	// The provider refuses deletes: the second run records the doomed
	// instance in its fresh journal but cannot delete it.
	old.prov.InjectError(fake.OpDelete, -1, providers.Transient(context.DeadlineExceeded))
	h := restart(t, old)
	h.advance(5*time.Second, time.Second)
	h.stop()
	if !contains(h.providerIDs(""), used) {
		t.Fatal("the delete fault did not hold")
	}
	old.prov.ClearFaults()
	h3 := restart(t, h)
	h3.advance(10*time.Second, time.Second)
	if contains(h3.providerIDs(""), used) {
		t.Fatalf("instance %s survived two restarts", used)
	}
}

func TestStartAdoptsCreatingAndDeletesFailed(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 2})}, fake.Options{BootDelay: 20 * time.Second})
	// Leave a trusted, empty journal, as a clean earlier run would.
	j, err := createJournal(h.cfg.JournalPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	j.Close()
	ctx := context.Background()
	booting, _ := h.prov.Fake.Create(ctx, 1, h.f.Labels())
	broken, _ := h.prov.Fake.Create(ctx, 1, h.f.Labels())
	h.prov.SetState(broken[0], providers.StateFailed, "boot failed")
	h.start()
	if contains(h.providerIDs(""), broken[0]) {
		t.Error("failed instance not deleted at start")
	}
	h.until(time.Minute, time.Second, "pool", func() bool { return h.f.Available() == 2 })
	var ids []string
	for _, in := range h.f.Status().Instances {
		ids = append(ids, in.ID)
	}
	if !contains(ids, booting[0]) {
		t.Errorf("creating instance %s not adopted: books %v", booting[0], ids)
	}
}
