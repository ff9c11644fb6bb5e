package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
	"github.com/mayfly-ci/mayfly/plugins/qemu/qemuvm"
)

// qemuHostile is `mayfly run` as a process of its own on the qemu plugin,
// with isolated egress, against an in-process coordinator set up as
// `mayfly coordinator --external-url http://10.0.2.2:PORT` sets it up: the
// VMs reach it (git, API) at 10.0.2.2, so its admin API needs its token.
type qemuHostile struct {
	t           *testing.T
	srv         *coordinator.Server
	coordPort   int
	adminToken  string
	metricsPort int
	stateDir    string
	cmd         *exec.Cmd
	exited      <-chan error
	stderr      *lockedBuffer
	sentinel    *sentinel
}

// sentinel is a listener on a host loopback port that no VM may reach: it
// counts the connections it accepts.
type sentinel struct {
	ln       net.Listener
	accepted atomic.Int64
}

func newSentinel(t *testing.T) *sentinel {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &sentinel{ln: ln}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.accepted.Add(1)
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return s
}

func (s *sentinel) port() int { return s.ln.Addr().(*net.TCPAddr).Port }

// freePortNumber returns a loopback TCP port free at the time of the call.
func freePortNumber(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func startQEMUHostile(t *testing.T) *qemuHostile {
	t.Helper()
	repo, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	cacheDir := filepath.Join(repo, ".cache", "mayfly")
	requireQEMU(t, cacheDir)
	binDir := mayflyBinaries(t)
	dir := t.TempDir()
	pluginDir := filepath.Join(dir, "plugins")
	buildPlugin(t, pluginDir, "github.com/mayfly-ci/mayfly/plugins/qemu/cmd/mayfly-plugin-qemu")

	h := &qemuHostile{t: t, stateDir: filepath.Join(dir, "qemu"), metricsPort: freePortNumber(t), sentinel: newSentinel(t)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h.coordPort = ln.Addr().(*net.TCPAddr).Port
	external := fmt.Sprintf("http://10.0.2.2:%d", h.coordPort)
	// The token `mayfly coordinator` would require with this external URL.
	token, generated, err := adminTokenFor("", ln.Addr(), external)
	if err != nil || !generated || token == "" {
		t.Fatalf("adminTokenFor with --external-url: %q, generated %v, %v; want a generated token", token, generated, err)
	}
	h.adminToken = token
	h.srv, err = coordinator.New(coordinator.Config{Logger: slog.New(slog.DiscardHandler), TraceUpdateInterval: time.Second,
		ExternalURL: external, AdminToken: token})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { defer close(served); _ = h.srv.Serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); <-served })
	if _, err := h.srv.RegisterRunner(coordinator.RunnerOptions{RegistrationToken: h.srv.RegistrationToken(), RunUntagged: true, Token: "qemu-hostile-token"}); err != nil {
		t.Fatal(err)
	}

	cfg := fmt.Sprintf(`concurrent = 2
check_interval = 1
log_level = "info"
listen_address = "127.0.0.1:%d"

[[runners]]
  name = "qemu-hostile"
  url = "http://127.0.0.1:%d"
  token = "qemu-hostile-token"
  executor = "instance"
  shell = "sh"
  builds_dir = "/builds"
  [runners.autoscaler]
    plugin = "qemu"
    max_instances = 3
    max_growth_rate = 2
    delete_instances_on_shutdown = true
    [runners.autoscaler.plugin_config]
      state_dir = %q
      image_cache_dir = %q
      memory_mb = 256
      boot_timeout = "150s"
      egress = "isolated"
      egress_allow = ["127.0.0.1:%d"]
    [runners.autoscaler.connector_config]
      timeout = "2m"
    [[runners.autoscaler.policy]]
      idle_count = 1
      idle_time = "10m"
`, h.metricsPort, h.coordPort, h.stateDir, cacheDir, h.coordPort)
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	h.cmd = exec.Command(filepath.Join(binDir, "mayfly"), "run", "--config", cfgPath,
		"--plugin-dir", pluginDir, "--state-dir", filepath.Join(dir, "state"), "--manager-id", "qemu-hostile")
	h.stderr = &lockedBuffer{}
	h.cmd.Stderr = h.stderr
	h.cmd.WaitDelay = 5 * time.Second
	if err := h.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	h.exited = exited
	waited := make(chan struct{})
	go func() { exited <- h.cmd.Wait(); close(waited) }()
	t.Cleanup(func() {
		_ = h.cmd.Process.Kill()
		<-waited
		if t.Failed() {
			t.Logf("mayfly run log:\n%s", h.stderr.String())
		}
	})
	return h
}

// apply enqueues a pipeline file.
func (h *qemuHostile) apply(pipeline string) {
	h.t.Helper()
	p, err := coordinator.ParsePipelineFile("hostile.yaml", []byte(pipeline))
	if err != nil {
		h.t.Fatal(err)
	}
	if _, err := h.srv.Apply(p); err != nil {
		h.t.Fatal(err)
	}
}

// wait waits until job name is final and returns it.
func (h *qemuHostile) wait(name string, within time.Duration) coordinator.JobRecord {
	h.t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		for _, j := range h.srv.Jobs() {
			if j.Name == name && (j.Status == "success" || j.Status == "failed" || j.Status == "canceled") {
				return j
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	h.t.Fatalf("job %s did not end within %v", name, within)
	return coordinator.JobRecord{}
}

// traceShows returns when the trace of job name first holds s (polled
// every 50ms), or fails the test after within.
func (h *qemuHostile) traceShows(name, s string, within time.Duration) time.Time {
	h.t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		for _, j := range h.srv.Jobs() {
			if j.Name == name && strings.Contains(string(j.Trace), s) {
				return time.Now()
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	h.t.Fatalf("job %s never wrote %q within %v", name, s, within)
	return time.Time{}
}

// vmSSHPorts returns the host ports forwarded to the SSH servers of every
// VM that exists now.
func (h *qemuHostile) vmSSHPorts() []int {
	h.t.Helper()
	files, _ := filepath.Glob(filepath.Join(h.stateDir, "*", "*", qemuvm.MetadataFile))
	var ports []int
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var vm struct {
			SSHAddr string `json:"ssh_addr"`
		}
		if json.Unmarshal(b, &vm) != nil {
			continue
		}
		if _, p, err := net.SplitHostPort(vm.SSHAddr); err == nil {
			n, _ := strconv.Atoi(p)
			ports = append(ports, n)
		}
	}
	return ports
}

// waitVMs waits until n VMs are ready (listed with their SSH port).
func (h *qemuHostile) waitVMs(n int, within time.Duration) {
	h.t.Helper()
	deadline := time.Now().Add(within)
	for len(h.vmSSHPorts()) < n && time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond)
	}
	if len(h.vmSSHPorts()) < n {
		h.t.Fatalf("%d VMs after %v, want %d", len(h.vmSSHPorts()), within, n)
	}
}

// probeScript tries every "name=host:port" of $PROBES from the VM and
// prints "probe NAME open" or "probe NAME closed"; then it asks the
// coordinator's admin API for the jobs (with the job's own token, and
// with none) and prints the HTTP status line it got.
const probeScript = `for p in $PROBES; do n=${p%%=*}; a=${p#*=}; if timeout 6 nc ${a%:*} ${a##*:} </dev/null >/dev/null 2>&1; then echo "probe $n open"; else echo "probe $n closed"; fi; done
for auth in none job; do
  if [ $auth = job ]; then hdr="Private-Token: $CI_JOB_TOKEN"; else hdr="X-None: 1"; fi
  out=$(timeout 10 wget -S -q -O /dev/null --header "$hdr" "$COORD/-/mayfly/jobs" 2>&1 || true); echo "admin $auth: $(printf '%s\n' "$out" | grep -m1 'HTTP/')"
done`

// watchedJob is what watchJobs saw of one job: its last record, when it
// was seen final, its VM, and when that VM's qemu process was seen gone.
type watchedJob struct {
	job    coordinator.JobRecord
	ended  time.Time
	vm     string
	vmGone time.Time
}

// watchJobs polls (every 100ms) until every job named in names is final
// and its VM's qemu process is gone, or within has passed: a job not final
// by then fails the test, a VM still running is reported as not deleted.
func (h *qemuHostile) watchJobs(names []string, within time.Duration) map[string]*watchedJob {
	h.t.Helper()
	w := map[string]*watchedJob{}
	for _, n := range names {
		w[n] = &watchedJob{}
	}
	deadline := time.Now().Add(within)
	for {
		now := time.Now()
		done := true
		for _, j := range h.srv.Jobs() {
			s := w[j.Name]
			if s == nil || !s.ended.IsZero() {
				continue
			}
			s.job = j
			if s.vm == "" {
				if m := runningViaRE.FindSubmatch(j.Trace); m != nil {
					s.vm = string(m[1])
				}
			}
			if j.Status == "success" || j.Status == "failed" || j.Status == "canceled" {
				s.ended = now
			}
		}
		for _, s := range w {
			if s.vm != "" && s.vmGone.IsZero() && len(qemuProcesses(s.vm)) == 0 {
				s.vmGone = now
			}
			done = done && !s.ended.IsZero() && !s.vmGone.IsZero()
		}
		if done {
			return w
		}
		if now.After(deadline) {
			for n, s := range w {
				if s.ended.IsZero() {
					h.t.Fatalf("job %s did not end within %v (status %s)\n%s", n, within, s.job.Status, s.job.Trace)
				}
				if s.vmGone.IsZero() {
					h.t.Errorf("job %s: its VM %s still runs %v after the job began", n, s.vm, within)
				}
			}
			return w
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// deletion says when a job's VM was seen gone, relative to the job's end.
func (s *watchedJob) deletion() string {
	switch {
	case s.vmGone.IsZero():
		return "NO"
	case s.vmGone.Before(s.ended):
		return fmt.Sprintf("yes, gone %v before the job ended", s.ended.Sub(s.vmGone).Round(100*time.Millisecond))
	default:
		return fmt.Sprintf("yes, %v after the job ended", s.vmGone.Sub(s.ended).Round(100*time.Millisecond))
	}
}

// The cases that need a real VM, on qemu microVMs under mayfly run with
// isolated egress: a daemon forked to outlive its job, a job that probes
// the manager's metrics port, the coordinator's admin API, other host
// loopback ports and the other VMs, a job that kills its VM outright, one
// that kills its VM's SSH server (the microVM's init powers the VM off
// when its SSH server dies, so this too ends the VM), and one that fills
// its disk. Each ends with the right state and reason, its VM is deleted,
// a job after them runs on a fresh VM that holds nothing of theirs, and
// the manager's peak memory in each case stays bounded. Each case logs a
// row of issue 19's table ("hostile-table |").
func TestHostileJobsOnQEMU(t *testing.T) {
	h := startQEMUHostile(t)
	h.waitVMs(1, 3*time.Minute)
	pid := h.cmd.Process.Pid
	casePeak := func() int64 {
		rss := vmHWM(t, pid)
		if rss > maxManagerRSS {
			t.Errorf("manager peak RSS %d MiB, want at most %d MiB", rss>>20, maxManagerRSS>>20)
		}
		resetPeakRSS(t, pid)
		return rss
	}
	resetPeakRSS(t, pid)

	// 1. A daemon that outlives its job, and a job probing the network.
	var probes []string
	probes = append(probes, fmt.Sprintf("metrics=10.0.2.2:%d", h.metricsPort), fmt.Sprintf("sentinel=10.0.2.2:%d", h.sentinel.port()),
		"dns=10.0.2.3:53", "metadata=169.254.169.254:80", "host-ssh=10.0.2.2:22")
	for i, p := range h.vmSSHPorts() {
		probes = append(probes, fmt.Sprintf("vm%d-ssh=10.0.2.2:%d", i, p))
	}
	probes = append(probes, fmt.Sprintf("coordinator=10.0.2.2:%d", h.coordPort)) // allowed: the positive control
	h.apply(fmt.Sprintf(`
projects:
  - name: first
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: none}]
        jobs:
          - name: daemon
            script:
              - setsid sh -c 'while :; do date >> /tmp/daemon-beat; touch /builds/daemon-was-here; sleep 1; done' hostile-daemon </dev/null >/dev/null 2>&1 &
              - sleep 2; test -s /tmp/daemon-beat && echo daemon started
          - name: probe
            variables:
              - {key: PROBES, value: %q}
              - {key: COORD, value: "http://10.0.2.2:%d"}
            script:
              - |
%s
`, strings.Join(probes, " "), h.coordPort, indent(probeScript, "                ")))
	w := h.watchJobs([]string{"daemon", "probe"}, 5*time.Minute)
	rss := casePeak()
	daemon, probe := w["daemon"].job, w["probe"].job
	if daemon.Status != "success" || !strings.Contains(string(daemon.Trace), "\ndaemon started\n") {
		t.Errorf("daemon job: %s %s\n%s", daemon.Status, daemon.FailureReason, daemon.Trace)
	}
	ptr := string(probe.Trace)
	if probe.Status != "success" {
		t.Errorf("probe job: %s %s\n%s", probe.Status, probe.FailureReason, ptr)
	}
	for _, p := range probes {
		name := p[:strings.IndexByte(p, '=')]
		want := "probe " + name + " closed"
		if name == "coordinator" {
			want = "probe coordinator open"
		}
		if !strings.Contains(ptr, "\n"+want+"\n") {
			t.Errorf("probe job's trace lacks %q:\n%s", want, ptr)
		}
	}
	for _, auth := range []string{"none", "job"} {
		if !regexp.MustCompile(`\nadmin ` + auth + `: +HTTP/1\.1 401 `).MatchString(ptr) {
			t.Errorf("the coordinator's admin API did not refuse a VM (auth %s) with 401:\n%s", auth, ptr)
		}
	}
	if n := h.sentinel.accepted.Load(); n > 0 {
		t.Errorf("a VM reached a host loopback port that is not allowed: %d connections", n)
	}
	if strings.Contains(ptr, h.adminToken) {
		t.Error("the admin token reached a job's trace")
	}
	tableRow(t, "qemu: daemon forked to outlive its job", outcome(daemon)+"; the next job's VM holds nothing of it", rss, "n/a", w["daemon"].deletion())
	tableRow(t, "qemu: job probes metrics port, admin API, host loopback, other VM, DNS, metadata", outcome(probe)+"; all refused (admin API: 401), the coordinator's allowed port open",
		rss, "n/a", w["probe"].deletion())

	// 2. A job that kills its whole VM, and one that kills the VM's SSH
	// server. Time to detect: from the VM's end (its qemu process exits)
	// to the job's failure.
	h.apply(`
projects:
  - name: second
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: none}]
        jobs:
          - {name: kill-vm, timeout: 600, script: ["echo killing the VM; sleep 2; echo b > /proc/sysrq-trigger; sleep 60; echo still here"]}
          - {name: kill-sshd, timeout: 600, script: ["echo killing sshd; sleep 2; killall -9 dropbear; sleep 60; echo still here"]}
`)
	w = h.watchJobs([]string{"kill-vm", "kill-sshd"}, 5*time.Minute)
	rss = casePeak()
	for _, n := range []string{"kill-vm", "kill-sshd"} {
		s := w[n]
		j := s.job
		if j.Status != "failed" || j.FailureReason != runnerapi.FailureRunnerSystemFailure || strings.Contains(string(j.Trace), "\nstill here\n") {
			t.Errorf("job %s: %s %s, want failed runner_system_failure\n%s", j.Name, j.Status, j.FailureReason, j.Trace)
		}
		detect := "VM ended after the job"
		if !s.vmGone.IsZero() && s.vmGone.Before(s.ended) {
			detect = s.ended.Sub(s.vmGone).Round(100 * time.Millisecond).String()
		}
		tableRow(t, "qemu: job "+map[string]string{"kill-vm": "kills its VM (sysrq b)", "kill-sshd": "kills its SSH server (the VM powers off)"}[n],
			outcome(j), rss, detect+" from VM end to job failed", "yes (VM gone, instance deleted)")
	}

	// 3. A job that fills its disk: the script's own failure, with its
	// exit code (the stage supervisor keeps room for its exit status).
	h.apply(`
projects:
  - name: third
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: none}]
        jobs:
          - {name: fill-disk, timeout: 600, script: ["echo filling the disk", "dd if=/dev/zero of=/builds/fill bs=1M 2>/dev/null || exit 7"]}
`)
	fillAt := h.traceShows("fill-disk", "filling the disk", 4*time.Minute)
	w = h.watchJobs([]string{"fill-disk"}, 5*time.Minute)
	rss = casePeak()
	fill := w["fill-disk"].job
	if fill.Status != "failed" || fill.FailureReason != runnerapi.FailureScriptFailure || !strings.Contains(string(fill.Trace), "filling the disk") {
		t.Errorf("fill-disk: %s %s, want failed script_failure\n%s", fill.Status, fill.FailureReason, fill.Trace)
	}
	if !strings.Contains(string(fill.Trace), "exit code 7") {
		t.Errorf("fill-disk's trace does not report its exit code 7:\n%s", fill.Trace)
	}
	tableRow(t, "qemu: job fills its disk", outcome(fill), rss,
		w["fill-disk"].ended.Sub(fillAt).Round(100*time.Millisecond).String()+" from the fill's start to job failed", w["fill-disk"].deletion())

	// 4. The next job: a fresh VM, nothing of the jobs before it there.
	h.apply(`
projects:
  - name: fourth
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: none}]
        jobs:
          - name: next
            script:
              - test ! -e /tmp/daemon-beat && test ! -e /builds/daemon-was-here && test ! -e /builds/fill && echo clean VM
              - if ps | grep -v grep | grep -q hostile-daemon; then echo daemon alive; exit 1; fi
`)
	next := h.wait("next", 4*time.Minute)
	if next.Status != "success" || !strings.Contains(string(next.Trace), "\nclean VM\n") {
		t.Errorf("next job: %s %s\n%s", next.Status, next.FailureReason, next.Trace)
	}
	seen := map[string]string{}
	for _, j := range []coordinator.JobRecord{daemon, probe, w["fill-disk"].job, next} {
		vm := instanceOf(t, j)
		if other, dup := seen[vm]; dup {
			t.Errorf("jobs %s and %s ran on the same VM %s", other, j.Name, vm)
		}
		seen[vm] = j.Name
	}
	casePeak()

	_ = h.cmd.Process.Signal(syscall.SIGQUIT)
	select {
	case <-h.exited:
	case <-time.After(2 * time.Minute):
		t.Fatal("mayfly run did not drain within 2m")
	}
	if left := qemuProcesses(h.stateDir); len(left) > 0 {
		t.Errorf("qemu processes left after the drain: %v", left)
	}
	if vms := h.vmSSHPorts(); len(vms) > 0 {
		t.Errorf("VM state left after the drain: %v", vms)
	}
}

// indent prefixes every line of s with p.
func indent(s, p string) string {
	return p + strings.ReplaceAll(s, "\n", "\n"+p)
}
