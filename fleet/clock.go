package fleet

import "time"

// Clock is the fleet's only source of time. The system clock is used in
// production; tests and the simulator (fleet/sim) pass a fleettest.Clock
// that they advance by hand, so a day of traffic replays in seconds with
// the same code.
type Clock interface {
	// Now returns the current time.
	Now() time.Time
	// AfterFunc calls f once, in its own goroutine or (for a fake clock)
	// synchronously while the clock is advanced, after d has passed. f must
	// not block. The returned stop cancels the call and reports whether it
	// did so before f ran.
	AfterFunc(d time.Duration, f func()) (stop func() bool)
}

// SystemClock is the wall clock.
type SystemClock struct{}

// Now implements Clock.
func (SystemClock) Now() time.Time { return time.Now() }

// AfterFunc implements Clock with time.AfterFunc.
func (SystemClock) AfterFunc(d time.Duration, f func()) func() bool {
	return time.AfterFunc(d, f).Stop
}
