package fleet

import (
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers/fake"
)

// An instance claimed for a resumed job survives the start-up clean-up as
// acquired, stays recorded as acquired (a second crash still deletes it),
// is never handed out, and is deleted when its lease ends.
func TestClaimedInstanceKeptUntilReleased(t *testing.T) {
	old, used, _ := crashAfterAcquire(t)
	cfg := old.cfg
	cfg.Registerer = nil
	h := newHarness(t, cfg, fake.Options{})
	h.prov = old.prov
	l, err := h.f.Claim(used)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.f.Claim(used); err == nil {
		t.Error("a second claim of the same instance succeeded")
	}
	h.start()
	h.advance(30*time.Second, time.Second)
	if !contains(h.providerIDs(""), used) {
		t.Fatalf("the claimed instance %s was deleted at start-up", used)
	}
	if h.count(StateAcquired) != 1 || !h.f.journal.Has(used) {
		t.Fatalf("claimed instance: acquired %d, in the journal %v", h.count(StateAcquired), h.f.journal.Has(used))
	}
	for range 3 {
		x := h.acquire()
		if x.ID() == used {
			t.Fatalf("the claimed instance %s was handed out", used)
		}
		defer x.Release(JobSucceeded)
	}
	l.Release(JobSucceeded)
	h.settle()
	h.advance(10*time.Second, time.Second)
	if contains(h.providerIDs(""), used) {
		t.Errorf("the claimed instance %s still exists after its lease ended", used)
	}
	if _, err := h.f.Claim("late"); err == nil {
		t.Error("Claim after Run succeeded")
	}
}

// A claimed instance the provider no longer has is lost at the first list.
func TestClaimedInstanceGoneIsLost(t *testing.T) {
	old, used, _ := crashAfterAcquire(t)
	if _, err := old.prov.Delete(t.Context(), []string{used}); err != nil {
		t.Fatal(err)
	}
	old.advance(time.Minute, time.Second) // the fake's delete delay
	cfg := old.cfg
	cfg.Registerer = nil
	h := newHarness(t, cfg, fake.Options{})
	h.prov = old.prov
	l, err := h.f.Claim(used)
	if err != nil {
		t.Fatal(err)
	}
	h.start()
	h.until(5*time.Minute, 5*time.Second, "lost", func() bool {
		select {
		case <-l.Lost():
			return true
		default:
			return false
		}
	})
}
