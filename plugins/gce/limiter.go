package gce

import (
	"maps"
	"net/http"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/mayfly-ci/mayfly/providers/pluginkit"
)

// limiter is an http.RoundTripper through which every Compute API request
// of the plugin passes. It waits for a token of the plugin's one bucket
// and while the pluginkit.Limiter pauses all requests after a rate-limit
// answer (the pause is set by Provider.classify, which sees every answer
// the SDK turns into an error); a successful answer resets the backoff.
// It also counts requests per API method.
type limiter struct {
	next   http.RoundTripper
	rate   float64
	bucket *rate.Limiter
	pause  *pluginkit.Limiter

	mu    sync.Mutex
	calls map[string]int
}

// allCalls is the limiter key of every request: a rate-limit answer
// pauses them all (GCE's rate quotas are per project, not per method).
const allCalls = "compute API"

func newLimiter(next http.RoundTripper, rl RateLimit) *limiter {
	return &limiter{
		next:   next,
		rate:   rl.Rate,
		bucket: rate.NewLimiter(rate.Limit(rl.Rate), rl.Burst),
		pause:  pluginkit.NewLimiter(rl.Throttle, nil),
		calls:  map[string]int{},
	}
}

// RoundTrip implements http.RoundTripper.
func (l *limiter) RoundTrip(req *http.Request) (*http.Response, error) {
	if err := l.pause.Wait(req.Context(), allCalls, pluginkit.Take{Bucket: l.bucket, N: 1}); err != nil {
		return nil, err
	}
	method := apiMethod(req.Method, req.URL.Path)
	l.mu.Lock()
	l.calls[method]++
	l.mu.Unlock()
	resp, err := l.next.RoundTrip(req)
	if err == nil && resp.StatusCode < 300 {
		l.pause.Succeeded(allCalls)
	}
	return resp, err
}

// throttled pauses all requests after a rate-limit answer, for
// retryAfter when the API said, and returns the error for the caller.
func (l *limiter) throttled(retryAfter time.Duration, cause error) error {
	return l.pause.Throttled(allCalls, retryAfter, cause)
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
	calls := maps.Clone(l.calls)
	l.mu.Unlock()
	st := l.pause.Stats()
	return limiterStats{
		Calls:     calls,
		Throttled: st.Throttles,
		Waited:    st.Waited,
		Rate:      l.rate,
		PauseLeft: l.pause.PauseLeft(allCalls),
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
