package gce_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/plugins/gce"
	"github.com/mayfly-ci/mayfly/plugins/gce/gcefake"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/conformance"
)

// conformanceOptions gives every subtest its own fake GCE; fault subtests
// arm the fake so the next call of the operation fails once.
func conformanceOptions() conformance.Options {
	fakeOpts := gcefake.Options{BootDelay: 150 * time.Millisecond, DeleteDelay: 100 * time.Millisecond, OperationDelay: 20 * time.Millisecond}
	with := func(arm func(*gcefake.Server)) func(t *testing.T) json.RawMessage {
		return func(t *testing.T) json.RawMessage {
			f, url := startFake(t, fakeOpts)
			if arm != nil {
				arm(f)
			}
			return settings(t, url, nil)
		}
	}
	return conformance.Options{
		Settings:        with(nil),
		InvalidSettings: json.RawMessage(`{"project": "mayfly-test", "zones": ["us-east1-b"], "machine_typ": "n1-standard-1"}`),
		ReadyTimeout:    15 * time.Second,
		PollInterval:    50 * time.Millisecond,
		CallTimeout:     20 * time.Second,
		Faults: []conformance.Fault{
			{
				Name: "HTTP429OnInsert",
				Settings: with(func(f *gcefake.Server) {
					f.FailNext(gcefake.Fault{Method: "instances.insert", Status: 429, Reason: "rateLimitExceeded", RetryAfter: "1"})
				}),
				Op: "create", Want: providers.KindRateLimited, WantRetryAfter: time.Second,
			},
			{
				Name: "Forbidden403RateLimitOnList",
				Settings: with(func(f *gcefake.Server) {
					f.FailNext(gcefake.Fault{Method: "instances.aggregatedList", Status: 403, Reason: "rateLimitExceeded"})
				}),
				// No Retry-After: the pause is the first backoff step.
				Op: "list", Want: providers.KindRateLimited, WantRetryAfter: 200 * time.Millisecond,
			},
			{
				Name: "QuotaExceededOperation",
				Settings: with(func(f *gcefake.Server) {
					f.FailNextOp(gcefake.OpFault{Code: gcefake.CodeQuotaExceeded})
				}),
				Op: "create", Want: providers.KindQuotaExceeded, WantScope: "us-east1",
			},
			{
				Name: "QuotaExceededHTTP",
				Settings: with(func(f *gcefake.Server) {
					f.FailNext(gcefake.Fault{Method: "instances.insert", Status: 403, Reason: "quotaExceeded"})
				}),
				Op: "create", Want: providers.KindQuotaExceeded, WantScope: "us-east1",
			},
			{
				Name:     "ZoneResourcePoolExhausted",
				Settings: with(func(f *gcefake.Server) { f.ExhaustZone("us-east1-b", 1) }),
				Op:       "create", Want: providers.KindCapacityExhausted, WantScope: "us-east1-b",
			},
			{
				Name: "Unavailable503OnList",
				Settings: with(func(f *gcefake.Server) {
					f.FailNext(gcefake.Fault{Method: "instances.aggregatedList", Status: 503})
				}),
				Op: "list", Want: providers.KindTransient,
			},
			{
				Name: "BadRequestOnInsert",
				Settings: with(func(f *gcefake.Server) {
					f.FailNext(gcefake.Fault{Method: "instances.insert", Status: 400, Reason: "invalid"})
				}),
				Op: "create", Want: providers.KindInvalidArgument,
			},
		},
	}
}

// TestConformanceInProcess runs the conformance kit against the provider
// in this process.
func TestConformanceInProcess(t *testing.T) {
	conformance.Run(t, func(t *testing.T) providers.Provider {
		p := gce.New(gce.Options{Logger: testLogger(t)})
		t.Cleanup(func() { _ = p.Shutdown(context.Background()) })
		return p
	}, conformanceOptions())
}

// TestConformancePluginBinary runs the kit against the mayfly-plugin-gce
// binary through the real go-plugin host.
func TestConformancePluginBinary(t *testing.T) {
	conformance.Run(t, func(t *testing.T) providers.Provider {
		return startPlugin(t)
	}, conformanceOptions())
}
