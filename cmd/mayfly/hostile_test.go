package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// Hostile jobs (issue 19): a shared fleet runs strangers' code, which
// controls its VM completely. Each test runs `mayfly run` as a process of
// its own on the fake plugin, whose instances are one local dropbear in a
// PID namespace of its own (the "VM"), and asserts that the manager's
// memory stays bounded (its peak RSS, VmHWM), that the job ends with the
// right state, reason and trace, that its instance is deleted, and that
// the next job runs on a fresh instance. The cases that need a real VM
// (its deletion, its disk, its network) are in hostile_qemu_test.go.

// maxManagerRSS bounds the manager's peak resident memory in every
// hostile case: a few times what an idle manager takes (about 30-40 MiB),
// far below what keeping a flood or an unbounded buffer would take.
const maxManagerRSS = 160 << 20

// hostileEnv is one `mayfly run` process for a hostile case.
type hostileEnv struct {
	*procEnv
	cmd     *exec.Cmd
	exited  <-chan error
	started time.Time
}

// startHostile starts mayfly run on pipeline with runnerExtra added to the
// [[runners]] entry (e.g. output_limit) and one idle instance.
func startHostile(t *testing.T, pipeline, runnerExtra string) *hostileEnv {
	t.Helper()
	e := newProcEnv(t, pipeline, "", 1)
	if runnerExtra != "" {
		b, err := os.ReadFile(e.cfgPath)
		if err != nil {
			t.Fatal(err)
		}
		cfg := strings.Replace(string(b), "  shell = \"sh\"\n", "  shell = \"sh\"\n"+runnerExtra+"\n", 1)
		if err := os.WriteFile(e.cfgPath, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cmd, exited := e.start()
	return &hostileEnv{procEnv: e, cmd: cmd, exited: exited, started: time.Now()}
}

// peakRSS returns the manager process's peak resident set size (VmHWM).
func (h *hostileEnv) peakRSS() int64 {
	h.t.Helper()
	return vmHWM(h.t, h.cmd.Process.Pid)
}

// resetPeakRSS resets the peak resident set size (VmHWM) of process pid
// to its current size (proc(5), clear_refs "5"), so that the next reading
// is the peak of what came after.
func resetPeakRSS(t testing.TB, pid int) {
	t.Helper()
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0); err != nil {
		t.Fatalf("reset the manager's peak RSS: %v", err)
	}
}

// tableRow logs one row of issue 19's table of hostile cases: the case,
// its outcome, the manager's peak RSS during it, the time to detect and
// whether the VM was deleted. `go test -v -run Hostile ./cmd/mayfly/ |
// grep hostile-table` prints the table.
func tableRow(t testing.TB, name, outcome string, rss int64, detect, deleted string) {
	t.Helper()
	t.Logf("hostile-table | %s | %s | %.1f MiB | %s | %s |", name, outcome, float64(rss)/(1<<20), detect, deleted)
}

// vmHWM reads the peak resident set size of process pid in bytes.
func vmHWM(t testing.TB, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("read the manager's memory figures: %v", err)
	}
	m := regexp.MustCompile(`(?m)^VmHWM:\s+(\d+) kB$`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no VmHWM in /proc/%d/status:\n%s", pid, b)
	}
	kb, _ := strconv.ParseInt(string(m[1]), 10, 64)
	return kb << 10
}

// runningViaRE finds the instance a job ran on in its trace.
var runningViaRE = regexp.MustCompile(`Running on \S+ via (\S+)\.\.\.`)

// instanceOf returns the instance job j ran on, from its trace.
func instanceOf(t testing.TB, j coordinator.JobRecord) string {
	t.Helper()
	m := runningViaRE.FindSubmatch(j.Trace)
	if m == nil {
		t.Fatalf("job %s: no 'Running on ... via' line in the trace:\n%s", j.Name, j.Trace)
	}
	return string(m[1])
}

// enqueue adds a pipeline of one project to the coordinator.
func (h *hostileEnv) enqueue(pipeline string) {
	h.t.Helper()
	p, err := coordinator.ParsePipelineFile("next.yaml", []byte(pipeline))
	if err != nil {
		h.t.Fatal(err)
	}
	if _, err := h.srv.Apply(p); err != nil {
		h.t.Fatal(err)
	}
}

// nextJobPipeline is the job that must run normally after a hostile one.
const nextJobPipeline = `
projects:
  - name: next
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: none}]
        jobs:
          - {name: next, script: ["echo next job runs"]}
`

// afterHostile checks what every hostile case must leave: the hostile
// job's instance deleted at the provider, and a next job that runs and
// succeeds on another instance. It returns the manager's peak RSS, read
// after both jobs, and when the instance was seen deleted.
func (h *hostileEnv) afterHostile(hostile coordinator.JobRecord) (int64, string) {
	h.t.Helper()
	used := instanceOf(h.t, hostile)
	ended := time.Now()
	deadline := time.Now().Add(30 * time.Second)
	for slices.Contains(h.fakeInstances(), used) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	deletion := fmt.Sprintf("yes, %v after the job was seen ended", time.Since(ended).Round(100*time.Millisecond))
	if slices.Contains(h.fakeInstances(), used) {
		h.t.Errorf("the hostile job's instance %s was not deleted within 30s: %v", used, h.fakeInstances())
		deletion = "NO"
	}
	deleted := time.Now()
	h.enqueue(nextJobPipeline)
	next := h.waitJob("next", "success", time.Minute)
	h.t.Logf("hostile job seen ended %v after start; its instance %s gone %v later; the next job done %v after that",
		ended.Sub(h.started).Round(10*time.Millisecond), used, deleted.Sub(ended).Round(10*time.Millisecond), time.Since(deleted).Round(10*time.Millisecond))
	if !strings.Contains(string(next.Trace), "\nnext job runs\n") {
		h.t.Errorf("next job's trace lacks its output:\n%s", next.Trace)
	}
	if got := instanceOf(h.t, next); got == used {
		h.t.Errorf("the next job ran on the hostile job's instance %s", used)
	}
	rss := h.peakRSS()
	h.t.Logf("manager peak RSS (VmHWM): %.1f MiB", float64(rss)/(1<<20))
	if rss > maxManagerRSS {
		h.t.Errorf("manager peak RSS %d MiB, want at most %d MiB", rss>>20, maxManagerRSS>>20)
	}
	return rss, deletion
}

// gitlabRunnerLimitNotice is the notice gitlab-runner (helpers/trace's
// limit writer) writes into a trace that reached output_limit, with its
// colours: bold yellow, then reset.
func gitlabRunnerLimitNotice(limit int) string {
	return fmt.Sprintf("\n\x1b[33;1mJob's log exceeded limit of %d bytes.\n"+
		"Job execution will continue but no more output will be collected.\x1b[0;m\n", limit)
}

// A script that floods its output at full speed far past output_limit:
// the trace stops at the limit with gitlab-runner's notice, the script
// runs to its end at its own speed (it is not slowed into the job
// timeout by back-pressure), the job succeeds, and the manager does not
// hold the flood in memory.
func TestHostileOutputFlood(t *testing.T) {
	t.Parallel() // waits more than it computes: overlaps the other waiting end-to-end tests
	const (
		limitKB = 1024
		floodMB = 256
	)
	h := startHostile(t, fmt.Sprintf(`
projects:
  - name: web
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: none}]
        jobs:
          - name: flood
            timeout: 120
            script:
              - echo flood starts
              - start=$(date +%%s); { yes 'flood flood flood flood flood flood flood flood flood' | head -c %d || true; }; echo; echo "flood took $(( $(date +%%s) - start ))s" >&2; echo $(( $(date +%%s) - start )) > "$CI_BUILDS_DIR/flood-seconds"
              - echo after the flood
`, floodMB<<20), fmt.Sprintf("  output_limit = %d", limitKB))
	start := time.Now()
	j := h.waitJob("flood", "success", 3*time.Minute)
	took := time.Since(start)
	tr := string(j.Trace)
	notice := gitlabRunnerLimitNotice(limitKB << 10)
	if !strings.Contains(tr, notice) {
		t.Errorf("the trace lacks gitlab-runner's limit notice %q; its end:\n%q", notice, tr[max(0, len(tr)-600):])
	}
	if n := len(j.Trace); n < limitKB<<10 || n > limitKB<<10+len(notice)+64 {
		t.Errorf("trace of %d bytes, want the limit %d plus the notice", n, limitKB<<10)
	}
	if strings.Contains(tr, "after the flood") {
		t.Error("output after the limit reached the trace")
	}
	secs, _ := os.ReadFile(filepath.Join(h.dir, "builds", "flood-seconds"))
	rss, deletion := h.afterHostile(j)
	t.Logf("flood of %d MiB: job done %v after pick-up wait start, the script's own flood took %ss; manager peak RSS %.1f MiB",
		floodMB, took.Round(100*time.Millisecond), strings.TrimSpace(string(secs)), float64(rss)/(1<<20))
	tableRow(t, fmt.Sprintf("fake+dropbear: output flood of %d MiB past output_limit %d KiB", floodMB, limitKB),
		fmt.Sprintf("%s; trace cut at the limit with gitlab-runner's notice; the flood took the script %ss", outcome(j), strings.TrimSpace(string(secs))),
		rss, "n/a (job done "+took.Round(100*time.Millisecond).String()+" after it was queued)", deletion)
}

// silentTermIgnoringScript prints once, then never again, ignores SIGTERM
// (so do its children, which inherit the ignored signal) and runs forever.
const silentTermIgnoringScript = `echo going silent; trap '' TERM; exec sh -c 'while :; do sleep 1; done' hostile-marker-%s`

// A script that never prints and ignores SIGTERM is ended by the job
// timeout and by a cancel alike: the stage is killed (SIGKILL after the
// grace), the job reports the right reason, and its instance is deleted.
func TestHostileSilentScriptIgnoringSIGTERM(t *testing.T) {
	t.Parallel() // waits more than it computes: overlaps the other waiting end-to-end tests
	marker := strconv.FormatInt(time.Now().UnixNano(), 36)
	h := startHostile(t, fmt.Sprintf(`
projects:
  - name: web
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: none}]
        jobs:
          - {name: silent-timeout, timeout: 5, script: ["%s"]}
`, fmt.Sprintf(silentTermIgnoringScript, "timeout"+marker)), "")
	h.waitJob("silent-timeout", "running", 2*time.Minute)
	runningAt := time.Now()
	j := h.waitJob("silent-timeout", "failed", 2*time.Minute)
	timedOut := time.Since(runningAt) - 5*time.Second
	if j.FailureReason != runnerapi.FailureJobExecutionTimeout {
		t.Errorf("timed-out job: %s, want job_execution_timeout\n%s", j.FailureReason, j.Trace)
	}
	if !strings.Contains(string(j.Trace), "going silent") || !strings.Contains(string(j.Trace), "ERROR: Job failed: execution took longer than") {
		t.Errorf("timed-out job's trace:\n%s", j.Trace)
	}
	if left := processesWith("timeout" + marker); len(left) > 0 {
		t.Errorf("the timed-out script still runs: %v", left)
	}
	rss, deletion := h.afterHostile(j)
	tableRow(t, "fake+dropbear: silent script ignoring SIGTERM, timeout 5s", outcome(j)+"; its processes gone", rss,
		fmt.Sprintf("%v past the timeout (seen running to failed, less 5s)", timedOut.Round(100*time.Millisecond)), deletion)
	resetPeakRSS(t, h.cmd.Process.Pid)

	// A cancel: the same script, canceled while it runs.
	h.enqueue(fmt.Sprintf(`
projects:
  - name: cancel
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: none}]
        jobs:
          - {name: silent-cancel, timeout: 600, script: ["%s"]}
`, fmt.Sprintf(silentTermIgnoringScript, "cancel"+marker)))
	running := h.waitJob("silent-cancel", "running", time.Minute)
	deadline := time.Now().Add(30 * time.Second)
	for len(processesWith("cancel"+marker)) == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	canceledAt := time.Now()
	if _, err := h.srv.Cancel(running.ID); err != nil {
		t.Fatal(err)
	}
	for len(processesWith("cancel"+marker)) > 0 && time.Since(canceledAt) < time.Minute {
		time.Sleep(20 * time.Millisecond)
	}
	if left := processesWith("cancel" + marker); len(left) > 0 {
		t.Errorf("the canceled script still runs a minute after the cancel: %v", left)
	}
	gone := time.Since(canceledAt)
	t.Logf("cancel to script gone: %v", gone.Round(10*time.Millisecond))
	j = h.waitJob("silent-cancel", "canceled", time.Minute)
	used := instanceOf(t, j)
	for slices.Contains(h.fakeInstances(), used) && time.Since(canceledAt) < time.Minute {
		time.Sleep(50 * time.Millisecond)
	}
	deletion = fmt.Sprintf("yes, %v after the cancel", time.Since(canceledAt).Round(100*time.Millisecond))
	if slices.Contains(h.fakeInstances(), used) {
		t.Errorf("the canceled job's instance %s was not deleted", used)
		deletion = "NO"
	}
	tableRow(t, "fake+dropbear: silent script ignoring SIGTERM, canceled", outcome(j)+"; its processes gone", h.peakRSS(),
		fmt.Sprintf("%v from the cancel to the script gone", gone.Round(100*time.Millisecond)), deletion)
}

// processesWith returns the pids of processes whose command line holds s.
func processesWith(s string) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(b, []byte(s)) {
			continue
		}
		if st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil {
			if i := bytes.LastIndexByte(st, ')'); i > 0 && len(st) > i+2 && st[i+2] == 'Z' {
				continue // a zombie is gone already
			}
		}
		out = append(out, pid)
	}
	return out
}

// markerTime waits until the file at path exists and returns when it
// appeared (polled every 10ms), or fails the test after within.
func markerTime(t *testing.T, path string, within time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(path); err == nil {
			return time.Now()
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s did not appear within %v", path, within)
	return time.Time{}
}

// killSessionsScript kills every dropbear process but the listener (whose
// parent is the namespace's init), so every SSH connection to the machine
// drops, the manager's too, while the machine and its SSH server live on.
const killSessionsScript = `for f in /proc/[0-9]*/stat; do read -r p c s pp _ < "$f" || continue; if [ "$c" = "(dropbear)" ] && [ "$pp" != 1 ]; then kill -9 "$p"; fi; done`

// A script that kills the machine's SSH sessions, the manager's among
// them, while the SSH server lives on: the stage runs on detached, the
// manager reconnects and follows it to its end, and the job succeeds with
// all its output.
func TestHostileKillsSSHSessions(t *testing.T) {
	t.Parallel() // waits more than it computes: overlaps the other waiting end-to-end tests
	h := startHostile(t, `
projects:
  - name: web
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: none}]
        jobs:
          - name: kill-sessions
            timeout: 120
            script:
              - echo before the kill; sleep 2
              - touch "$CI_BUILDS_DIR/killing"; `+killSessionsScript+`
              - sleep 2; echo after the kill
`, "")
	killed := markerTime(t, filepath.Join(h.dir, "builds", "killing"), 2*time.Minute)
	j := h.waitJob("kill-sessions", "success", 2*time.Minute)
	reattached := time.Since(killed)
	t.Logf("sessions killed to job success: %v", reattached.Round(10*time.Millisecond))
	tr := string(j.Trace)
	if !strings.Contains(tr, "\nbefore the kill\n") || !strings.Contains(tr, "\nafter the kill\n") {
		t.Errorf("the trace lacks output from before or after the kill:\n%s", tr)
	}
	rss, deletion := h.afterHostile(j)
	tableRow(t, "fake+dropbear: job kills every SSH session (the manager's too), server lives", outcome(j)+"; reconnected, all output kept", rss,
		fmt.Sprintf("%v from the kill to job success (the script sleeps 2s after it)", reattached.Round(100*time.Millisecond)), deletion)
}

// A script that kills the machine's SSH server outright (here the
// server's death ends the machine: its PID namespace goes with it, as a
// VM whose sshd was killed is of no more use): the manager gives up on
// the machine within a bound and fails the job with
// runner_system_failure; the instance is deleted, and once a machine is
// reachable again the next job runs.
func TestHostileKillsSSHServer(t *testing.T) {
	t.Parallel() // waits more than it computes: overlaps the other waiting end-to-end tests
	h := startHostile(t, `
projects:
  - name: web
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: none}]
        jobs:
          - name: kill-sshd
            timeout: 600
            script:
              - echo before the kill; sleep 2
              - touch "$CI_BUILDS_DIR/killing"; killall -9 dropbear; sleep 5; echo after the kill
`, "")
	killed := markerTime(t, filepath.Join(h.dir, "builds", "killing"), 2*time.Minute)
	j := h.waitJob("kill-sshd", "failed", 5*time.Minute)
	detect := time.Since(killed)
	t.Logf("SSH server killed to job failed: %v", detect.Round(10*time.Millisecond))
	if j.FailureReason != runnerapi.FailureRunnerSystemFailure {
		t.Errorf("job: %s, want runner_system_failure\n%s", j.FailureReason, j.Trace)
	}
	if tr := string(j.Trace); !strings.Contains(tr, "\nbefore the kill\n") || !strings.Contains(tr, "ERROR: Job failed: ") {
		t.Errorf("trace:\n%s", tr)
	}
	if err := h.ssh.Restart(); err != nil {
		t.Fatal(err)
	}
	rss, deletion := h.afterHostile(j)
	tableRow(t, "fake+dropbear: job kills its SSH server (the machine ends)", outcome(j), rss,
		fmt.Sprintf("%v from the kill to job failed", detect.Round(100*time.Millisecond)), deletion)
}

// Escape sequences and bytes that are not UTF-8 reach the trace exactly as
// the script wrote them, and a masked value is still masked next to them,
// inside colour codes, and when the script writes it in two pieces with a
// trace upload in between.
func TestHostileEscapesAndInvalidUTF8(t *testing.T) {
	t.Parallel() // waits more than it computes: overlaps the other waiting end-to-end tests
	const secret = "hunter2-s3cr3t-value"
	h := startHostile(t, `
projects:
  - name: web
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: none}]
        jobs:
          - name: escapes
            variables: [{key: SECRET, value: "`+secret+`", masked: true}]
            script:
              - |
                printf 'esc:\033[31mred\033[0m \033]0;title\007 bell\007 cr\rline\033[2J\033[H\n'
                printf 'bad:\377\376\375 end \300\257 \355\240\200\n'
                printf 'pre\377%s\376post\n' "$SECRET"
                printf '\033[1m%s\033[0m\n' "$SECRET"
                printf 'split:%s' "${SECRET%????????}"; sleep 2; printf '%s:end\n' "${SECRET#????????????}"
`, "")
	j := h.waitJob("escapes", "success", 2*time.Minute)
	tr := string(j.Trace)
	for _, want := range []string{
		"\nesc:\x1b[31mred\x1b[0m \x1b]0;title\x07 bell\x07 cr\rline\x1b[2J\x1b[H\n",
		"\nbad:\xff\xfe\xfd end \xc0\xaf \xed\xa0\x80\n",
		"\npre\xff[MASKED]\xfepost\n",
		"\n\x1b[1m[MASKED]\x1b[0m\n",
		"\nsplit:[MASKED]:end\n",
	} {
		if !strings.Contains(tr, want) {
			t.Errorf("the trace lacks %q:\n%q", want, tr)
		}
	}
	if strings.Contains(tr, "hunter2") || strings.Contains(tr, "s3cr3t") {
		t.Errorf("the masked value leaked into the trace:\n%q", tr)
	}
	if j.TraceVerified == nil || !*j.TraceVerified {
		t.Error("the stored trace does not match the checksum the runner reported")
	}
	rss, deletion := h.afterHostile(j)
	tableRow(t, "fake+dropbear: escape sequences, invalid UTF-8, masked value split and wrapped", outcome(j)+"; bytes stored as sent, value masked", rss, "n/a", deletion)
}
