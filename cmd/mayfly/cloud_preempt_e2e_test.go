package main

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/plugins/gce/gcefake"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

// viaRE finds the instance id ("zone/name") in a trace's "Running on HOST
// via ID..." line.
var viaRE = regexp.MustCompile(`via ([a-z0-9-]+)/([a-z0-9-]+)\.\.\.`)

// TestGCEPreemptionDuringJobEndToEnd preempts a spot VM in the middle of a
// job, through the real mayfly-plugin-gce process and the GCE fake, and
// checks what a user sees: the job fails with runner_system_failure and
// the trace says the VM disappeared, its script is stopped, the other job
// succeeds, and the fleet deletes the preempted VM.
//
// Every instance is played by one real dropbear on a loopback address of
// its own, port 22 as the plugin reports. The fake's Linux guest agent
// publishes dropbear's host key in guest attributes (hostkeys/), where the
// plugin reads the key the manager pins, and plays the agent's account
// management by authorising each ssh-keys metadata entry on dropbear.
//
// A preempted VM's processes die with it. The instances here share one
// dropbear on the host, and a job's stages run detached from their SSH
// session (they survive a broken connection by design), so the test plays
// the guest's power-off: once the fleet has deleted the preempted instance
// it kills the processes whose environment carries the long job's BEAT
// file. (On GCE the guest may go down earlier, within its 30 s shutdown; a
// stage killed before the fleet notices would race the loss, which this
// test does not time.)
//
// The fleet notices a preemption at its next list of the provider: every
// update_interval (default 1m; 2s here), or update_interval_when_expecting
// (default 2s) while instances boot. With the default the loss took 41-57s
// to notice when nothing was booting, measured before the keys were
// honoured.
func TestGCEPreemptionDuringJobEndToEnd(t *testing.T) {
	t.Parallel() // waits more than it computes: overlaps the other waiting end-to-end tests
	sshd := sshtest.Run(t, sshtest.Dropbear)
	vm := listenLoopback(t, 22)
	forward(t, vm, sshd.Addr)
	vmIP, _, _ := net.SplitHostPort(vm.Addr().String())

	// The guest agent's account management: every key of the login user in
	// an instance's ssh-keys metadata is authorised on dropbear before the
	// insert (or setMetadata) is answered.
	var authMu sync.Mutex
	authorized := map[string]bool{}
	agent := func(in gcefake.InstanceInfo) {
		for line := range strings.Lines(in.Metadata["ssh-keys"]) {
			user, key, ok := strings.Cut(strings.TrimSpace(line), ":")
			if !ok || user != sshd.User {
				continue
			}
			authMu.Lock()
			done := authorized[key]
			authorized[key] = true
			authMu.Unlock()
			if done {
				continue
			}
			if err := authorize(sshd, key); err != nil {
				t.Errorf("instance %s: authorise its ssh-keys entry: %v", in.Name, err)
			}
		}
	}
	const preemptDelay = 2 * time.Second // the guest's shutdown time: 30s at most on GCE
	fake := gcefake.New(gcefake.Options{
		Project: "e2e-project", BootDelay: time.Second, AgentDelay: 200 * time.Millisecond,
		PreemptDelay: preemptDelay,
		Address:      vmIP, HostKeys: []string{sshd.HostKey}, OnMetadata: agent,
	})
	api := httptest.NewServer(fake)
	t.Cleanup(api.Close)

	dir := t.TempDir()
	pluginDir := filepath.Join(dir, "plugins")
	buildPlugin(t, pluginDir, "github.com/mayfly-ci/mayfly/plugins/gce/cmd/mayfly-plugin-gce")

	// The long job counts in a file the test reads (dropbear's sessions see
	// the host's file system): the count goes on while its script runs.
	beat := filepath.Join(dir, "beat")
	srv, url := startCoordinator(t, cloudToken, fmt.Sprintf(`
projects:
  - name: spot
    pipelines:
      - variables:
          - {key: GIT_STRATEGY, value: none}
          - {key: BEAT, value: %q}
        jobs:
          - name: long
            script:
              - echo "preempt-$((6*7))"
              - i=0; while [ $i -lt 300 ]; do i=$((i+1)); echo $i > "$BEAT"; sleep 1; done
              - echo never-reached
          - {name: short, script: ["echo hello-$CI_JOB_NAME"]}
`, beat))
	cfg := fmt.Sprintf(`concurrent = 2
check_interval = 1
log_level = "info"

[[runners]]
  name = "gce-spot"
  url = %q
  token = %q
  executor = "instance"
  shell = "sh"
  builds_dir = %q
  [runners.autoscaler]
    plugin = "gce"
    max_use_count = 1
    max_instances = 8
    delete_instances_on_shutdown = true
    update_interval = "2s"
    [runners.autoscaler.plugin_config]
      project = "e2e-project"
      zones = ["us-east1-b"]
      machine_type = "n1-standard-1"
      spot = true
      os = "linux"
      username = %q
      endpoint = %q
      credentials_file = %q
      poll_interval = "100ms"
      rate_limit = { rate = 50.0, burst = 20 }
    [runners.autoscaler.connector_config]
      os = "linux"
      protocol = "ssh"
      timeout = "30s"
    [[runners.autoscaler.policy]]
      idle_count = 1
      idle_time = "1m"
`, url, cloudToken, filepath.Join(dir, "builds"), sshd.User, api.URL, gceCredentials(t, api.URL, "e2e-project"))

	stop := make(chan struct{})
	results := make(chan preemptResult, 1)
	powerOff := func(name string, stop <-chan struct{}) {
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for deleted := false; !deleted; {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			for _, r := range fake.Requests() {
				deleted = deleted || r.Method == "instances.delete" && r.Name == name && r.Status == http.StatusOK
			}
		}
		if err := killProcessesWithEnv("BEAT=" + beat); err != nil {
			t.Errorf("power off the preempted VM: %v", err)
		}
	}
	go func() { results <- preemptLongJob(srv, fake, beat, powerOff, stop) }()
	defer close(stop)
	logs := runUntilDone(t, srv, dir, pluginDir, cfg, 100*time.Second)

	var res preemptResult
	select {
	case res = <-results:
	case <-time.After(10 * time.Second):
		t.Fatalf("the preempting goroutine did not finish\nmanager log:\n%s", logs)
	}
	if res.err != nil {
		t.Fatalf("%v\nmanager log:\n%s", res.err, logs)
	}

	jobs := srv.Jobs()
	if len(jobs) != 2 {
		t.Errorf("%d jobs at the coordinator, want 2", len(jobs))
	}
	for _, j := range jobs {
		trace := string(j.Trace)
		switch j.Name {
		case "long":
			if j.Status != "failed" || j.FailureReason != "runner_system_failure" {
				t.Errorf("job long: %s %q, want failed runner_system_failure:\n%s", j.Status, j.FailureReason, trace)
			}
			if !strings.Contains(trace, "the VM running the job disappeared") {
				t.Errorf("job long: the trace does not say the VM disappeared:\n%s", trace)
			}
			if strings.Contains(trace, "\nnever-reached") {
				t.Errorf("job long: its script ran to the end:\n%s", trace)
			}
		case "short":
			if j.Status != "success" || !strings.Contains(trace, "\nhello-"+j.Name+"\n") {
				t.Errorf("job %s: %s %q, want success with hello-%s in the trace:\n%s", j.Name, j.Status, j.FailureReason, j.Name, trace)
			}
		}
	}

	// The long job's script stopped with the job: the count does not go on.
	after := readBeat(beat)
	time.Sleep(2500 * time.Millisecond)
	if again := readBeat(beat); again != after {
		t.Errorf("the long job's script still runs after the job ended: count %d, then %d", after, again)
	}
	if res.beatsBefore < 2 {
		t.Errorf("the long job's count was %d before the preemption: the check above proves nothing", res.beatsBefore)
	}

	// GCE recorded the preemption, the fleet deleted the preempted VM
	// after it, and nothing is left.
	preempted := false
	for _, op := range fake.Operations() {
		if op.Type == gcefake.OpPreempted && strings.HasSuffix(op.Target, "/instances/"+res.name) {
			preempted = true
		}
	}
	if !preempted {
		t.Errorf("no compute.instances.preempted operation targets %s", res.name)
	}
	var deletedAt time.Time
	for _, r := range fake.Requests() {
		if r.Method == "instances.delete" && r.Name == res.name && r.Status == http.StatusOK && deletedAt.IsZero() {
			deletedAt = r.Time
		}
	}
	switch {
	case deletedAt.IsZero():
		t.Errorf("the preempted instance %s/%s was never deleted", res.zone, res.name)
	case deletedAt.Before(res.at):
		t.Errorf("the preempted instance was deleted at %s, before its preemption at %s", deletedAt, res.at)
	}
	for _, in := range fake.Instances() {
		t.Errorf("instance %s/%s is %s after shutdown, want deleted", in.Zone, in.Name, in.Status)
	}
	// The plugin reported the instance failed because it was preempted.
	if !strings.Contains(logs, "acquired instance lost") || !strings.Contains(logs, "failed: preempted") {
		t.Errorf("the manager log does not record the instance lost as preempted:\n%s", logs)
	}

	// How long the preemption took to reach the job: the first list after
	// the preemption is the fleet's detection.
	var listedAt time.Time
	for _, r := range fake.Requests() {
		if r.Method == "instances.aggregatedList" && r.Time.After(res.at) {
			listedAt = r.Time
			break
		}
	}
	t.Logf("preempted %s at +%s into its job; first list after it %s later, instance deleted %s later, job failed %s later",
		res.name, res.at.Sub(res.markerAt).Round(time.Millisecond), listedAt.Sub(res.at).Round(time.Millisecond),
		deletedAt.Sub(res.at).Round(time.Millisecond), res.failedAt.Sub(res.at).Round(time.Millisecond))
}

// preemptResult is what preemptLongJob did.
type preemptResult struct {
	zone, name  string
	markerAt    time.Time // the long job's marker seen in its trace
	at          time.Time // the preemption
	failedAt    time.Time // the long job seen failed
	beatsBefore int       // the long job's count when preempted
	err         error
}

// preemptLongJob waits until the long job's script runs (its marker is in
// the trace and its count goes on), preempts the long job's VM in the
// fake, powers its guest off (powerOff, in the background, until stop),
// and waits for the long job to end. It gives up when stop is closed or after 3 minutes.
func preemptLongJob(srv *coordinator.Server, fake *gcefake.Server, beat string, powerOff func(name string, stop <-chan struct{}), stop <-chan struct{}) preemptResult {
	var res preemptResult
	deadline := time.After(3 * time.Minute)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	wait := func() error {
		select {
		case <-stop:
			return fmt.Errorf("stopped while waiting (marker seen %t, preempted %t)", !res.markerAt.IsZero(), !res.at.IsZero())
		case <-deadline:
			return fmt.Errorf("gave up after 3 minutes (marker seen %t, preempted %t)", !res.markerAt.IsZero(), !res.at.IsZero())
		case <-tick.C:
			return nil
		}
	}
	long := func() (coordinator.JobRecord, bool) {
		for _, j := range srv.Jobs() {
			if j.Name == "long" {
				return j, true
			}
		}
		return coordinator.JobRecord{}, false
	}
	for {
		if j, ok := long(); ok && strings.Contains(string(j.Trace), "\npreempt-42") {
			m := viaRE.FindStringSubmatch(string(j.Trace))
			if m == nil {
				res.err = fmt.Errorf("no instance id in the long job's trace:\n%s", j.Trace)
				return res
			}
			res.zone, res.name, res.markerAt = m[1], m[2], time.Now()
			break
		}
		if res.err = wait(); res.err != nil {
			return res
		}
	}
	// The script is in its loop: the count moves.
	first := readBeat(beat)
	for res.beatsBefore < first+2 {
		if res.err = wait(); res.err != nil {
			return res
		}
		res.beatsBefore = readBeat(beat)
	}
	res.beatsBefore = readBeat(beat)
	res.at = time.Now()
	if err := fake.Preempt(res.zone, res.name); err != nil {
		res.err = fmt.Errorf("preempt the long job's instance: %w", err)
		return res
	}
	off := make(chan struct{})
	go func() { defer close(off); powerOff(res.name, stop) }()
	defer func() { <-off }()
	for {
		if j, ok := long(); ok && coordinator.IsFinal(j.Status) {
			res.failedAt = time.Now()
			return res
		}
		if res.err = wait(); res.err != nil {
			return res
		}
	}
}

// readBeat returns the count in file, 0 if none yet.
func readBeat(file string) int {
	b, _ := os.ReadFile(file)
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n
}

// killProcessesWithEnv sends SIGKILL to every process whose environment
// holds the entry kv, as a VM's power-off ends every process in it.
func killProcessesWithEnv(kv string) error {
	dirs, err := os.ReadDir("/proc")
	if err != nil {
		return fmt.Errorf("list processes: %w", err)
	}
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		env, err := os.ReadFile(filepath.Join("/proc", d.Name(), "environ"))
		if err != nil {
			continue // gone, or not ours to read
		}
		for _, e := range strings.Split(string(env), "\x00") {
			if e == kv {
				_ = syscall.Kill(pid, syscall.SIGKILL)
				break
			}
		}
	}
	return nil
}
