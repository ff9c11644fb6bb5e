package aws_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/plugins/aws/awsfake"
	"github.com/mayfly-ci/mayfly/providers"
)

func TestThrottlingBackoff(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	p := start(t, e.with())
	e.srv.FailNext("RunInstances", "RequestLimitExceeded", "", 3)
	var waits []time.Duration
	for range 3 {
		_, err := p.Create(ctxT(t), 1, labels)
		ra, ok := providers.IsRateLimited(err)
		if !ok {
			t.Fatalf("Create while throttled = %v, want rate_limited", err)
		}
		waits = append(waits, ra)
	}
	if want := []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond}; !slices.Equal(waits, want) {
		t.Errorf("retry-after of successive throttles = %v, want %v (doubling)", waits, want)
	}
	// The SDK did not retry the throttled calls: one request per Create.
	if got := e.srv.Calls()["RunInstances"]; got != 3 {
		t.Errorf("RunInstances calls = %d, want 3 (no SDK retries on throttling)", got)
	}
	// The next call waits out the pause, then succeeds and resets it.
	begin := time.Now()
	if _, err := p.Create(ctxT(t), 1, labels); err != nil {
		t.Fatalf("Create after the throttling: %v", err)
	}
	if waited := time.Since(begin); waited < 350*time.Millisecond {
		t.Errorf("Create after a 400ms pause returned after %s", waited)
	}
	e.srv.FailNext("RunInstances", "RequestLimitExceeded", "", 1)
	if _, err := p.Create(ctxT(t), 1, labels); err == nil {
		t.Fatal("Create succeeded through an injected throttle")
	} else if ra, _ := providers.IsRateLimited(err); ra != 100*time.Millisecond {
		t.Errorf("retry-after after a success = %s, want the first backoff again", ra)
	}
	// A caller whose deadline ends before the pause gets the wait without
	// an API call.
	before := e.srv.Calls()["RunInstances"]
	short, cancel := context.WithTimeout(t.Context(), 10*time.Millisecond)
	defer cancel()
	if _, err := p.Create(short, 1, labels); err == nil {
		t.Error("Create with a deadline inside the pause succeeded")
	} else if _, ok := providers.IsRateLimited(err); !ok {
		t.Errorf("Create with a deadline inside the pause = %v, want rate_limited", err)
	}
	if got := e.srv.Calls()["RunInstances"]; got != before {
		t.Errorf("a call inside the pause reached EC2 (%d → %d calls)", before, got)
	}
}

func TestLocalRateLimit(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	p := start(t, e.with("rate_limit", map[string]any{"describe_rate": 0.5, "describe_burst": 1}))
	if _, err := p.List(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	_, err := p.List(short)
	ra, ok := providers.IsRateLimited(err)
	if !ok || ra < time.Second {
		t.Errorf("second List within the bucket's 2s = %v (retry after %s), want rate_limited with the wait", err, ra)
	}
	if got := e.srv.Calls()["DescribeInstances"]; got != 1 {
		t.Errorf("DescribeInstances calls = %d, want 1", got)
	}
}
