package aws

import (
	"context"
	"fmt"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/mayfly-ci/mayfly/providers/pluginkit"
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
// action pauses by the toolkit's one backoff policy (pluginkit.Limiter,
// keyed by action), so throttling slows the plugin down instead of
// multiplying retries.
type limiter struct {
	cfg   RateLimit
	pause *pluginkit.Limiter

	mu  sync.Mutex
	req map[string]*rate.Limiter
	res map[string]*rate.Limiter
}

func newLimiter(cfg RateLimit, now func() time.Time) *limiter {
	return &limiter{
		cfg:   cfg,
		pause: pluginkit.NewLimiter(cfg.Throttle, now),
		req:   map[string]*rate.Limiter{},
		res:   map[string]*rate.Limiter{},
	}
}

// buckets returns the request bucket of action and its resource bucket
// (nil for actions EC2 does not meter by instance).
func (l *limiter) buckets(action string) (req, res *rate.Limiter) {
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
	return req, res
}

// wait blocks until action may be called for n instances. When the wait
// would outlast ctx it returns a rate-limited error at once, telling how
// long to wait.
func (l *limiter) wait(ctx context.Context, action string, n int) error {
	req, res := l.buckets(action)
	if err := l.pause.Wait(ctx, action, pluginkit.Take{Bucket: req, N: 1}, pluginkit.Take{Bucket: res, N: n}); err != nil {
		return fmt.Errorf("ec2 %w", err)
	}
	return nil
}

// throttled records that EC2 throttled action and returns the
// rate-limited error carrying the pause now in force.
func (l *limiter) throttled(action string, cause error) error {
	return l.pause.Throttled(action, 0, cause)
}

// succeeded resets the backoff of action.
func (l *limiter) succeeded(action string) { l.pause.Succeeded(action) }
