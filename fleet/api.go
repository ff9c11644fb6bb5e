package fleet

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/mayfly-ci/mayfly/providers"
)

// Provider operations, as metric label values.
const (
	OpCreate      = "create"
	OpDelete      = "delete"
	OpList        = "list"
	OpConnectInfo = "connect_info"
)

// api is the gate through which every call to a provider goes: a token
// bucket on the injected clock (APIRate, the fleet's own cap on calls), a
// pause when the provider says it is rate limited, a timeout on every
// call, and counters per operation.
//
// Of the two backoffs a call meets, the plugin's is the budget: a cloud
// plugin paces its requests with providers/pluginkit.Limiter and, when
// its cloud throttles, answers rate_limited with the pause it chose. The
// fleet only passes that through: it waits exactly as long as the plugin
// said and adds no backoff of its own. The doubling wait here is only for
// a plugin that says it is rate limited without saying for how long.
type api struct {
	prov    providers.Provider
	runner  string
	clock   Clock
	sleep   func(ctx context.Context, d time.Duration) error
	timeout time.Duration
	m       *metrics
	log     *slog.Logger
	lim     *rate.Limiter

	mu         sync.Mutex
	pauseUntil time.Time
	limited    int // consecutive rate-limited answers
	calls      map[string]int
}

// wait blocks until the budget allows one more call.
func (a *api) wait(ctx context.Context) error {
	for {
		now := a.clock.Now()
		a.mu.Lock()
		pause := a.pauseUntil.Sub(now)
		a.mu.Unlock()
		if pause > 0 {
			if err := a.sleep(ctx, pause); err != nil {
				return err
			}
			continue
		}
		r := a.lim.ReserveN(now, 1)
		if !r.OK() {
			return fmt.Errorf("api budget: burst is 0")
		}
		d := r.DelayFrom(now)
		if d <= 0 {
			return nil
		}
		if err := a.sleep(ctx, d); err != nil {
			r.CancelAt(a.clock.Now())
			return err
		}
		return nil
	}
}

// call spends one unit of budget on fn.
func (a *api) call(ctx context.Context, op string, fn func(ctx context.Context) error) error {
	if err := a.wait(ctx); err != nil {
		return fmt.Errorf("%s: waiting for the API budget: %w", op, err)
	}
	a.mu.Lock()
	a.calls[op]++
	a.mu.Unlock()
	a.m.calls.WithLabelValues(a.runner, op).Inc()

	base := ctx
	if op == OpCreate {
		// A Create cut off by shutdown may have made instances whose ids
		// then never reach the books: let it finish, within the timeout,
		// so they are recorded (and deleted, with DeleteOnShutdown).
		base = context.WithoutCancel(ctx)
	}
	cctx, cancel := context.WithTimeout(base, a.timeout)
	err := fn(cctx)
	cancel()
	if err == nil {
		a.mu.Lock()
		a.limited = 0
		a.mu.Unlock()
		return nil
	}
	kind := providers.KindOf(err)
	a.m.errors.WithLabelValues(a.runner, op, kind.String()).Inc()
	if retryAfter, ok := providers.IsRateLimited(err); ok {
		a.pause(op, retryAfter)
	}
	return err
}

// pause stops all calls for retryAfter, or for a doubling wait when the
// provider gave no hint.
func (a *api) pause(op string, retryAfter time.Duration) {
	now := a.clock.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.limited++
	d := retryAfter
	if d <= 0 {
		d = Backoff(time.Second, time.Minute, a.limited)
	}
	if until := now.Add(d); until.After(a.pauseUntil) {
		a.pauseUntil = until
	}
	a.log.Warn("provider rate limited; pausing calls", "op", op, "for", d, "consecutive", a.limited)
}

// Calls returns the number of calls made per operation.
func (a *api) Calls() map[string]int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return maps.Clone(a.calls)
}

// Create asks for n instances. A providers.Launcher returns them with
// their connect info; otherwise only the ids are set.
func (a *api) Create(ctx context.Context, n int, labels map[string]string) ([]providers.Instance, error) {
	var out []providers.Instance
	err := a.call(ctx, OpCreate, func(ctx context.Context) error {
		if l, ok := a.prov.(providers.Launcher); ok {
			var err error
			out, err = l.Launch(ctx, n, labels)
			return err
		}
		ids, err := a.prov.Create(ctx, n, labels)
		out = providers.InstancesOf(ids)
		return err
	})
	return out, err
}

func (a *api) Delete(ctx context.Context, ids []string) ([]string, error) {
	var done []string
	err := a.call(ctx, OpDelete, func(ctx context.Context) error {
		var err error
		done, err = a.prov.Delete(ctx, ids)
		return err
	})
	return done, err
}

func (a *api) List(ctx context.Context) ([]providers.Instance, error) {
	var list []providers.Instance
	err := a.call(ctx, OpList, func(ctx context.Context) error {
		var err error
		list, err = a.prov.List(ctx)
		return err
	})
	return list, err
}

func (a *api) ConnectInfo(ctx context.Context, id string) (providers.ConnectInfo, error) {
	var ci providers.ConnectInfo
	err := a.call(ctx, OpConnectInfo, func(ctx context.Context) error {
		var err error
		ci, err = a.prov.ConnectInfo(ctx, id)
		return err
	})
	return ci, err
}
