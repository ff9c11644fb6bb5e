package gce_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"maps"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/plugins/gce"
	"github.com/mayfly-ci/mayfly/plugins/gce/gcefake"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/host"
	"github.com/mayfly-ci/mayfly/providers/plugintest"
)

const testProject = "mayfly-test"

var pluginBinary string

func TestMain(m *testing.M) {
	plugintest.Main(m, "github.com/mayfly-ci/mayfly/plugins/gce/cmd/mayfly-plugin-gce", &pluginBinary)
}

// startFake serves a fake GCE API on 127.0.0.1 for the test.
func startFake(t *testing.T, opts gcefake.Options) (*gcefake.Server, string) {
	t.Helper()
	if opts.Project == "" {
		opts.Project = testProject
	}
	f := gcefake.New(opts)
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return f, srv.URL
}

// settings returns plugin settings for the fake at endpoint, with extra
// keys merged in. The plugin authenticates as in production, with a
// service-account key whose token endpoint is the fake's.
func settings(t *testing.T, endpoint string, extra map[string]any) json.RawMessage {
	t.Helper()
	s := map[string]any{
		"project":          testProject,
		"zones":            []string{"us-east1-b"},
		"endpoint":         endpoint,
		"credentials_file": credentialsFile(t, endpoint),
		"rate_limit":       map[string]any{"rate": 500, "burst": 100, "throttle_backoff": "200ms"},
		"poll_interval":    "20ms",
		"password_timeout": "5s",
	}
	maps.Copy(s, extra)
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// credentialsFile writes the fake's service-account key for the fake at
// endpoint and returns its path.
func credentialsFile(t *testing.T, endpoint string) string {
	t.Helper()
	key, err := gcefake.ServiceAccountKey(endpoint, testProject)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "service-account.json")
	if err := os.WriteFile(path, key, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// newProvider returns an initialised in-process provider.
func newProvider(t *testing.T, raw json.RawMessage) *gce.Provider {
	t.Helper()
	p := gce.New(gce.Options{Logger: testLogger(t)})
	if _, err := p.Init(ctx(t), raw); err != nil {
		t.Fatalf("Init: %v", err)
	}
	t.Cleanup(func() { _ = p.Shutdown(context.Background()) })
	return p
}

// newUninit returns a provider before Init.
func newUninit(t *testing.T) *gce.Provider {
	p := gce.New(gce.Options{Logger: testLogger(t)})
	t.Cleanup(func() { _ = p.Shutdown(context.Background()) })
	return p
}

// startPlugin starts the plugin binary through the real plugin host.
func startPlugin(t *testing.T) *host.Plugin {
	t.Helper()
	c, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	p, err := host.Start(c, host.Config{
		Name: "gce", Path: pluginBinary, CallTimeout: 20 * time.Second,
		Logger: testLogger(t), MinBackoff: 50 * time.Millisecond,
	})
	if err != nil {
		t.Fatalf("start plugin: %v", err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

func testLogger(t *testing.T) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.DiscardHandler)
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

var testLabels = map[string]string{providers.LabelManager: "mgr-1", providers.LabelRunner: "linux-small"}

// waitState polls List until id has state want.
func waitState(t *testing.T, p providers.Provider, id string, want providers.State) providers.Instance {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		list, err := p.List(ctx(t))
		if err != nil {
			t.Fatalf("List: %v", err)
		}
		for _, in := range list {
			if in.ID == id && in.State == want {
				return in
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("instance %s never reached %s; list: %+v", id, want, list)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
