package pluginkit

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/mayfly-ci/mayfly/providers"
)

// Throttle holds the backoff keys of a plugin's "rate_limit" settings
// object; every cloud plugin embeds it there, so the keys are named alike.
type Throttle struct {
	// ThrottleBackoff is the first pause after the cloud throttles
	// (answers with a rate-limit error) without saying how long to wait.
	ThrottleBackoff providers.Duration `json:"throttle_backoff"`
	// MaxThrottleBackoff caps the doubling of the pause.
	MaxThrottleBackoff providers.Duration `json:"max_throttle_backoff"`
}

// Defaults fills the zero fields with first and most, and checks that the
// maximum is not below the first pause. Errors name the settings key under
// rate_limit.
func (t *Throttle) Defaults(first, most time.Duration) error {
	if t.ThrottleBackoff == 0 {
		t.ThrottleBackoff = providers.Duration(first)
	}
	if t.MaxThrottleBackoff == 0 {
		t.MaxThrottleBackoff = providers.Duration(max(most, time.Duration(t.ThrottleBackoff)))
	}
	if t.MaxThrottleBackoff < t.ThrottleBackoff {
		return fmt.Errorf("settings key %q: max_throttle_backoff %s is below throttle_backoff %s", "rate_limit",
			time.Duration(t.MaxThrottleBackoff), time.Duration(t.ThrottleBackoff))
	}
	return nil
}

// Limiter paces a plugin's requests to its cloud's API. Requests take
// tokens from token buckets (golang.org/x/time/rate) the plugin keeps per
// what the cloud meters, and wait while their key is paused.
//
// The backoff policy, the one of every plugin: when the cloud throttles a
// key (Throttled), calls of that key pause. The pause is what the cloud
// asked for when it said (Retry-After), else the key's current backoff
// step: ThrottleBackoff at first, doubled by each throttle that comes
// after the previous pause ended (throttles during a pause do not stack),
// at most MaxThrottleBackoff. A success (Succeeded) resets the step. The
// error Throttled returns carries the pause as its retry-after, so the
// fleet waits exactly as long (see the package doc: the plugin is the
// budget). Keys are the plugin's choice: one for all calls, or one per
// API action.
type Limiter struct {
	throttle Throttle
	now      func() time.Time

	mu        sync.Mutex
	keys      map[string]*pause
	throttles int
	waited    time.Duration
}

type pause struct {
	until time.Time     // no call of the key starts before
	step  time.Duration // the backoff in force; 0: not throttled since the last success
}

// NewLimiter returns a limiter with the policy of t (see Throttle.Defaults)
// on the clock now (default time.Now).
func NewLimiter(t Throttle, now func() time.Time) *Limiter {
	if now == nil {
		now = time.Now
	}
	return &Limiter{throttle: t, now: now, keys: map[string]*pause{}}
}

// Take is n tokens from a bucket.
type Take struct {
	Bucket *rate.Limiter
	N      int
}

// Wait returns when key is not paused and each take's tokens are taken.
// When ctx's deadline comes before the wait would end, Wait returns a
// rate_limited error at once, carrying how long the wait is, and makes no
// call wait for nothing; when ctx ends while waiting, a transient error.
func (l *Limiter) Wait(ctx context.Context, key string, takes ...Take) error {
	start := l.now()
	if d := l.PauseLeft(key); d > 0 {
		if dl, ok := ctx.Deadline(); ok && dl.Before(start.Add(d)) {
			return providers.RateLimited(d, fmt.Errorf("%s: paused after the cloud throttled it", key))
		}
		if err := Sleep(ctx, d); err != nil {
			return providers.Transient(fmt.Errorf("%s: waiting out the cloud's throttling: %w", key, err))
		}
	}
	for _, t := range takes {
		if t.Bucket == nil || t.N <= 0 {
			continue
		}
		if err := waitN(ctx, t.Bucket, min(t.N, t.Bucket.Burst())); err != nil {
			return fmt.Errorf("%s: %w", key, err)
		}
	}
	l.mu.Lock()
	l.waited += l.now().Sub(start)
	l.mu.Unlock()
	return nil
}

// waitN takes n tokens from lim, or says how long that would take when it
// outlasts ctx's deadline.
func waitN(ctx context.Context, lim *rate.Limiter, n int) error {
	err := lim.WaitN(ctx, n)
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return providers.Transient(fmt.Errorf("local rate limit: %w", err))
	}
	r := lim.ReserveN(time.Now(), n)
	d := r.Delay()
	r.Cancel()
	return providers.RateLimited(d, errors.New("local rate limit: "+err.Error()))
}

// Throttled records that the cloud throttled key, asking to wait
// retryAfter (0 when it did not say), and returns the rate_limited error
// for the caller: cause, with the pause now in force as its retry-after.
func (l *Limiter) Throttled(key string, retryAfter time.Duration, cause error) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	p := l.keys[key]
	if p == nil {
		p = &pause{}
		l.keys[key] = p
	}
	switch {
	case p.step == 0:
		p.step = time.Duration(l.throttle.ThrottleBackoff)
	case !now.Before(p.until):
		p.step = min(2*p.step, time.Duration(l.throttle.MaxThrottleBackoff))
	}
	d := p.step
	if retryAfter > 0 {
		d = retryAfter
	}
	if u := now.Add(d); u.After(p.until) {
		p.until = u
	}
	l.throttles++
	return providers.RateLimited(p.until.Sub(now), cause)
}

// Succeeded resets key's backoff step after a successful call.
func (l *Limiter) Succeeded(key string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if p := l.keys[key]; p != nil {
		p.step = 0
	}
}

// PauseLeft returns how long key stays paused (0: not paused).
func (l *Limiter) PauseLeft(key string) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	p := l.keys[key]
	if p == nil {
		return 0
	}
	return max(0, p.until.Sub(l.now()))
}

// LimiterStats are a limiter's counters since it was made.
type LimiterStats struct {
	// Throttles counts Throttled calls.
	Throttles int
	// Waited is the total time Wait calls waited.
	Waited time.Duration
}

// Stats returns the limiter's counters.
func (l *Limiter) Stats() LimiterStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	return LimiterStats{Throttles: l.throttles, Waited: l.waited}
}
