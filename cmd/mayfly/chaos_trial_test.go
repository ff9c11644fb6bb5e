package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/manager/gitlab"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
	"github.com/mayfly-ci/mayfly/providers/fake"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

// One chaos trial: a few jobs through `mayfly run`, SIGKILL at a seeded
// moment of a seeded phase of their life, `mayfly run` again on the same
// state dir, and a count of what became of every job and instance.

// Phases a trial kills the manager in.
const (
	phaseReserve     = "reserve"   // asking GitLab for a job, an instance promised
	phaseRequest     = "request"   // GitLab answered with a job
	phaseJournaled   = "journaled" // the job's journal appeared (TestChaosKillRightAfterReceipt)
	phaseCreate      = "create"    // the provider's create call in flight
	phaseConnect     = "connect"   // the first SSH connection to an instance
	phaseTrace       = "trace"     // a trace upload (PATCH) in flight
	phaseDelete      = "delete"    // an instance being deleted
	phaseBoot        = "boot"
	phaseGetSources  = "get_sources"
	phaseScript      = "script"
	phaseAfterScript = "after_script"
	phaseUpload      = "upload"
	phaseFinalUpdate = "final_update"
)

// chaosSetup is what the trials of one provider share.
type chaosSetup struct {
	provider string // "fake" or "qemu"
	binDir   string
	ssh      *sshtest.Server // fake: every instance is this server
	cacheDir string          // qemu: the VM images
	jobs     int             // jobs per trial
	boot     time.Duration   // fake: boot delay; qemu: an estimate
	within   time.Duration   // bound for the jobs to end after the restart
}

// chaosJob is one job of a trial and the result its script decides.
type chaosJob struct {
	name  string
	exit  int // 0: success; else script_failure
	sleep time.Duration
	// dropSSH, when set, is how long into its script the job (on qemu)
	// kills the VM's sshd processes serving connections, severing every
	// SSH connection of the manager to its VM mid-stage.
	dropSSH time.Duration
}

// trialResult counts what became of a trial's jobs and instances.
type trialResult struct {
	phase                    string
	jobs, runningAtKill      int
	trueAtKill, cleanAtKill  int // of those running at the kill
	wrong                    int // neither their true result nor a clean failure
	stuck, leaked, reused    int
	pickupLost               int // never finished, but the killed manager never read them
	pickupAtKill             int // of those, running in GitLab at the kill (the others were handed out to the dead manager's request after it)
	reran, badTrace, crashes int
	resume                   []time.Duration
	triggerMissed            bool
	fault                    string
	injected                 int            // faults injected
	trueAll, cleanOther      int            // all jobs with their true result; clean failures not running at the kill
	why                      map[string]int // runner_system_failure reasons
	resumedJobs              int            // jobs the restarted manager resumed
	outageFailed             int            // failed as GitLab's outage refused their artifacts
	outageAtKill             int            // of those, running at the kill
	// maxSilence is the longest a job some manager ran went without a
	// call that touches it in GitLab (taken, applied trace patch, update):
	// what the stuck-job timeout must outlast.
	maxSilence time.Duration
	problems   []string
}

func (r *trialResult) problem(format string, args ...any) {
	r.problems = append(r.problems, fmt.Sprintf(format, args...))
}

// chaosProject writes the trial's project: a repository whose
// .gitlab-ci.yml has jobs that sleep in every phase long enough to be
// killed in, mark on the machine that their script ran (a second run
// prints CHAOS-RERAN), and on qemu that their VM is fresh (a VM used
// before prints CHAOS-VM-REUSED). On the fake provider get_sources fetches
// the repository from the coordinator; qemu VMs here have no git and no
// route to it, so there GIT_STRATEGY is none and nothing is uploaded.
func chaosProjects(t testing.TB, s *chaosSetup, dir string, jobs []chaosJob, marks string) []string {
	q := strconv.Quote
	list := func(lines ...string) string {
		out := make([]string, len(lines))
		for i, l := range lines {
			out[i] = q(l)
		}
		return "[" + strings.Join(out, ", ") + "]"
	}
	var dirs []string
	for _, j := range jobs {
		var b strings.Builder
		fmt.Fprintf(&b, "variables:\n  CHAOS_MARKS: %s\n", q(marks))
		if s.provider == "qemu" {
			b.WriteString("  GIT_STRATEGY: none\n")
		}
		pre := []string{"echo chaos-get-sources", "sleep 1.5"}
		script := []string{"echo chaos-script-start"}
		if s.provider == "qemu" {
			script = append(script, "if [ -e /var/chaos-vm-used ]; then echo CHAOS-VM-REUSED; fi; touch /var/chaos-vm-used")
		}
		if j.dropSSH > 0 {
			// dropbear's connection processes are the children of the
			// listening one (whose parent is init): killed, every
			// connection to the VM ends at once; the stage, detached from
			// them, goes on.
			script = append(script, fmt.Sprintf(`(sleep %.1f; n=0; for d in /proc/[0-9]*; do [ "$(cat $d/comm 2>/dev/null)" = dropbear ] || continue; [ "$(cut -d' ' -f4 $d/stat)" = 1 ] && continue; kill -9 "${d#/proc/}" && n=$((n+1)); done; echo "chaos-ssh-dropped-$n") &`, j.dropSSH.Seconds()))
		}
		script = append(script,
			`if [ -e "$CHAOS_MARKS/ran-$CI_JOB_ID" ]; then echo CHAOS-RERAN; fi; echo x >> "$CHAOS_MARKS/ran-$CI_JOB_ID"`,
			fmt.Sprintf("sleep %.1f", j.sleep.Seconds()))
		if s.provider == "fake" {
			script = append(script, "head -c 4000000 /dev/urandom > out.bin")
		}
		script = append(script, "cat chaos.txt 2>/dev/null || true", "echo chaos-script-end")
		if j.exit != 0 {
			script = append(script, fmt.Sprintf("exit %d", j.exit))
		}
		fmt.Fprintf(&b, "%s:\n  hooks:\n    pre_get_sources_script: %s\n  script: %s\n  after_script: %s\n",
			j.name, list(pre...), list(script...), list("echo chaos-after-$CI_JOB_STATUS", "sleep 1.5"))
		if s.provider == "fake" {
			b.WriteString("  artifacts: {paths: [out.bin], when: always}\n")
		}
		pdir := filepath.Join(dir, "project-"+j.name)
		if err := os.MkdirAll(pdir, 0o755); err != nil {
			t.Fatal(err)
		}
		for name, content := range map[string]string{".gitlab-ci.yml": b.String(), "chaos.txt": "chaos-source-fetched\n"} {
			if err := os.WriteFile(filepath.Join(pdir, name), []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		dirs = append(dirs, pdir)
	}
	return dirs
}

// chaosConfig is the trial's config.toml.
func chaosConfig(s *chaosSetup, url, token, dir string, proxyPort int, chaos string) string {
	if s.provider == "qemu" {
		// The builder the qemu end-to-end tests use; the connector's
		// timeout (the boot watchdog) is the boot timeout, 150 s on a
		// loaded machine, and no VM stays idle.
		return qemuConfig(s.jobs, "info", filepath.Join(dir, "provider"), s.cacheDir, qemuRunner{
			name: "chaos", url: url, token: token, memoryMB: 256, maxInstances: s.jobs, bootTimeout: "150s", idleTime: "0s"})
	}
	head := fmt.Sprintf(`concurrent = %d
check_interval = 1
log_level = "info"
log_format = "json"

[[runners]]
  name = "chaos"
  url = %q
  token = %q
  executor = "instance"
  shell = "sh"
`, s.jobs, url, token)
	host, port := "127.0.0.1", strconv.Itoa(proxyPort)
	return head + fmt.Sprintf(`  builds_dir = %q
  [runners.autoscaler]
    plugin = "fake"
    max_instances = %d
    delete_instances_on_shutdown = true
    [runners.autoscaler.plugin_config]
      state_dir = %q
      boot_delay = %q
      create_delay = "400ms"
      delete_delay = "500ms"
%s      [runners.autoscaler.plugin_config.connect]
        address = %q
        port = %s
        username = %q
        host_key = %q
        private_key = '''
%s'''
    [runners.autoscaler.connector_config]
      timeout = "30s"
    [[runners.autoscaler.policy]]
      idle_count = 0
`, filepath.Join(dir, "builds"), s.jobs+1, filepath.Join(dir, "provider"), s.boot.String(), chaos, host, port, s.ssh.User, s.ssh.HostKey, s.ssh.ClientKeyPEM)
}

// instancesLeft returns the instances the provider still holds: those of
// the fake plugin's state file not being deleted (a delete the provider
// accepted; the fake drops them at its next call), or the qemu processes
// of the trial's state dir.
func (s *chaosSetup) instancesLeft(t testing.TB, dir string) []string {
	if s.provider == "qemu" {
		return qemuProcesses(filepath.Join(dir, "provider"))
	}
	var ids []string
	for id, st := range providerStates(dir) {
		if st != "deleting" {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}

// runChaosTrial runs trial index of setup s in phase with fault, seeded by
// seed.
func runChaosTrial(t *testing.T, s *chaosSetup, seed uint64, index int, phase, fault string) trialResult {
	rng := rand.New(rand.NewPCG(seed, uint64(index)))
	res := trialResult{phase: phase, fault: fault, why: map[string]int{}}
	dir := t.TempDir()
	marks := "/tmp"
	if s.provider == "fake" {
		marks = filepath.Join(dir, "marks")
		if err := os.MkdirAll(marks, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	jobs := make([]chaosJob, s.jobs)
	want := map[string]chaosJob{}
	for i := range jobs {
		jobs[i] = chaosJob{name: fmt.Sprintf("j%d", i+1), sleep: time.Duration(2000+rng.IntN(1000)) * time.Millisecond}
		if rng.IntN(2) == 1 {
			jobs[i].exit = 3
		}
		want[jobs[i].name] = jobs[i]
	}
	if s.provider == "qemu" && fault == faultSSHDrop {
		// No proxy stands between the manager and a VM's sshd: the job
		// cuts its own connections from inside the VM, mid-script.
		for i := range jobs {
			jobs[i].dropSSH = time.Duration(300+rng.IntN(1200)) * time.Millisecond
			want[jobs[i].name] = jobs[i]
		}
	}
	token := fmt.Sprintf("chaos-%s-%d", s.provider, index)
	slow := 1500 * time.Millisecond
	stuck := chaosStuckTimeout(fault)
	c := startChaosCoordinator(t, token, chaosProjects(t, s, dir, jobs, marks), slow, stuck)
	if phase == phaseFinalUpdate && rng.IntN(2) == 1 {
		// GitLab refuses the first final updates too: the manager retries.
		if err := c.srv.InjectFault(coordinator.Fault{Endpoint: coordinator.FaultUpdateJob, Status: 503, Times: 2}); err != nil {
			t.Fatal(err)
		}
	}
	var proxy *sshProxy
	chaosSettings := ""
	if s.provider == "fake" {
		proxy = startSSHProxy(t, s.ssh.Addr)
		if fault == faultProvider {
			// 10 % of the calls fail, and one fault of each trial is
			// forced, its kind in turn: a trial makes few calls.
			kinds := []string{fake.ChaosRateLimited, fake.ChaosServerError, fake.ChaosQuota, fake.ChaosStockout, fake.ChaosCreateTimeout, fake.ChaosPreempted}
			chaosSettings = fmt.Sprintf("      [runners.autoscaler.plugin_config.chaos]\n        rate = 0.1\n        seed = %d\n        retry_after = \"1s\"\n        first = %q\n",
				seed*1000+uint64(index), kinds[(index/len(fakeFaults))%len(kinds)])
		}
	}
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(chaosConfig(s, c.url, token, dir, proxy.portOr0(), chaosSettings)), 0o600); err != nil {
		t.Fatal(err)
	}
	stateDir := filepath.Join(dir, "state")
	id := fmt.Sprintf("chaos-%s-%d", s.provider, index)
	within := s.within + stuck // a job lost at pick-up ends by the stuck-job clean-up
	if fault == faultCoordinator {
		within += *chaosOutage
	}
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	m1 := startChaosManager(t, s.binDir, cfgPath, stateDir, id)

	// The trial's fault, at seeded moments from the first start on.
	dctx, dcancel := context.WithCancel(ctx)
	drv := &faultDriver{cancel: dcancel}
	var m2 *chaosManager
	var mgrMu sync.Mutex
	current := func() *chaosManager { mgrMu.Lock(); defer mgrMu.Unlock(); return cmp.Or(m2, m1) }
	switch fault {
	case faultPluginKill:
		drv.at(dctx, seededDelays(rng, 3, 500*time.Millisecond, 12*time.Second), func() int { return killPlugins(dctx, current()) })
	case faultSSHDrop:
		if proxy != nil { // qemu: the jobs cut their connections themselves
			drv.at(dctx, seededDelays(rng, 4, 2*time.Second, 30*time.Second), proxy.sever)
		}
	case faultCoordinator:
		drv.at(dctx, seededDelays(rng, 1, 0, 8*time.Second), func() int { return c.outage(*chaosOutage) })
	}

	// The kill: a seeded moment after the phase is seen to begin.
	traceHas := func(text string) bool {
		for _, j := range c.srv.Jobs() {
			if bytes.Contains(j.Trace, []byte(text)) {
				return true
			}
		}
		return false
	}
	var seen time.Time
	var window time.Duration
	ok := waitFor(ctx, func() bool {
		switch phase {
		case phaseReserve, phaseRequest, phaseTrace, phaseUpload, phaseFinalUpdate:
			v, w := map[string]*atomic.Int64{phaseReserve: &c.requestSeen, phaseRequest: &c.jobServed, phaseTrace: &c.traceSeen, phaseUpload: &c.uploadSeen, phaseFinalUpdate: &c.finalSeen}[phase],
				map[string]time.Duration{phaseReserve: 20 * time.Millisecond, phaseRequest: 30 * time.Millisecond, phaseTrace: 20 * time.Millisecond, phaseUpload: slow, phaseFinalUpdate: slow}[phase]
			at, ok := seenAt(v)
			if ok {
				seen, window = at, w
			}
			return ok
		case phaseJournaled:
			if paths, _ := filepath.Glob(filepath.Join(stateDir, "jobs", "*.journal")); len(paths) > 0 {
				seen, window = time.Now(), 0
				return true
			}
		case phaseCreate, phaseDelete:
			for _, st := range providerStates(dir) {
				if phase == phaseCreate || st == "deleting" {
					seen, window = time.Now(), map[string]time.Duration{phaseCreate: 400 * time.Millisecond, phaseDelete: 300 * time.Millisecond}[phase]
					return true
				}
			}
		case phaseConnect:
			if at, ok := proxy.firstAccepted(); ok {
				seen, window = at, 300*time.Millisecond
				return true
			}
		case phaseBoot:
			for _, j := range c.srv.Jobs() {
				if j.Status == "running" {
					seen, window = time.Now(), s.boot*8/10
					return true
				}
			}
		case phaseGetSources, phaseScript, phaseAfterScript:
			text := map[string]string{phaseGetSources: "chaos-get-sources", phaseScript: "chaos-script-start", phaseAfterScript: "chaos-after-"}[phase]
			if traceHas(text) {
				seen, window = time.Now(), 800*time.Millisecond
				return true
			}
		}
		return false
	})
	if !ok || !m1.running() {
		res.triggerMissed = true
		res.problem("phase %s was not seen within %v (manager running: %v)", phase, within, m1.running())
	} else {
		time.Sleep(time.Until(seen.Add(time.Duration(rng.Int64N(int64(window) + 1)))))
	}
	atKill := map[int64]bool{}
	for _, j := range c.srv.Jobs() {
		if j.Status == "running" {
			atKill[j.ID] = true
		}
	}
	if !m1.running() {
		res.crashes++
		res.problem("the first manager exited by itself: %v\n%s", m1.err, m1.log.String())
	}
	m1.kill()
	t.Logf("killed %v after the start", time.Since(m1.started).Round(100*time.Millisecond))
	res.runningAtKill = len(atKill)

	mgrMu.Lock()
	m2 = startChaosManager(t, s.binDir, cfgPath, stateDir, id)
	mgrMu.Unlock()
	if fault == faultPluginKill {
		// The first kill finds the restarted manager's plugin as soon as
		// it exists: in its start-up handshake, which the host retries.
		delays := append([]time.Duration{0}, seededDelays(rng, 1, 500*time.Millisecond, 6*time.Second)...)
		drv.at(dctx, delays, func() int { return killPlugins(dctx, m2) })
	}
	// Done when every job ended: those lost at pick-up too, failed by the
	// coordinator's stuck-job clean-up (the instances go meanwhile). The
	// coordinator says when, rather than being polled: the trials run side
	// by side on few cores.
	_ = c.srv.WaitAllFinished(ctx)
	t.Logf("jobs done %v after the restart", time.Since(m2.started).Round(100*time.Millisecond))
	res.injected = drv.stop()
	switch fault {
	case faultProvider:
		res.injected = providerFaults(dir)
	case faultCoordinator:
		res.injected = int(c.outageServed.Load())
	case faultSSHDrop:
		if s.provider == "qemu" {
			res.injected = sshDropsInTraces(c.srv.Jobs())
		}
	}
	left := func() bool { return len(s.instancesLeft(t, dir)) == 0 }
	lctx, lcancel := context.WithTimeout(context.Background(), 60*time.Second)
	waitFor(lctx, left)
	lcancel()
	t.Logf("instances gone %v after the restart", time.Since(m2.started).Round(100*time.Millisecond))
	if l := s.instancesLeft(t, dir); len(l) > 0 {
		res.leaked = len(l)
		res.problem("instances left after every job ended: %v", l)
	}
	if !m2.running() {
		res.crashes++
		res.problem("the restarted manager exited by itself: %v", m2.err)
	} else if err := m2.drain(time.Minute); err != nil {
		res.crashes++
		res.problem("the restarted manager's drain: %v", err)
	}
	if os.Getenv("CHAOS_DEBUG") != "" { // both managers' logs, also of a trial that went well

		t.Logf("m1:\n%s\nm2:\n%s", m1.log.String(), m2.log.String())
	}
	res.resume = resumeTimes(m2, atKill)
	res.resumedJobs = len(resumedJobs(m2))
	known := maps.Clone(journaledJobs(m1))
	maps.Copy(known, journaledJobs(m2))
	maps.Copy(known, resumedJobs(m2))
	countJobs(&res, c.srv.Jobs(), want, atKill, known, s.provider == "fake")
	if len(res.problems) > 0 {
		res.problem("first manager's log:\n%s\nrestarted manager's log:\n%s", m1.log.String(), m2.log.String())
	}
	return res
}

// countJobs sorts a trial's jobs into the result's columns.
func countJobs(res *trialResult, records []coordinator.JobRecord, want map[string]chaosJob, atKill, journaled map[int64]bool, fetched bool) {
	vms := map[string]string{}
	for _, j := range records {
		res.jobs++
		tr := string(j.Trace)
		w := want[j.Name]
		if !coordinator.IsFinal(j.Status) {
			res.stuck++
			res.problem("job %s (%d) never ended, %s:\n%s", j.Name, j.ID, j.Status, tr)
			continue
		}
		if j.FailureReason == runnerapi.FailureStuckOrTimeout {
			if !journaled[j.ID] && strings.HasPrefix(tr, stuckLinePrefix) {
				// GitLab handed the job out as the manager was killed,
				// before its journal reached the disk (the manager
				// writes it first thing after reading the answer): the
				// runner API leaves nothing to finish such a job with,
				// and GitLab's stuck-job clean-up fails it.
				res.pickupLost++
				if atKill[j.ID] {
					res.pickupAtKill++
				}
				res.problem("job %s (%d) was handed out as the manager was killed, before its journal was written: failed by the stuck-job clean-up", j.Name, j.ID)
				continue
			}
			res.wrong++
			res.problem("job %s (%d), journaled %v, was failed by the stuck-job clean-up while a manager ran it:\n%s", j.Name, j.ID, journaled[j.ID], tr)
			continue
		}
		res.maxSilence = max(res.maxSilence, longestSilence(j))
		wantStatus, wantReason := "success", ""
		if w.exit != 0 {
			wantStatus, wantReason = "failed", runnerapi.FailureScriptFailure
		}
		isTrue := j.Status == wantStatus && j.FailureReason == wantReason &&
			strings.Contains(tr, "\nchaos-script-end\n") && (!fetched || strings.Contains(tr, "\nchaos-source-fetched\n")) && strings.Contains(tr, "chaos-after-"+map[bool]string{true: "success", false: "failed"}[w.exit == 0])
		clean := j.Status == "failed" && j.FailureReason == runnerapi.FailureRunnerSystemFailure &&
			regexp.MustCompile(`ERROR: Job failed: \(system failure\) \S`).MatchString(tr)
		if clean {
			res.why[failureWhy(tr)]++
		}
		// GitLab's outage refused the artifacts of a script that succeeded,
		// past the helper's retry budget (5 min; gitlab-runner's helper
		// gives up after 6 tries while GitLab answers 503): the job fails.
		refused := res.fault == faultCoordinator && w.exit == 0 && j.Status == "failed" && j.FailureReason == runnerapi.FailureScriptFailure &&
			strings.Contains(tr, "\nchaos-script-end\n") && artifactsRefused.MatchString(tr)
		switch {
		case isTrue && atKill[j.ID]:
			res.trueAtKill++
			res.trueAll++
		case isTrue:
			res.trueAll++
		case clean && atKill[j.ID]:
			res.cleanAtKill++
			res.problem("job %s (%d), running at the kill, failed cleanly:\n%s", j.Name, j.ID, tr)
		case clean:
			res.cleanOther++
			res.problem("job %s (%d) failed cleanly:\n%s", j.Name, j.ID, tr)
		case refused:
			res.outageFailed++
			if atKill[j.ID] {
				res.outageAtKill++
			}
			res.problem("job %s (%d) failed: GitLab's outage refused its artifacts", j.Name, j.ID)
		default:
			res.wrong++
			res.problem("job %s (%d): %s %q, want %s %q or a clean runner_system_failure:\n%s", j.Name, j.ID, j.Status, j.FailureReason, wantStatus, wantReason, tr)
		}
		if strings.Contains(tr, "\nCHAOS-RERAN\n") {
			res.reran++
			res.problem("job %s (%d): its script ran twice:\n%s", j.Name, j.ID, tr)
		}
		if strings.Contains(tr, "\nCHAOS-VM-REUSED\n") {
			res.reused++
			res.problem("job %s (%d) ran on a VM used before:\n%s", j.Name, j.ID, tr)
		}
		if j.TraceVerified == nil || !*j.TraceVerified {
			res.badTrace++
			res.problem("job %s (%d): the stored trace does not match the reported checksum:\n%q", j.Name, j.ID, tr)
		}
		for _, m := range runningOn.FindAllStringSubmatch(tr, -1) {
			if prev, dup := vms[m[2]]; dup && prev != j.Name {
				res.reused++
				res.problem("jobs %s and %s ran on the same instance %s", prev, j.Name, m[2])
			}
			vms[m[2]] = j.Name
		}
	}
}

// sshDropsInTraces counts the SSH connections the qemu jobs cut from inside
// their VMs, as their traces report them.
func sshDropsInTraces(jobs []coordinator.JobRecord) int {
	n := 0
	for _, j := range jobs {
		for _, m := range sshDropped.FindAllStringSubmatch(string(j.Trace), -1) {
			k, _ := strconv.Atoi(m[1])
			n += k
		}
	}
	return n
}

var sshDropped = regexp.MustCompile(`(?m)^chaos-ssh-dropped-([0-9]+)$`)

// longestSilence is the longest gap between the calls that touched job j
// in the coordinator: its start, every trace patch it applied (202) and
// every update it accepted (200), up to the last of them.
func longestSilence(j coordinator.JobRecord) time.Duration {
	times := []time.Time{j.StartedAt}
	for _, p := range j.Patches {
		if p.Status == http.StatusAccepted {
			times = append(times, p.Time)
		}
	}
	for _, u := range j.Updates {
		if u.Status == http.StatusOK {
			times = append(times, u.Time)
		}
	}
	slices.SortFunc(times, func(a, b time.Time) int { return a.Compare(b) })
	var longest time.Duration
	for i := 1; i < len(times); i++ {
		longest = max(longest, times[i].Sub(times[i-1]))
	}
	return longest
}

// resumeTimes reads, from the restarted manager's log, how long after its
// start each job running at the kill was found again: reattached to its VM,
// or (when it had none yet) resumed.
func resumeTimes(m *chaosManager, atKill map[int64]bool) []time.Duration {
	at := map[int64]time.Time{}
	for _, line := range strings.Split(m.log.String(), "\n") {
		var rec struct {
			Time time.Time `json:"time"`
			Msg  string    `json:"msg"`
			Job  int64     `json:"job"`
		}
		if json.Unmarshal([]byte(line), &rec) != nil || !atKill[rec.Job] {
			continue
		}
		switch rec.Msg {
		case "job reattached":
			at[rec.Job] = rec.Time
		case "resuming a job a previous manager started":
			if _, ok := at[rec.Job]; !ok {
				at[rec.Job] = rec.Time
			}
		}
	}
	var out []time.Duration
	for _, t := range at {
		out = append(out, t.Sub(m.started))
	}
	return out
}

// journaledJobs returns the jobs a manager's log says it wrote the
// journal of.
func journaledJobs(m *chaosManager) map[int64]bool { return logged(m, "job journaled") }

// resumedJobs returns the jobs a restarted manager's log says it found a
// journal of.
func resumedJobs(m *chaosManager) map[int64]bool { return logged(m, "job to resume") }

// logged returns the jobs of the log records of m with message msg.
func logged(m *chaosManager, msg string) map[int64]bool {
	out := map[int64]bool{}
	for _, line := range strings.Split(m.log.String(), "\n") {
		var rec struct {
			Msg string `json:"msg"`
			Job int64  `json:"job"`
		}
		if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == msg {
			out[rec.Job] = true
		}
	}
	return out
}

// failureWhy is the reason a trace gives for a runner_system_failure,
// with instance names, numbers and durations taken out, so that alike
// reasons count together.
func failureWhy(trace string) string {
	m := systemFailureLine.FindStringSubmatch(trace)
	if m == nil {
		return "?"
	}
	why := instanceName.ReplaceAllString(m[1], "VM")
	why = numbers.ReplaceAllString(why, "N")
	if len(why) > 90 {
		why = why[:90] + "…"
	}
	return why
}

// stuckLinePrefix begins the trace of a job the coordinator's stuck-job
// clean-up failed before any runner wrote to it.
var stuckLinePrefix = "\nERROR: Job failed (stuck_or_timeout_failure): " + coordinator.StuckJobMessage

// managerBackoffMax is the longest pause of the manager's GitLab client
// after failed calls (manager/gitlab.Backoff's default cap, gitlab-runner's 60 s).
const managerBackoffMax = 60 * time.Second

// chaosStuckTimeout is the coordinator's stuck-job timeout in a trial with
// fault: the longest a live manager can leave a running job untouched,
// with room. A manager heartbeats a silent job after
// gitlab.DefaultForceSendInterval (30 s); across a kill the silences of
// both managers add up, plus the restart: -chaos.stuck (75 s) covers
// 2 × 30 s + 15 s. An outage that begins just before a heartbeat is due
// adds its length and the client's backoff after it (up to 60 s), so
// coordinator_5xx trials allow 30 s + the outage + 60 s + 15 s and wait
// that much longer for a job lost at pick-up; the other trials are not
// slowed by the outage's margin.
func chaosStuckTimeout(fault string) time.Duration {
	d := *chaosStuck
	if fault == faultCoordinator {
		d = max(d, gitlab.DefaultForceSendInterval+*chaosOutage+managerBackoffMax+15*time.Second)
	}
	return d
}

var (
	artifactsRefused  = regexp.MustCompile(`ERROR: uploading artifacts as "archive" to coordinator\.\.\. 503 Service Unavailable`)
	systemFailureLine = regexp.MustCompile(`ERROR: Job failed: \(system failure\) ([^\n]*)`)
	instanceName      = regexp.MustCompile(`\b(fake|qemu)-[0-9a-z-]+`)
	numbers           = regexp.MustCompile(`[0-9]+(\.[0-9]+)?(ms|s|m)?`)
)

func (p *sshProxy) portOr0() int {
	if p == nil {
		return 0
	}
	return p.port()
}
