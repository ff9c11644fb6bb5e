package gce

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
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

// TestLimiterBacksOff checks that a rate-limit answer pauses the next
// request for Retry-After (or the default backoff), halves the rate, which
// grows back over recoveryPeriod, and that the 403 body reaches the caller
// intact.
func TestLimiterBacksOff(t *testing.T) {
	answers := []struct {
		status int
		body   string
		hdr    string
	}{
		{429, `{"error":{"code":429,"errors":[{"reason":"rateLimitExceeded"}]}}`, "3"},
		{200, `{}`, ""},
		{403, `{"error":{"code":403,"errors":[{"reason":"rateLimitExceeded"}]}}`, ""},
		{403, `{"error":{"code":403,"errors":[{"reason":"forbidden"}]}}`, ""},
		{200, `{}`, ""},
	}
	i := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a := answers[i]
		i++
		if a.hdr != "" {
			w.Header().Set("Retry-After", a.hdr)
		}
		w.WriteHeader(a.status)
		_, _ = io.WriteString(w, a.body)
	}))
	defer srv.Close()

	now := time.Unix(1000, 0)
	var slept []time.Duration
	l := newLimiter(http.DefaultTransport, 10, 100, 5*time.Second, slog.New(slog.DiscardHandler))
	l.now = func() time.Time { return now }
	l.sleepCtx = func(_ context.Context, d time.Duration) error {
		slept = append(slept, d)
		now = now.Add(d)
		return nil
	}
	c := &http.Client{Transport: l}
	get := func() (int, string) {
		t.Helper()
		resp, err := c.Get(srv.URL + "/compute/v1/projects/p/aggregated/instances")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	near := func(a, b float64) bool { return a-b < 1e-9 && b-a < 1e-9 }

	if code, _ := get(); code != 429 {
		t.Fatalf("first answer %d", code)
	}
	if st := l.stats(); !near(st.Rate, 5) || st.Throttled != 1 || st.PauseLeft != 3*time.Second {
		t.Errorf("after 429: rate %g throttled %d pause %s; want 5, 1, 3s", st.Rate, st.Throttled, st.PauseLeft)
	}
	get() // waits out Retry-After, then succeeds
	if len(slept) != 1 || slept[0] != 3*time.Second {
		t.Errorf("slept %v before the request after the 429, want [3s]", slept)
	}
	now = now.Add(27 * time.Second) // 30s after the throttle: half way back
	if st := l.stats(); !near(st.Rate, 7.5) {
		t.Errorf("rate 30s after a throttle = %g, want 7.5", st.Rate)
	}
	code, body := get()
	if code != 403 || !strings.Contains(body, "rateLimitExceeded") {
		t.Errorf("403 answer %d %q did not reach the caller intact", code, body)
	}
	if st := l.stats(); !near(st.Rate, 3.75) || st.PauseLeft != 5*time.Second {
		t.Errorf("after 403 rateLimitExceeded: rate %g pause %s; want 3.75, 5s (default backoff)", st.Rate, st.PauseLeft)
	}
	code, body = get()
	if code != 403 || !strings.Contains(body, "forbidden") {
		t.Errorf("403 forbidden answer %d %q", code, body)
	}
	if st := l.stats(); st.Throttled != 2 {
		t.Errorf("403 forbidden counted as throttling: %d", st.Throttled)
	}
	now = now.Add(recoveryPeriod)
	get()
	if st := l.stats(); !near(st.Rate, 10) || st.Calls["instances.aggregatedList"] != 5 {
		t.Errorf("after the recovery period: rate %g, calls %v; want 10 and 5 aggregatedList", st.Rate, st.Calls)
	}
}
