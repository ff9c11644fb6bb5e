package pluginkit

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sync/errgroup"

	"github.com/mayfly-ci/mayfly/providers"
)

// FanOut makes n calls of do (i from 0 to n-1), at most limit at once, and
// applies the partial-failure rule every plugin follows:
//
//   - An error that will fail the other calls too stops the fan-out: no
//     further call starts, the calls in flight finish. Those are the
//     errors that speak for the account or the request, not for one
//     instance: rate_limited, quota_exceeded, capacity_exhausted (every
//     location was tried), permanent and invalid_argument. More calls
//     would only spend the API budget on the same answer.
//   - Any other error (transient, not_found, unclassified) is the call's
//     own: the other calls go on.
//   - When ctx ends, no further call starts.
//
// FanOut returns the non-zero results in call order, whatever the errors
// (a call may return a result and an error, e.g. the id of an instance
// whose creation has an unknown outcome), and the errors joined with the
// stopping error first, so that providers.KindOf reports its kind. Calls
// not made because ctx ended add a transient error saying how many.
func FanOut[T comparable](ctx context.Context, n, limit int, do func(ctx context.Context, i int) (T, error)) ([]T, error) {
	if n <= 0 {
		return nil, nil
	}
	var (
		g       errgroup.Group
		mu      sync.Mutex
		results = make([]T, n)
		stop    error // the error that stopped the fan-out
		errs    []error
		skipped int
	)
	g.SetLimit(max(limit, 1))
	stopped := func() bool {
		mu.Lock()
		defer mu.Unlock()
		return stop != nil
	}
	for i := range n {
		if stopped() || ctx.Err() != nil {
			mu.Lock()
			skipped += n - i
			mu.Unlock()
			break
		}
		g.Go(func() error {
			// The fan-out may have stopped while this call waited for a slot.
			if stopped() || ctx.Err() != nil {
				mu.Lock()
				skipped++
				mu.Unlock()
				return nil
			}
			v, err := do(ctx, i)
			mu.Lock()
			defer mu.Unlock()
			results[i] = v
			switch {
			case err == nil:
			case stop == nil && stopsFanOut(err):
				stop = err
			default:
				errs = append(errs, err)
			}
			return nil
		})
	}
	_ = g.Wait() // the calls report through errs
	var out []T
	var zero T
	for _, v := range results {
		if v != zero {
			out = append(out, v)
		}
	}
	if stop != nil {
		errs = append([]error{stop}, errs...)
		if skipped > 0 {
			errs = append(errs, fmt.Errorf("%d of %d calls not made after that error", skipped, n))
		}
	} else if skipped > 0 {
		errs = append(errs, providers.Transient(fmt.Errorf("%d of %d calls not made: %w", skipped, n, context.Cause(ctx))))
	}
	return out, errors.Join(errs...)
}

// stopsFanOut reports whether err will fail the other calls of a fan-out
// too.
func stopsFanOut(err error) bool {
	switch providers.KindOf(err) {
	case providers.KindRateLimited, providers.KindQuotaExceeded, providers.KindCapacityExhausted,
		providers.KindPermanent, providers.KindInvalidArgument:
		return true
	}
	return false
}
