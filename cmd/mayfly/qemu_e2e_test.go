package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/internal/testenv"

	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/provisioner/image"
)

// requireQEMU skips when qemu or the kernel package is missing, and fails
// instead in CI, where they must be there.
func requireQEMU(t testing.TB, cacheDir string) {
	t.Helper()
	var missing []string
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		missing = append(missing, "qemu-system-x86_64")
	}
	if _, err := image.FindKernelDeb(filepath.Join(cacheDir, "debs")); err != nil {
		missing = append(missing, "the kernel .deb in "+cacheDir+"/debs")
	}
	if len(missing) == 0 {
		return
	}
	testenv.Missing(t, fmt.Sprintf("needs %s: run make setup", strings.Join(missing, " and ")))
}

// qemuProcesses returns the command lines of qemu processes that mention s.
func qemuProcesses(s string) []string {
	var out []string
	dirs, _ := os.ReadDir("/proc")
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
		if err != nil || !bytes.Contains(b, []byte("qemu-system")) || !bytes.Contains(b, []byte(s)) {
			continue
		}
		out = append(out, string(bytes.ReplaceAll(b, []byte{0}, []byte{' '})))
	}
	return out
}

var runningOn = regexp.MustCompile(`Running on (\S+) via (\S+)\.\.\.`)

// qemuRun is mayfly run on the qemu plugin against an in-process coordinator.
type qemuRun struct {
	srv      *coordinator.Server
	stateDir string
	logs     string
}

// runQEMU enqueues pipeline, runs mayfly run on real microVMs until every job
// has finished, drains it and returns. concurrent and idle shape the fleet.
func runQEMU(t testing.TB, pipeline string, concurrent, idle int) *qemuRun {
	t.Helper()
	repo, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	cacheDir := filepath.Join(repo, ".cache", "mayfly")
	requireQEMU(t, cacheDir)
	dir := t.TempDir()

	pluginDir := filepath.Join(dir, "plugins")
	buildPlugin(t, pluginDir, "github.com/mayfly-ci/mayfly/plugins/qemu/cmd/mayfly-plugin-qemu")
	srv, url := startCoordinator(t, "qemu-e2e-token", pipeline)

	stateDir := filepath.Join(dir, "qemu")
	cfg := qemuConfig(concurrent, "info", stateDir, cacheDir, qemuRunner{name: "qemu-e2e", url: url, token: "qemu-e2e-token",
		memoryMB: 256, maxInstances: concurrent + idle, idle: idle, maxJobTimeout: 40})
	logs := runUntilDone(t, srv, dir, pluginDir, cfg, 11*time.Minute)
	return &qemuRun{srv: srv, stateDir: stateDir, logs: logs}
}

// TestQEMUEndToEnd runs jobs through the built-in coordinator on real
// microVMs: every job on its own VM, each VM deleted after its job, a job
// over the hard timeout stopped and its VM killed, and no qemu left.
func TestQEMUEndToEnd(t *testing.T) {
	r := runQEMU(t, `
projects:
  - name: web
    pipelines:
      - variables:
          - {key: GIT_STRATEGY, value: none}
          - {key: SECRET_X, value: s3cr3t-value-123, masked: true}
        jobs:
          - {name: kernel, script: ["uname -sr"]}
          - {name: secret, script: ["echo secret=$SECRET_X"]}
          - {name: fails, script: ["echo about to fail", "exit 3"]}
          - {name: files, script: ["echo data > f.txt", "cat f.txt", "test -f f.txt"]}
  - name: api
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: none}]
        jobs:
          - {name: env, script: ["echo project=$CI_PROJECT_NAME"]}
          - {name: after, script: ["echo main"], after_script: ["echo after-$CI_JOB_STATUS"]}
          - {name: hangs, script: ["echo going to sleep", "sleep 600"]}
`, 3, 2)
	srv, stateDir, logs := r.srv, r.stateDir, r.logs
	defer func() {
		if t.Failed() {
			t.Logf("mayfly run logs:\n%s", logs)
		}
	}()

	want := map[string]struct{ status, reason, output string }{
		"kernel": {"success", "", "\nLinux 6."},
		"secret": {"success", "", "\nsecret=[MASKED]\n"},
		"fails":  {"failed", "script_failure", "\nabout to fail\n"},
		"files":  {"success", "", "\ndata\n"},
		"env":    {"success", "", "\nproject=api\n"},
		"after":  {"success", "", "\nafter-success\n"},
		"hangs":  {"failed", "job_execution_timeout", "\ngoing to sleep\n"},
	}
	vms := map[string]string{}
	var hangVM string
	for _, j := range srv.Jobs() {
		w := want[j.Name]
		tr := string(j.Trace)
		if j.Status != w.status || j.FailureReason != w.reason || !strings.Contains(tr, w.output) {
			t.Errorf("job %s: %s %q, want %s %q with %q in the trace:\n%s", j.Name, j.Status, j.FailureReason, w.status, w.reason, w.output, tr)
		}
		if strings.Contains(tr, "s3cr3t") {
			t.Errorf("job %s: the masked value leaked", j.Name)
		}
		if j.TraceVerified == nil || !*j.TraceVerified {
			t.Errorf("job %s: the stored trace does not match the reported checksum", j.Name)
		}
		m := runningOn.FindStringSubmatch(tr)
		if m == nil {
			t.Errorf("job %s: no 'Running on' line in the trace", j.Name)
			continue
		}
		// The VM's host name is its instance id: one VM per job.
		if prev, dup := vms[m[1]]; dup {
			t.Errorf("jobs %s and %s ran on the same VM %s", prev, j.Name, m[1])
		}
		vms[m[1]] = j.Name
		if j.Name == "hangs" {
			hangVM = m[1]
		}
	}
	if hangVM == "" {
		t.Fatal("the timed-out job's VM is unknown")
	}
	// Every VM is gone: the timed-out job's, every used one, and the idle ones.
	if left := qemuProcesses(hangVM); len(left) > 0 {
		t.Errorf("the timed-out job's VM %s still runs: %v", hangVM, left)
	}
	if left := qemuProcesses(stateDir); len(left) > 0 {
		t.Errorf("qemu processes left after shutdown: %v", left)
	}
	if entries, _ := filepath.Glob(filepath.Join(stateDir, "*", "mayfly-*")); len(entries) > 0 {
		t.Errorf("VM state dirs left after shutdown: %v", entries)
	}
	// The overhead mayfly adds on a warm VM, from the manager's own log.
	t.Logf("pickup-to-start per job (s): %v", pickupTimes(logs))
}

var pickupRE = regexp.MustCompile(`"pickup_to_start_seconds":([0-9.e-]+)`)

func pickupTimes(logs string) []string {
	var out []string
	for _, m := range pickupRE.FindAllStringSubmatch(logs, -1) {
		out = append(out, m[1])
	}
	return out
}

// BenchmarkWarmVMOverhead runs 20 jobs one at a time with an idle pool of 2,
// so each job lands on a warm VM, and reports the median time from the job
// being received to its script starting: mayfly's own overhead.
func BenchmarkWarmVMOverhead(b *testing.B) {
	const jobs = 20
	var pipeline strings.Builder
	pipeline.WriteString("projects:\n  - name: warm\n    pipelines:\n      - variables: [{key: GIT_STRATEGY, value: none}]\n        jobs:\n")
	for i := 0; i < jobs; i++ {
		fmt.Fprintf(&pipeline, "          - {name: j%d, script: [\"true\"]}\n", i)
	}
	for i := 0; i < b.N; i++ {
		r := runQEMU(b, pipeline.String(), 1, 2)
		var secs []float64
		for _, v := range pickupTimes(r.logs) {
			var f float64
			fmt.Sscan(v, &f)
			secs = append(secs, f)
		}
		if len(secs) != jobs {
			b.Fatalf("%d pickup times for %d jobs", len(secs), jobs)
		}
		sort.Float64s(secs)
		b.ReportMetric((secs[jobs/2-1]+secs[jobs/2])/2*1000, "ms-median-pickup-to-start")
		b.ReportMetric(secs[jobs*9/10-1]*1000, "ms-p90-pickup-to-start")
	}
}
