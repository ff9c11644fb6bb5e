package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestRunSendsVersionAndRevision runs mayfly run, built as the Makefile
// builds it (version, revision and branch set as with -ldflags -X), against
// a recording GitLab: the job requests carry info.version and
// info.revision as gitlab-runner sends them, and the User-Agent is
// gitlab-runner's form with mayfly's name once.
func TestRunSendsVersionAndRevision(t *testing.T) {
	defer func(v, r, b string) { version, revision, branch = v, r, b }(version, revision, branch)
	version, revision, branch = "1.2.3", "0123abcd", "main"

	type seen struct {
		ua   string
		info map[string]any
	}
	var (
		mu   sync.Mutex
		reqs []seen
	)
	gitlab := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			Info map[string]any `json:"info"`
		}
		b, _ := io.ReadAll(r.Body)
		_ = json.Unmarshal(b, &body)
		mu.Lock()
		reqs = append(reqs, seen{ua: r.UserAgent(), info: body.Info})
		mu.Unlock()
		w.WriteHeader(http.StatusNoContent) // no job
	}))
	t.Cleanup(gitlab.Close)

	dir := t.TempDir()
	pluginDir := filepath.Join(dir, "plugins")
	buildPlugin(t, pluginDir, "github.com/mayfly-ci/mayfly/providers/fake/cmd/mayfly-plugin-fake")
	cfg := `concurrent = 1
check_interval = 1
log_level = "warn"

[[runners]]
  name = "version-test"
  url = "` + gitlab.URL + `"
  token = "glrt-version-test"
  executor = "instance"
  shell = "sh"
  [runners.autoscaler]
    plugin = "fake"
    max_instances = 1
    delete_instances_on_shutdown = true
    [runners.autoscaler.plugin_config]
      state_dir = "` + filepath.Join(dir, "fake-state") + `"
    [[runners.autoscaler.policy]]
      idle_count = 1
`
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	done := make(chan error, 1)
	logs := &cloudLog{}
	go func() {
		done <- runManager(ctx, make(chan struct{}), runFlags{config: cfgPath, pluginDir: pluginDir, stateDir: filepath.Join(dir, "state"), managerID: "version-test"}, io.Discard, logs)
	}()
	deadline := time.Now().Add(45 * time.Second)
	for {
		mu.Lock()
		n := len(reqs)
		mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no request reached GitLab in 45s\n%s", logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
		t.Errorf("mayfly run: %v\n%s", err, logs.String())
	}

	mu.Lock()
	defer mu.Unlock()
	wantUA := "mayfly 1.2.3 (main; " + runtime.Version() + "; " + runtime.GOOS + "/" + runtime.GOARCH + ")"
	for _, r := range reqs {
		if r.ua != wantUA {
			t.Errorf("User-Agent %q, want %q", r.ua, wantUA)
		}
		if r.info["name"] != "mayfly" || r.info["version"] != "1.2.3" || r.info["revision"] != "0123abcd" {
			t.Errorf("info name %v version %v revision %v; want mayfly, 1.2.3, 0123abcd", r.info["name"], r.info["version"], r.info["revision"])
		}
	}
}

// TestBuildInfoFallback: without -ldflags, the version and revision come
// from the binary's build information; a development build says "dev".
func TestBuildInfoFallback(t *testing.T) {
	read := func(v string, settings ...debug.BuildSetting) func() (*debug.BuildInfo, bool) {
		return func() (*debug.BuildInfo, bool) {
			return &debug.BuildInfo{Main: debug.Module{Version: v}, Settings: settings}, true
		}
	}
	rev := debug.BuildSetting{Key: "vcs.revision", Value: "89abcdef0123456789abcdef0123456789abcdef"}
	tests := []struct {
		name    string
		v, r, b string
		read    func() (*debug.BuildInfo, bool)
		want    build
	}{
		{"ldflags win", "1.2.3", "0123abcd", "main", read("v9.9.9", rev), build{"1.2.3", "0123abcd", "main"}},
		{"module version and vcs revision", "", "", "", read("v1.4.0", rev), build{"v1.4.0", "89abcdef", "HEAD"}},
		{"development build", "", "", "", read("(devel)"), build{"dev", "HEAD", "HEAD"}},
		{"no build info", "", "", "", func() (*debug.BuildInfo, bool) { return nil, false }, build{"dev", "HEAD", "HEAD"}},
	}
	for _, tt := range tests {
		if got := resolveBuild(tt.v, tt.r, tt.b, tt.read); got != tt.want {
			t.Errorf("%s: %+v, want %+v", tt.name, got, tt.want)
		}
	}
	if s := versionString(); !strings.HasPrefix(s, "mayfly ") || strings.Count(s, "mayfly") != 1 {
		t.Errorf("versionString() = %q", s)
	}
}
