package conformance_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/conformance"
	"github.com/mayfly-ci/mayfly/providers/fake"
	"github.com/mayfly-ci/mayfly/providers/host"
	"github.com/mayfly-ci/mayfly/providers/plugintest"
)

var pluginBinary string

func TestMain(m *testing.M) {
	plugintest.Main(m, "github.com/mayfly-ci/mayfly/providers/fake/cmd/mayfly-plugin-fake", &pluginBinary)
}

func settings(t *testing.T, extra string) json.RawMessage {
	dir, err := json.Marshal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	s := `{"state_dir": ` + string(dir) + `, "boot_delay": "50ms", "delete_delay": "50ms"`
	if extra != "" {
		s += ", " + extra
	}
	return json.RawMessage(s + "}")
}

func options() conformance.Options {
	fault := func(extra string) func(t *testing.T) json.RawMessage {
		return func(t *testing.T) json.RawMessage { return settings(t, extra) }
	}
	return conformance.Options{
		Settings:        fault(""),
		InvalidSettings: json.RawMessage(`{"no_such_key": 1}`),
		ReadyTimeout:    10 * time.Second,
		PollInterval:    20 * time.Millisecond,
		CallTimeout:     10 * time.Second,
		Concurrency:     6,
		Faults: []conformance.Fault{
			{
				Name:     "RateLimited",
				Settings: fault(`"faults": [{"op": "create", "kind": "rate_limited", "retry_after": "7s"}]`),
				Op:       "create", Want: providers.KindRateLimited, WantRetryAfter: 7 * time.Second,
			},
			{
				Name:     "QuotaExceeded",
				Settings: fault(`"faults": [{"op": "create", "kind": "quota_exceeded", "scope": "us-east1"}]`),
				Op:       "create", Want: providers.KindQuotaExceeded, WantScope: "us-east1",
			},
			{
				Name:     "CapacityExhausted",
				Settings: fault(`"faults": [{"op": "create", "kind": "capacity_exhausted", "scope": "us-east1-b"}]`),
				Op:       "create", Want: providers.KindCapacityExhausted, WantScope: "us-east1-b",
			},
			{
				Name:     "PermanentDelete",
				Settings: fault(`"faults": [{"op": "delete", "kind": "permanent"}]`),
				Op:       "delete", Want: providers.KindPermanent,
			},
			{
				Name:     "TransientList",
				Settings: fault(`"faults": [{"op": "list", "kind": "transient"}]`),
				Op:       "list", Want: providers.KindTransient,
			},
		},
	}
}

// TestFakeInProcess runs the suite against the fake directly.
func TestFakeInProcess(t *testing.T) {
	conformance.Run(t, func(t *testing.T) providers.Provider {
		f, err := fake.New(fake.Options{})
		if err != nil {
			t.Fatal(err)
		}
		return f
	}, options())
}

// TestFakePluginThroughHost runs the suite against the fake plugin binary
// in its own process, through the real go-plugin host.
func TestFakePluginThroughHost(t *testing.T) {
	conformance.Run(t, func(t *testing.T) providers.Provider {
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		p, err := host.Start(ctx, host.Config{Name: "fake", Path: pluginBinary, CallTimeout: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = p.Close() })
		return p
	}, options())
}

// broken wraps the fake with one deliberate defect.
type broken struct {
	*fake.Fake
	defect string
}

func (b *broken) Delete(ctx context.Context, ids []string) ([]string, error) {
	switch b.defect {
	case "delete-unknown-fails":
		for _, id := range ids {
			if !strings.HasPrefix(id, "fake-") {
				return nil, providers.NotFound(id)
			}
		}
	case "delete-does-nothing":
		return ids, nil
	}
	return b.Fake.Delete(ctx, ids)
}

func (b *broken) List(ctx context.Context) ([]providers.Instance, error) {
	list, err := b.Fake.List(ctx)
	if b.defect == "labels-dropped" {
		for i := range list {
			list[i].Labels = nil
		}
	}
	return list, err
}

func (b *broken) Create(ctx context.Context, n int, labels map[string]string) ([]string, error) {
	ids, err := b.Fake.Create(ctx, n, labels)
	if err != nil && b.defect == "errors-flattened" {
		err = errors.New(err.Error())
	}
	return ids, err
}

// TestBrokenHelper runs the suite against a broken provider; it only runs
// as the child process of TestKitCatchesDefects.
func TestBrokenHelper(t *testing.T) {
	defect := os.Getenv("MAYFLY_CONFORMANCE_DEFECT")
	if defect == "" {
		return // not started by TestKitCatchesDefects
	}
	opts := options()
	opts.ReadyTimeout = 300 * time.Millisecond
	switch defect {
	case "no-invalid-settings":
		opts.InvalidSettings = nil
	case "no-faults":
		opts.Faults = nil
	case "no-faults-with-reason":
		opts.Faults, opts.NoFaults = nil, "this fake cannot fail"
	}
	conformance.Run(t, func(t *testing.T) providers.Provider {
		f, err := fake.New(fake.Options{})
		if err != nil {
			t.Fatal(err)
		}
		return &broken{Fake: f, defect: defect}
	}, opts)
}

// TestKitCatchesDefects shows the suite fails providers with each defect,
// with a message that names it.
func TestKitCatchesDefects(t *testing.T) {
	tests := []struct {
		defect string
		want   string
	}{
		{"delete-unknown-fails", "want success"},
		{"delete-does-nothing", "still listed"},
		{"labels-dropped", "lack"},
		{"errors-flattened", "has kind unknown, want rate_limited"},
		{"no-invalid-settings", "Options.InvalidSettings is required"},
		{"no-faults", "Options.Faults is required"},
	}
	for _, tt := range tests {
		t.Run(tt.defect, func(t *testing.T) {
			cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^TestBrokenHelper$", "-test.count=1")
			cmd.Env = append(os.Environ(), "MAYFLY_CONFORMANCE_DEFECT="+tt.defect)
			out, err := cmd.CombinedOutput()
			if err == nil {
				t.Fatalf("suite passed a provider with defect %s:\n%s", tt.defect, out)
			}
			if !strings.Contains(string(out), tt.want) {
				t.Errorf("suite output for defect %s lacks %q:\n%s", tt.defect, tt.want, out)
			}
		})
	}
}

// TestKitSkipsVisibly: a plugin that says why it has no typed-error cases
// passes, and the skip and its reason show in the output.
func TestKitSkipsVisibly(t *testing.T) {
	cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^TestBrokenHelper$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), "MAYFLY_CONFORMANCE_DEFECT=no-faults-with-reason")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("suite failed a plugin that gave its reason:\n%s", out)
	}
	if !strings.Contains(string(out), "--- SKIP: TestBrokenHelper/TypedErrors") || !strings.Contains(string(out), "this fake cannot fail") {
		t.Errorf("the skip and its reason are not in the output:\n%s", out)
	}
}
