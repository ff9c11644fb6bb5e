package gce

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/pluginkit"
)

func TestAPIMethod(t *testing.T) {
	p := "/compute/v1/projects/p"
	tests := []struct{ method, path, want string }{
		{"POST", p + "/zones/us-east1-b/instances", "instances.insert"},
		{"GET", p + "/zones/us-east1-b/instances", "instances.list"},
		{"GET", p + "/aggregated/instances", "instances.aggregatedList"},
		{"GET", p + "/zones/us-east1-b/instances/i", "instances.get"},
		{"DELETE", p + "/zones/us-east1-b/instances/i", "instances.delete"},
		{"POST", p + "/zones/us-east1-b/instances/i/setMetadata", "instances.setMetadata"},
		{"GET", p + "/zones/us-east1-b/instances/i/serialPort", "instances.getSerialPortOutput"},
		{"GET", p + "/zones/us-east1-b/instances/i/getGuestAttributes", "instances.getGuestAttributes"},
		{"GET", p + "/zones/us-east1-b/operations/op", "zoneOperations.get"},
		{"POST", p + "/zones/us-east1-b/operations/op/wait", "zoneOperations.wait"},
	}
	for _, tt := range tests {
		if got := apiMethod(tt.method, tt.path); got != tt.want {
			t.Errorf("apiMethod(%s %s) = %q, want %q", tt.method, tt.path, got, tt.want)
		}
	}
}

// TestLimiterPausesAfterThrottle checks the limiter's part of the one
// backoff policy: a throttle pauses every request (the next one waits it
// out), a successful answer resets the backoff, answers reach the caller
// intact and requests are counted by API method.
func TestLimiterPausesAfterThrottle(t *testing.T) {
	status := http.StatusOK
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(status)
		_, _ = io.WriteString(w, `{"error":{"code":403,"errors":[{"reason":"rateLimitExceeded"}]}}`)
	}))
	defer srv.Close()
	l := newLimiter(http.DefaultTransport, RateLimit{Rate: 1000, Burst: 10, Throttle: pluginkit.Throttle{
		ThrottleBackoff: providers.Duration(80 * time.Millisecond), MaxThrottleBackoff: providers.Duration(time.Second),
	}})
	c := &http.Client{Transport: l}
	get := func() (int, string, time.Duration) {
		t.Helper()
		begin := time.Now()
		resp, err := c.Get(srv.URL + "/compute/v1/projects/p/aggregated/instances")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), time.Since(begin)
	}

	status = http.StatusForbidden
	code, body, _ := get()
	if code != 403 || !strings.Contains(body, "rateLimitExceeded") {
		t.Errorf("403 answer %d %q did not reach the caller intact", code, body)
	}
	err := l.throttled(0, errors.New("rate limit exceeded"))
	if ra, ok := providers.IsRateLimited(err); !ok || ra != 80*time.Millisecond {
		t.Errorf("throttled = %v (retry after %s), want rate_limited after the 80ms first step", err, ra)
	}
	if st := l.stats(); st.Throttled != 1 || st.PauseLeft <= 0 || st.Rate != 1000 {
		t.Errorf("stats after a throttle: %+v; want 1 throttled, a pause, the configured rate", st)
	}
	status = http.StatusOK
	if _, _, took := get(); took < 60*time.Millisecond {
		t.Errorf("request inside an 80ms pause took %s; it did not wait", took)
	}
	// The success reset the backoff: the next throttle pauses for the
	// first step again, not a doubled one.
	if ra, _ := providers.IsRateLimited(l.throttled(0, errors.New("again"))); ra != 80*time.Millisecond {
		t.Errorf("throttle after a success: retry after %s, want 80ms", ra)
	}
	if st := l.stats(); st.Calls["instances.aggregatedList"] != 2 {
		t.Errorf("calls %v, want 2 aggregatedList", st.Calls)
	}
}
