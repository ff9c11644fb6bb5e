package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

// TestRunEndToEnd runs `mayfly run` against the built-in coordinator with
// the fake provider plugin as a real plugin process, whose instances all
// point at one real dropbear: jobs go through the plugin host, the fleet
// and its journal, SSH readiness, the SSH executor, and the trace upload.
func TestRunEndToEnd(t *testing.T) {
	ssh := sshtest.Run(t, sshtest.Dropbear)
	dir := t.TempDir()

	pluginDir := filepath.Join(dir, "plugins")
	buildPlugin(t, pluginDir, "github.com/mayfly-ci/mayfly/providers/fake/cmd/mayfly-plugin-fake")
	srv, url := startCoordinator(t, "run-test-token", `
projects:
  - name: web
    pipelines:
      - variables:
          - {key: GIT_STRATEGY, value: none}
          - {key: SECRET_X, value: s3cr3t-value-123, masked: true}
        jobs:
          - {name: one, script: ["echo hello-$CI_JOB_NAME"]}
          - {name: two, script: ["echo secret=$SECRET_X"]}
          - {name: three, script: ["echo about to fail", "exit 3"]}
  - name: api
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: none}]
        jobs:
          - {name: four, script: ["echo hello-$CI_JOB_NAME"]}
          - {name: five, script: ["echo hello-$CI_JOB_NAME"], after_script: ["echo cleanup-$CI_JOB_STATUS"]}
          - {name: six, script: ["uname -s"]}
`)

	stateDir := filepath.Join(dir, "fake-state")
	cfg := fmt.Sprintf(`concurrent = 3
check_interval = 1
log_level = "warn"

[[runners]]
  name = "fake-fleet"
  url = %q
  token = "run-test-token"
  executor = "instance"
  shell = "sh"
  builds_dir = %q
  [runners.autoscaler]
    plugin = "fake"
    max_instances = 4
    delete_instances_on_shutdown = true
%s    [runners.autoscaler.connector_config]
      timeout = "30s"
    [[runners.autoscaler.policy]]
      idle_count = 2
`, url, filepath.Join(dir, "builds"), fakePluginConfig(stateDir, ssh))
	runUntilDone(t, srv, dir, pluginDir, cfg, 2*time.Minute)

	want := map[string]struct {
		status, reason, output string
	}{
		"one":   {"success", "", "\nhello-one\n"},
		"two":   {"success", "", "\nsecret=[MASKED]\n"},
		"three": {"failed", "script_failure", "\nabout to fail\n"},
		"four":  {"success", "", "\nhello-four\n"},
		"five":  {"success", "", "\ncleanup-success\n"},
		"six":   {"success", "", "\nLinux\n"},
	}
	for _, j := range srv.Jobs() {
		w := want[j.Name]
		if j.Status != w.status || j.FailureReason != w.reason || !strings.Contains(string(j.Trace), w.output) {
			t.Errorf("job %s: %s %q, want %s %q with %q in the trace:\n%s", j.Name, j.Status, j.FailureReason, w.status, w.reason, w.output, j.Trace)
		}
		if strings.Contains(string(j.Trace), "s3cr3t") {
			t.Errorf("job %s: the masked value leaked into the trace", j.Name)
		}
		if j.TraceVerified == nil || !*j.TraceVerified {
			t.Errorf("job %s: the stored trace does not match the reported checksum", j.Name)
		}
	}

	// Nothing leaked: every instance was deleted (used ones after their job,
	// idle ones at shutdown), and each job had its own.
	var state struct {
		NextSeq   int               `json:"next_seq"`
		Instances []json.RawMessage `json:"instances"`
	}
	b, err := os.ReadFile(filepath.Join(stateDir, "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &state); err != nil {
		t.Fatal(err)
	}
	if len(state.Instances) != 0 {
		t.Errorf("instances left at the provider after shutdown: %s", b)
	}
	if state.NextSeq < len(want) {
		t.Errorf("the provider created %d instances for %d jobs: an instance ran more than one job", state.NextSeq, len(want))
	}
}
