package fleet

import (
	"context"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers/fake"
	"github.com/mayfly-ci/mayfly/schedule"
)

// TestConcurrentAcquireReleaseNeverReuses runs 1,000 goroutines that each
// acquire instances until one of them has run a job. Every tenth
// acquisition gets "no job" and is given back with Unused. No instance is
// ever handed out while leased, none is handed out after a job ran on it,
// and every instance a job ran on ends deleted at the provider.
func TestConcurrentAcquireReleaseNeverReuses(t *testing.T) {
	const workers = 1000
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 50, IdleTime: time.Minute}), APIRate: 50, APIBurst: 50}, fake.Options{})
	h.start()

	// The clock moves on its own while the goroutines run.
	stopClock := make(chan struct{})
	clockDone := make(chan struct{})
	go func() {
		defer close(clockDone)
		for {
			select {
			case <-stopClock:
				return
			case <-time.After(100 * time.Microsecond):
				h.clk.Advance(500 * time.Millisecond)
			}
		}
	}()

	var (
		mu       sync.Mutex
		leased   = map[string]bool{}
		used     = map[string]bool{}
		handouts atomic.Int64
		unused   atomic.Int64
	)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for attempt := 0; ; attempt++ {
				l, err := h.f.Acquire(ctx)
				if err != nil {
					t.Errorf("worker %d: Acquire: %v", w, err)
					return
				}
				id := l.ID()
				n := handouts.Add(1)
				mu.Lock()
				switch {
				case used[id]:
					t.Errorf("instance %s handed out again after a job ran on it", id)
				case leased[id]:
					t.Errorf("instance %s handed out while leased", id)
				}
				leased[id] = true
				noJob := n%10 == 0 && attempt < 3
				if noJob {
					delete(leased, id)
				} else {
					used[id] = true
				}
				mu.Unlock()
				runtime.Gosched()
				if noJob {
					unused.Add(1)
					l.Unused()
					continue
				}
				l.Release(Outcome(w % 3))
				return
			}
		})
	}
	wg.Wait()
	close(stopClock)
	<-clockDone
	if t.Failed() {
		return
	}
	h.settle()
	h.until(time.Minute, time.Second, "deletions confirmed", func() bool { return h.count(StateDeleting) == 0 })

	if len(used) != workers {
		t.Fatalf("%d instances ran jobs, want %d (one per worker, none shared)", len(used), workers)
	}
	left := map[string]bool{}
	for _, id := range h.providerIDs("") {
		left[id] = true
	}
	for id := range used {
		if left[id] {
			t.Errorf("used instance %s not deleted at the provider", id)
		}
	}
	j := h.f.journal
	if j.Len() != 0 {
		t.Errorf("journal still holds %d live ids after every used instance is gone", j.Len())
	}
	calls := h.f.api.Calls()
	t.Logf("%d handouts (%d unused), provider calls %v, %d instances left (idle pool)", handouts.Load(), unused.Load(), calls, len(left))
}
