package aws

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/mayfly-ci/mayfly/providers"
)

// nonMutating are the read-only actions; EC2 gives them larger buckets.
var nonMutating = map[string]bool{
	"DescribeInstances":         true,
	"DescribeInstanceAttribute": true,
	"GetConsoleOutput":          true,
	"GetPasswordData":           true,
}

// limiter paces EC2 calls the way EC2 meters them: a request token bucket
// per action, plus a resource bucket counting instances for RunInstances
// and TerminateInstances. After EC2 answers RequestLimitExceeded the
// action pauses for a backoff that doubles with each further throttle and
// resets after a success, so throttling slows the plugin down instead of
// multiplying retries.
type limiter struct {
	cfg RateLimit
	now func() time.Time

	mu    sync.Mutex
	req   map[string]*rate.Limiter
	res   map[string]*rate.Limiter
	until map[string]time.Time     // action paused until
	pause map[string]time.Duration // current backoff of a throttled action
}

func newLimiter(cfg RateLimit, now func() time.Time) *limiter {
	return &limiter{
		cfg:   cfg,
		now:   now,
		req:   map[string]*rate.Limiter{},
		res:   map[string]*rate.Limiter{},
		until: map[string]time.Time{},
		pause: map[string]time.Duration{},
	}
}

func (l *limiter) buckets(action string) (req, res *rate.Limiter, paused time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	req = l.req[action]
	if req == nil {
		if nonMutating[action] {
			req = rate.NewLimiter(rate.Limit(l.cfg.DescribeRate), l.cfg.DescribeBurst)
		} else {
			req = rate.NewLimiter(rate.Limit(l.cfg.MutatingRate), l.cfg.MutatingBurst)
		}
		l.req[action] = req
	}
	res = l.res[action]
	if res == nil {
		switch action {
		case "RunInstances":
			res = rate.NewLimiter(rate.Limit(l.cfg.LaunchRate), l.cfg.LaunchBurst)
		case "TerminateInstances":
			res = rate.NewLimiter(rate.Limit(l.cfg.TerminateRate), l.cfg.TerminateBurst)
		}
		if res != nil {
			l.res[action] = res
		}
	}
	return req, res, l.until[action]
}

// wait blocks until action may be called for n instances. When the wait
// would outlast ctx it returns a rate-limited error at once, telling how
// long to wait.
func (l *limiter) wait(ctx context.Context, action string, n int) error {
	req, res, paused := l.buckets(action)
	if d := paused.Sub(l.now()); d > 0 {
		if dl, ok := ctx.Deadline(); ok && dl.Before(paused) {
			return providers.RateLimited(d, fmt.Errorf("ec2 %s: paused after EC2 throttling", action))
		}
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return providers.Transient(fmt.Errorf("ec2 %s: waiting out EC2 throttling: %w", action, ctx.Err()))
		}
	}
	if err := waitN(ctx, req, 1); err != nil {
		return fmt.Errorf("ec2 %s request bucket: %w", action, err)
	}
	if res != nil && n > 0 {
		if err := waitN(ctx, res, min(n, res.Burst())); err != nil {
			return fmt.Errorf("ec2 %s resource bucket: %w", action, err)
		}
	}
	return nil
}

func waitN(ctx context.Context, lim *rate.Limiter, n int) error {
	err := lim.WaitN(ctx, n)
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return providers.Transient(err)
	}
	// The wait would outlast ctx's deadline: say how long it is.
	r := lim.ReserveN(time.Now(), n)
	d := r.Delay()
	r.Cancel()
	return providers.RateLimited(d, errors.New("local rate limit: "+err.Error()))
}

// throttled records that EC2 throttled action and returns the pause now
// in force for it.
func (l *limiter) throttled(action string) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	p := l.pause[action]
	switch {
	case p == 0:
		p = time.Duration(l.cfg.ThrottleBackoff)
	case !now.Before(l.until[action]):
		// Throttled again after the last pause ended: back off further.
		// Calls throttled while a pause runs do not stack.
		p = min(2*p, time.Duration(l.cfg.MaxThrottleBackoff))
	}
	l.pause[action] = p
	if u := now.Add(p); u.After(l.until[action]) {
		l.until[action] = u
	}
	return p
}

// succeeded resets the backoff of action.
func (l *limiter) succeeded(action string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.pause, action)
}
