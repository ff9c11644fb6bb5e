package fleettest

import (
	"slices"
	"sync"
	"testing"
	"time"
)

var epoch = time.Date(2026, 3, 2, 12, 0, 0, 0, time.UTC)

func TestClockFiresInOrderAtDueTime(t *testing.T) {
	c := NewClock(epoch)
	var got []string
	var at []time.Duration
	rec := func(name string) func() {
		return func() {
			got = append(got, name)
			at = append(at, c.Now().Sub(epoch))
		}
	}
	c.AfterFunc(3*time.Second, rec("c"))
	c.AfterFunc(time.Second, rec("a"))
	c.AfterFunc(time.Second, rec("b")) // same instant: creation order
	stopD := c.AfterFunc(2*time.Second, rec("d"))
	if !stopD() {
		t.Fatal("stop of a pending timer = false")
	}
	if stopD() {
		t.Fatal("second stop = true")
	}
	c.Advance(2500 * time.Millisecond)
	if want := []string{"a", "b"}; !slices.Equal(got, want) {
		t.Fatalf("after 2.5s fired %v, want %v", got, want)
	}
	if want := []time.Duration{time.Second, time.Second}; !slices.Equal(at, want) {
		t.Fatalf("fired at %v, want %v", at, want)
	}
	if now := c.Now().Sub(epoch); now != 2500*time.Millisecond {
		t.Fatalf("now = %v, want 2.5s", now)
	}
	if c.Pending() != 1 {
		t.Fatalf("pending = %d, want 1", c.Pending())
	}
	if !c.AdvanceToNext() {
		t.Fatal("AdvanceToNext = false with a pending timer")
	}
	if !slices.Equal(got, []string{"a", "b", "c"}) || c.Now().Sub(epoch) != 3*time.Second {
		t.Fatalf("fired %v at %v", got, c.Now().Sub(epoch))
	}
	if c.AdvanceToNext() {
		t.Fatal("AdvanceToNext = true with no timer")
	}
}

func TestClockTimerArmedByTimerFiresInSameAdvance(t *testing.T) {
	c := NewClock(epoch)
	n := 0
	var tick func()
	tick = func() {
		n++
		c.AfterFunc(time.Second, tick)
	}
	c.AfterFunc(time.Second, tick)
	c.Advance(10 * time.Second)
	if n != 10 {
		t.Fatalf("ticks = %d, want 10", n)
	}
}

func TestClockZeroDurationRunsSoon(t *testing.T) {
	c := NewClock(epoch)
	var wg sync.WaitGroup
	wg.Add(1)
	c.AfterFunc(0, wg.Done)
	wg.Wait()
}

func TestClockStopAfterFire(t *testing.T) {
	c := NewClock(epoch)
	stop := c.AfterFunc(time.Second, func() {})
	c.Advance(time.Second)
	if stop() {
		t.Fatal("stop after firing = true")
	}
}
