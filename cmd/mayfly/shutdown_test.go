package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

// procEnv runs `mayfly run` as its own process, with the fake provider
// plugin whose instances are one local dropbear, against an in-process
// coordinator: for what only a process shows (signals, exit, children).
type procEnv struct {
	t         *testing.T
	dir       string
	binDir    string
	srv       *coordinator.Server
	url       string
	ssh       *sshtest.Server
	stateDir  string // the fake plugin's
	cfgPath   string
	runStderr *lockedBuffer
}

var (
	buildMayflyOnce sync.Once
	mayflyBinDir    string
	buildMayflyErr  error
)

// mayflyBinaries builds mayfly and the fake plugin once per test binary.
func mayflyBinaries(t *testing.T) string {
	t.Helper()
	buildMayflyOnce.Do(func() {
		dir, err := os.MkdirTemp("", "mayfly-proc-test-")
		if err != nil {
			buildMayflyErr = err
			return
		}
		mayflyBinDir = dir
		for _, pkg := range []string{"github.com/mayfly-ci/mayfly/cmd/mayfly", "github.com/mayfly-ci/mayfly/providers/fake/cmd/mayfly-plugin-fake"} {
			if out, err := exec.Command("go", "build", "-o", dir+"/", pkg).CombinedOutput(); err != nil {
				buildMayflyErr = fmt.Errorf("build %s: %w\n%s", pkg, err, out)
				return
			}
		}
	})
	if buildMayflyErr != nil {
		t.Fatal(buildMayflyErr)
	}
	return mayflyBinDir
}

func newProcEnv(t *testing.T, pipeline, extraGlobal string, idle int) *procEnv {
	t.Helper()
	e := &procEnv{t: t, dir: t.TempDir(), binDir: mayflyBinaries(t), ssh: sshtest.Run(t, sshtest.Dropbear)}
	e.srv, e.url = startCoordinator(t, "proc-test-token", pipeline)
	e.stateDir = filepath.Join(e.dir, "fake-state")
	cfg := fmt.Sprintf(`concurrent = 2
check_interval = 1
log_level = "info"
%s
[[runners]]
  name = "proc"
  url = %q
  token = "proc-test-token"
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
      idle_count = %d
`, extraGlobal, e.url, filepath.Join(e.dir, "builds"), fakePluginConfig(e.stateDir, e.ssh), idle)
	e.cfgPath = filepath.Join(e.dir, "config.toml")
	if err := os.WriteFile(e.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return e
}

// start starts `mayfly run` and returns the process and a channel that
// receives its exit.
func (e *procEnv) start() (*exec.Cmd, <-chan error) {
	e.t.Helper()
	cmd := exec.Command(filepath.Join(e.binDir, "mayfly"), "run", "--config", e.cfgPath,
		"--plugin-dir", e.binDir, "--state-dir", filepath.Join(e.dir, "state"), "--manager-id", "proc-test")
	e.runStderr = &lockedBuffer{}
	cmd.Stderr = e.runStderr
	// A child that kept the stderr pipe (a plugin that outlived mayfly)
	// must not hang the test: Wait gives up on the copy after WaitDelay.
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	exited := make(chan error, 1)
	waited := make(chan struct{})
	go func() { err := cmd.Wait(); exited <- err; close(waited) }()
	e.t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-waited
	})
	return cmd, exited
}

// waitJob waits until the job named name has status.
func (e *procEnv) waitJob(name, status string, within time.Duration) coordinator.JobRecord {
	e.t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		for _, j := range e.srv.Jobs() {
			if j.Name == name && j.Status == status {
				return j
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.t.Fatalf("job %s never reached %s within %v; manager log:\n%s", name, status, within, e.runStderr.String())
	return coordinator.JobRecord{}
}

// fakeInstances returns the ids the fake plugin holds in its state file.
func (e *procEnv) fakeInstances() []string {
	e.t.Helper()
	b, err := os.ReadFile(filepath.Join(e.stateDir, "state.json"))
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		e.t.Fatal(err)
	}
	var st struct {
		Instances []struct {
			ID string `json:"id"`
		} `json:"instances"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		e.t.Fatalf("fake state: %v\n%s", err, b)
	}
	var ids []string
	for _, in := range st.Instances {
		ids = append(ids, in.ID)
	}
	return ids
}

// pluginPIDs returns the fake plugin processes started from e's binaries.
func (e *procEnv) pluginPIDs() []int {
	e.t.Helper()
	want := filepath.Join(e.binDir, "mayfly-plugin-fake")
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, ent := range entries {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		exe, err := os.Readlink(filepath.Join("/proc", ent.Name(), "exe"))
		if err != nil || exe != want {
			continue
		}
		// Only this test's plugins: their parent, or former parent, ran with e's config.
		env, _ := os.ReadFile(filepath.Join("/proc", ent.Name(), "environ"))
		if bytes.Contains(env, []byte(e.dir)) || e.isChildOfOurs(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func (e *procEnv) isChildOfOurs(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
	if len(fields) < 2 {
		return false
	}
	ppid, _ := strconv.Atoi(fields[1])
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", ppid))
	return bytes.Contains(cmdline, []byte(e.cfgPath))
}

// lockedBuffer is a bytes.Buffer safe for concurrent use.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

const longJobPipeline = `
projects:
  - name: web
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: none}]
        jobs:
          - {name: long, script: ["echo started", "sleep 600"]}
`

// SIGTERM after SIGQUIT aborts the running job and the manager exits
// (issue 20: the SIGTERM was ignored during a drain).
func TestSIGTERMDuringDrainAbortsJobs(t *testing.T) {
	e := newProcEnv(t, longJobPipeline, "", 1)
	cmd, exited := e.start()
	e.waitJob("long", "running", time.Minute)
	time.Sleep(500 * time.Millisecond)
	_ = cmd.Process.Signal(syscall.SIGQUIT)
	select {
	case err := <-exited:
		t.Fatalf("mayfly run exited on SIGQUIT with a job running: %v\n%s", err, e.runStderr.String())
	case <-time.After(2 * time.Second):
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("mayfly run still running 30s after SIGTERM during a drain\n%s", e.runStderr.String())
	}
	j := e.waitJob("long", "failed", 5*time.Second)
	if j.FailureReason != runnerapi.FailureRunnerSystemFailure {
		t.Errorf("aborted job: %s, want runner_system_failure", j.FailureReason)
	}
	if left := e.fakeInstances(); len(left) != 0 {
		t.Errorf("instances left at the provider: %v", left)
	}
}

// A forceful stop that cannot finish (GitLab refuses the final update) ends
// at shutdown_timeout; a second SIGTERM ends it at once.
func TestShutdownTimeoutBoundsForcefulStop(t *testing.T) {
	for _, second := range []bool{false, true} {
		t.Run(fmt.Sprintf("second_signal=%v", second), func(t *testing.T) {
			timeout := 3
			if second {
				timeout = 120
			}
			e := newProcEnv(t, longJobPipeline, fmt.Sprintf("shutdown_timeout = %d", timeout), 1)
			if err := e.srv.InjectFault(coordinator.Fault{Endpoint: coordinator.FaultUpdateJob, Status: 503, Times: 100000}); err != nil {
				t.Fatal(err)
			}
			cmd, exited := e.start()
			e.waitJob("long", "running", time.Minute)
			time.Sleep(500 * time.Millisecond)
			start := time.Now()
			_ = cmd.Process.Signal(syscall.SIGTERM)
			if second {
				time.Sleep(time.Second)
				_ = cmd.Process.Signal(syscall.SIGTERM)
			}
			var err error
			select {
			case err = <-exited:
			case <-time.After(60 * time.Second):
				t.Fatalf("mayfly run still running 60s after SIGTERM with shutdown_timeout = %d\n%s", timeout, e.runStderr.String())
			}
			took := time.Since(start)
			if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
				t.Errorf("exit: %v, want exit status 1", err)
			}
			want := "did not finish within shutdown_timeout"
			if second {
				want = "again: exiting now"
			}
			if !strings.Contains(e.runStderr.String(), want) {
				t.Errorf("stderr lacks %q:\n%s", want, e.runStderr.String())
			}
			t.Logf("exited %v after the first SIGTERM", took.Round(100*time.Millisecond))
		})
	}
}

// A manager killed with SIGKILL takes its plugin with it, and the next
// manager takes over what the first one made, so that nothing is left
// (issue 20: plugins outlived a killed manager in every trial).
func TestKilledManagerLeavesNoPluginAndNoInstance(t *testing.T) {
	e := newProcEnv(t, `
projects:
  - name: web
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: none}]
        jobs:
          - {name: first, script: ["echo first"]}
`, "", 2)
	cmd, exited := e.start()
	e.waitJob("first", "success", time.Minute)
	deadline := time.Now().Add(30 * time.Second)
	for len(e.fakeInstances()) < 2 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	before := e.fakeInstances()
	if len(before) < 2 {
		t.Fatalf("fleet never reached its idle count: %v\n%s", before, e.runStderr.String())
	}
	plugins := e.pluginPIDs()
	if len(plugins) == 0 {
		t.Fatal("no plugin process found")
	}
	_ = cmd.Process.Kill()
	<-exited
	deadline = time.Now().Add(10 * time.Second)
	for len(e.pluginPIDs()) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if left := e.pluginPIDs(); len(left) > 0 {
		t.Fatalf("plugin processes %v outlived the killed manager by 10s", left)
	}

	// The next manager takes over what the first one made: instances that
	// never ran a job are adopted (the journal proves it), the others are
	// deleted; its drain then deletes them all.
	cmd2, exited2 := e.start()
	deadline = time.Now().Add(60 * time.Second)
	for !strings.Contains(e.runStderr.String(), "start-up reconciliation done") && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if m := regexp.MustCompile(`start-up reconciliation done.* listed=(\d+) deleting=(\d+) adopted=(\d+)`).FindStringSubmatch(e.runStderr.String()); m == nil {
		t.Fatalf("no start-up reconciliation in the restarted manager's log:\n%s", e.runStderr.String())
	} else if listed, _ := strconv.Atoi(m[1]); listed < len(before) {
		t.Errorf("the restarted manager listed %d instances, the killed one had %d: %s", listed, len(before), m[0])
	}
	_ = cmd2.Process.Signal(syscall.SIGQUIT)
	select {
	case <-exited2:
	case <-time.After(60 * time.Second):
		t.Fatal("restarted manager did not drain")
	}
	if left := e.fakeInstances(); len(left) != 0 {
		t.Errorf("instances left after the drain: %v", left)
	}
}

// TestSlowBootsIdleZeroEndToEnd is issue 20's repro through mayfly run, with
// boots shortened from 20 s to 5 s: IdleCount 0, IdleTime unset, concurrent
// 2, four one-second jobs. All finish, on at most four instances, none
// deleted unused, and no job waits for a second boot: before the fix jobs
// waited for boot after boot of VMs deleted unused.
//
// A boot is seen at the provider's next list, every
// update_interval_when_expecting (taskscaler's 2s by default; 500ms here),
// so pick-up to start is about check_interval + boot + up to one list
// interval; the bound is two boots, far from that and from the defect.
func TestSlowBootsIdleZeroEndToEnd(t *testing.T) {
	t.Parallel() // waits more than it computes: overlaps the other waiting end-to-end tests
	e := newProcEnv(t, `
projects:
  - name: web
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: none}]
        jobs:
          - {name: a, script: ["sleep 1"]}
          - {name: b, script: ["sleep 1"]}
          - {name: c, script: ["sleep 1"]}
          - {name: d, script: ["sleep 1"]}
`, "", 0)
	b, err := os.ReadFile(e.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(e.cfgPath, []byte(strings.NewReplacer(`boot_delay = "100ms"`, `boot_delay = "5s"`,
		`delete_instances_on_shutdown = true`, "delete_instances_on_shutdown = true\n    update_interval_when_expecting = \"500ms\"").Replace(string(b))), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd, exited := e.start()
	for _, n := range []string{"a", "b", "c", "d"} {
		e.waitJob(n, "success", 2*time.Minute)
	}
	_ = cmd.Process.Signal(syscall.SIGQUIT)
	<-exited
	log := e.runStderr.String()
	created := 0
	for _, m := range regexp.MustCompile(`msg="instances created".* count=(\d+)`).FindAllStringSubmatch(log, -1) {
		n, _ := strconv.Atoi(m[1])
		created += n
	}
	if created > 4 {
		t.Errorf("%d instances created for 4 jobs with IdleCount 0", created)
	}
	if n := strings.Count(log, "reason=idle_time uses=0"); n > 0 {
		t.Errorf("%d instances deleted unused for idle_time", n)
	}
	starts := regexp.MustCompile(`job script starting.* pickup_to_start_seconds=([0-9.]+)`).FindAllStringSubmatch(log, -1)
	if len(starts) != 4 {
		t.Fatalf("%d job starts in the log, want 4:\n%s", len(starts), log)
	}
	for _, m := range starts {
		d, _ := strconv.ParseFloat(m[1], 64)
		t.Logf("a job started %.1fs after pick-up", d)
		if d >= 2*5 {
			t.Errorf("a job started %.1fs after pick-up: it waited for more than one boot (5s)", d)
		}
	}
}
