// Package fleettest holds test doubles for the fleet package: a clock that
// moves only when told to.
package fleettest

import (
	"sort"
	"sync"
	"time"
)

// Clock is a fake clock. Time stands still until Advance, AdvanceTo or
// AdvanceToNext moves it; the functions of timers that fall due run
// synchronously, in due order, inside that call. It satisfies fleet.Clock.
// It is safe for concurrent use.
type Clock struct {
	mu     sync.Mutex
	now    time.Time
	seq    uint64
	timers []*timer
}

type timer struct {
	when time.Time
	seq  uint64
	f    func()
	done bool
}

// NewClock returns a clock standing at start.
func NewClock(start time.Time) *Clock {
	return &Clock{now: start}
}

// Now returns the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// AfterFunc arranges for f to run when the clock reaches now+d. A d <= 0
// runs f at once in a new goroutine, as time.AfterFunc does. The returned
// function cancels the timer and reports whether it was still pending.
func (c *Clock) AfterFunc(d time.Duration, f func()) func() bool {
	if d <= 0 {
		go f()
		return func() bool { return false }
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seq++
	t := &timer{when: c.now.Add(d), seq: c.seq, f: f}
	i := sort.Search(len(c.timers), func(i int) bool { return later(c.timers[i], t) })
	c.timers = append(c.timers, nil)
	copy(c.timers[i+1:], c.timers[i:])
	c.timers[i] = t
	return func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		if t.done {
			return false
		}
		t.done = true
		for i, x := range c.timers {
			if x == t {
				c.timers = append(c.timers[:i], c.timers[i+1:]...)
				break
			}
		}
		return true
	}
}

// later orders timers by due time, then by creation.
func later(a, b *timer) bool {
	if !a.when.Equal(b.when) {
		return a.when.After(b.when)
	}
	return a.seq > b.seq
}

// Advance moves the clock forward by d, running every timer that falls due
// at its own due time, and returns the new time.
func (c *Clock) Advance(d time.Duration) time.Time {
	c.mu.Lock()
	target := c.now.Add(d)
	c.mu.Unlock()
	c.AdvanceTo(target)
	return target
}

// AdvanceTo moves the clock to t (if t is later than now), running the
// timers due up to t in order.
func (c *Clock) AdvanceTo(t time.Time) {
	for c.fireNext(t) {
	}
	c.mu.Lock()
	if t.After(c.now) {
		c.now = t
	}
	c.mu.Unlock()
}

// AdvanceToNext moves the clock to the earliest pending timer and runs it
// (and any other timer due at the same instant). It reports false, leaving
// the clock alone, when no timer is pending.
func (c *Clock) AdvanceToNext() bool {
	next, ok := c.Next()
	if !ok {
		return false
	}
	c.AdvanceTo(next)
	return true
}

// Next returns the due time of the earliest pending timer.
func (c *Clock) Next() (time.Time, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.timers) == 0 {
		return time.Time{}, false
	}
	return c.timers[0].when, true
}

// Pending returns the number of timers that have not run or been stopped.
func (c *Clock) Pending() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.timers)
}

// Step runs the earliest timer due at or before t, moving the clock to its
// due time, and reports whether there was one. A driver that lets the code
// under test settle after each Step sees timers of one instant run one
// after the other, never racing each other.
func (c *Clock) Step(t time.Time) bool { return c.fireNext(t) }

// fireNext runs the earliest timer due at or before limit and reports
// whether there was one.
func (c *Clock) fireNext(limit time.Time) bool {
	c.mu.Lock()
	if len(c.timers) == 0 || c.timers[0].when.After(limit) {
		c.mu.Unlock()
		return false
	}
	t := c.timers[0]
	c.timers = c.timers[1:]
	t.done = true
	if t.when.After(c.now) {
		c.now = t.when
	}
	c.mu.Unlock()
	t.f()
	return true
}
