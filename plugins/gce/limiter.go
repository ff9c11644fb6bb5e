package gce

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// limiter is an http.RoundTripper through which every Compute API request
// of the plugin passes. It waits for a token of a shared rate limit before
// sending, and on a rate-limit answer (HTTP 429, or 403 with reason
// rateLimitExceeded / userRateLimitExceeded) it pauses all requests for the
// Retry-After the server asked for (or a default backoff) and halves the
// rate, which then grows back linearly to the configured rate over
// recoveryPeriod (GCE refills its rate quotas per minute). It also counts
// requests per API method.
type limiter struct {
	next     http.RoundTripper
	log      *slog.Logger
	max      rate.Limit
	floor    rate.Limit
	backoff  time.Duration
	lim      *rate.Limiter
	now      func() time.Time
	sleepCtx func(ctx context.Context, d time.Duration) error

	mu        sync.Mutex
	until     time.Time  // no request starts before
	low       rate.Limit // the rate right after the last throttle
	lowAt     time.Time  // when it was throttled; zero: never
	calls     map[string]int
	throttled int
	waited    time.Duration
}

// recoveryPeriod is how long the rate takes to grow back to the
// configured rate after a throttle.
const recoveryPeriod = time.Minute

func newLimiter(next http.RoundTripper, perSecond float64, burst int, backoff time.Duration, log *slog.Logger) *limiter {
	max := rate.Limit(perSecond)
	return &limiter{
		next:     next,
		log:      log,
		max:      max,
		floor:    max / 16,
		backoff:  backoff,
		lim:      rate.NewLimiter(max, burst),
		now:      time.Now,
		sleepCtx: sleepCtx,
		calls:    map[string]int{},
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// RoundTrip implements http.RoundTripper.
func (l *limiter) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	start := l.now()
	for {
		l.mu.Lock()
		wait := l.until.Sub(l.now())
		l.mu.Unlock()
		if wait <= 0 {
			break
		}
		if err := l.sleepCtx(ctx, wait); err != nil {
			return nil, fmt.Errorf("waiting %s for the API rate limit: %w", wait, err)
		}
	}
	l.mu.Lock()
	l.lim.SetLimit(l.rateLocked())
	l.mu.Unlock()
	if err := l.lim.Wait(ctx); err != nil {
		return nil, fmt.Errorf("waiting for the API rate limit: %w", err)
	}
	method := apiMethod(req.Method, req.URL.Path)
	l.mu.Lock()
	l.calls[method]++
	l.waited += l.now().Sub(start)
	l.mu.Unlock()

	resp, err := l.next.RoundTrip(req)
	if err != nil {
		return resp, err
	}
	if throttled, body := isThrottle(resp); throttled {
		l.throttle(method, retryAfter(resp.Header))
		resp.Body = io.NopCloser(bytes.NewReader(body))
	} else if body != nil {
		resp.Body = io.NopCloser(bytes.NewReader(body))
	}
	return resp, nil
}

// isThrottle reports whether resp is a rate-limit answer. For 403 answers
// it reads the body (returned, to be put back) to find the reason.
func isThrottle(resp *http.Response) (bool, []byte) {
	switch resp.StatusCode {
	case http.StatusTooManyRequests:
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
		return true, body
	case http.StatusForbidden:
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
		s := string(body)
		return strings.Contains(s, `"`+reasonRateLimitExceeded+`"`) || strings.Contains(s, `"`+reasonUserRateLimitExceeded+`"`), body
	}
	return false, nil
}

// throttle pauses all requests for d (the default backoff when 0) and
// halves the rate.
func (l *limiter) throttle(method string, d time.Duration) {
	if d <= 0 {
		d = l.backoff
	}
	l.mu.Lock()
	now := l.now()
	l.throttled++
	if until := now.Add(d); until.After(l.until) {
		l.until = until
	}
	l.low = max(l.rateLocked()/2, l.floor)
	l.lowAt = now
	r := l.low
	l.lim.SetLimit(r)
	l.mu.Unlock()
	l.log.Warn("compute API rate limit hit; slowing down", "method", method, "pause", d, "rate_per_second", float64(r))
}

// rateLocked is the rate in force now: the configured one, or after a
// throttle the halved one growing back linearly over recoveryPeriod.
func (l *limiter) rateLocked() rate.Limit {
	if l.lowAt.IsZero() {
		return l.max
	}
	elapsed := l.now().Sub(l.lowAt)
	if elapsed >= recoveryPeriod {
		return l.max
	}
	return l.low + (l.max-l.low)*rate.Limit(elapsed)/rate.Limit(recoveryPeriod)
}

// limiterStats is a snapshot of a limiter's counters.
type limiterStats struct {
	Calls     map[string]int
	Throttled int
	Waited    time.Duration
	Rate      float64
	PauseLeft time.Duration
}

func (l *limiter) stats() limiterStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	left := l.until.Sub(l.now())
	if left < 0 {
		left = 0
	}
	return limiterStats{
		Calls:     maps.Clone(l.calls),
		Throttled: l.throttled,
		Waited:    l.waited,
		Rate:      float64(l.rateLocked()),
		PauseLeft: left,
	}
}

// apiMethod names the Compute API method of a request path, e.g.
// "instances.insert", for counting.
func apiMethod(httpMethod, path string) string {
	_, rest, ok := strings.Cut(path, "/compute/v1/projects/")
	if !ok {
		return strings.ToLower(httpMethod) + " " + path
	}
	parts := strings.Split(rest, "/")
	// parts[0] is the project.
	switch {
	case len(parts) >= 3 && parts[1] == "aggregated" && parts[2] == "instances":
		return "instances.aggregatedList"
	case len(parts) >= 4 && parts[1] == "zones" && parts[3] == "operations":
		if len(parts) >= 6 && parts[5] == "wait" {
			return "zoneOperations.wait"
		}
		return "zoneOperations.get"
	case len(parts) >= 4 && parts[1] == "zones" && parts[3] == "instances":
		switch {
		case len(parts) == 4 && httpMethod == http.MethodPost:
			return "instances.insert"
		case len(parts) == 4:
			return "instances.list"
		case len(parts) == 5 && httpMethod == http.MethodDelete:
			return "instances.delete"
		case len(parts) == 5:
			return "instances.get"
		case len(parts) == 6 && parts[5] == "serialPort":
			return "instances.getSerialPortOutput"
		case len(parts) == 6:
			return "instances." + parts[5]
		}
	}
	return strings.ToLower(httpMethod) + " " + strings.Join(parts[1:], "/")
}
