package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

// The chaos suite (issue 16): `mayfly run` killed with SIGKILL at a seeded
// moment of each phase of its jobs' life (asking for a job with an
// instance reserved, the job just handed out, the provider's create in
// flight, waiting for the VM to boot, the first SSH connection,
// get_sources, the script, a trace upload, after_script, the artifact
// upload, the final update, an instance's deletion), started again on the same state
// directory, and every job and instance accounted for. Each trial also
// injects one kind of fault at seeded moments: none, SIGKILL of the
// provider plugin process, provider faults on 10 % of the calls (429 with
// Retry-After, 5xx, quota, stockout, a create that times out for its
// caller, preemptions), every SSH connection severed now and then, or
// GitLab answering 503 to everything for -chaos.outage. "pickup" counts
// jobs GitLab handed out as the manager was killed, before their journal
// reached the disk: the runner API leaves nothing to finish those with,
// and the coordinator's stuck-job clean-up fails them as GitLab's does
// (stuck_or_timeout_failure, after -chaos.stuck without a runner call
// instead of GitLab's hour); a job a live manager ran that the clean-up
// failed counts as wrong. "stuck" counts jobs that never ended and must
// stay 0. `make test` runs a few seeded trials; `make chaos`
// runs the long suite:
//
//	go test -run '^TestChaos$' -v ./cmd/mayfly/ -args -chaos.fake=100 -chaos.qemu=10 -chaos.parallel=4 -chaos.outage=1m
var (
	chaosFakeTrials = flag.Int("chaos.fake", 5, "chaos trials on the fake provider (local SSH server as every VM)")
	chaosQEMUTrials = flag.Int("chaos.qemu", 1, "chaos trials on the qemu provider (real microVMs)")
	chaosSeed       = flag.Uint64("chaos.seed", 16, "seed of the chaos trials (phases, kill moments, scripts)")
	chaosParallel   = flag.Int("chaos.parallel", 6, "fake-provider chaos trials run at once")
	chaosQEMUPar    = flag.Int("chaos.qemu-parallel", 1, "qemu chaos trials run at once (each boots its own VMs)")
	chaosMinTrue    = flag.Float64("chaos.min-true", 95, "per cent of the jobs running at a kill that must end with their true result")
	chaosOutage     = flag.Duration("chaos.outage", 5*time.Second, "how long the coordinator answers 503 in a coordinator_5xx trial")
	chaosStuck      = flag.Duration("chaos.stuck", 75*time.Second, "the coordinator's stuck-job timeout (coordinator_5xx trials: at least 30 s + the outage + 60 s of client backoff + 15 s); must outlast any silence of a live manager")
)

var (
	fakePhases = []string{phaseScript, phaseRequest, phaseCreate, phaseConnect, phaseGetSources, phaseAfterScript, phaseUpload,
		phaseFinalUpdate, phaseDelete, phaseReserve, phaseBoot, phaseTrace}
	fakeFaults = []string{faultNone, faultPluginKill, faultProvider, faultSSHDrop, faultCoordinator}
	// qemu VMs here have no git and no route to the coordinator, so their
	// jobs fetch and upload nothing. The script first: a short run kills
	// a real VM's job mid-script.
	qemuPhases = []string{phaseScript, phaseAfterScript, phaseFinalUpdate, phaseBoot}
	// The qemu trials' faults need no fake: the VMs outlive a killed
	// plugin, and a job cuts the SSH connections to its VM from inside.
	qemuFaults = []string{faultNone, faultPluginKill, faultCoordinator, faultSSHDrop}
)

func TestChaos(t *testing.T) {
	var (
		mu   sync.Mutex
		rows []chaosRow
		wg   sync.WaitGroup
	)
	t.Cleanup(func() { // the binaries go with the test (built again by a -count run)
		if chaosBinDir != "" {
			os.RemoveAll(chaosBinDir)
		}
		chaosBinOnce, chaosBinDir, chaosBinErr = sync.Once{}, "", nil
	})
	defer func() { printChaosTable(t, rows) }()
	defer wg.Wait()
	add := func(r ...chaosRow) { mu.Lock(); rows = append(rows, r...); mu.Unlock() }
	// The providers' trials run side by side: t.Run may be called from
	// several goroutines, and each subtest may end in t.Fatal.
	wg.Add(2)
	go func() {
		defer wg.Done()
		if n := *chaosFakeTrials; n > 0 {
			t.Run("fake", func(t *testing.T) {
				s := &chaosSetup{provider: "fake", binDir: chaosBinaries(t), ssh: sshtest.Run(t, sshtest.OpenSSH),
					jobs: 3, boot: 1500 * time.Millisecond, within: 2 * time.Minute}
				var receipt sync.WaitGroup
				receipt.Add(1)
				go func() {
					defer receipt.Done()
					t.Run("kill-right-after-receipt", func(t *testing.T) { killRightAfterReceipt(t, s) })
				}()
				add(runChaosTrials(t, s, n, *chaosParallel, fakePhases, fakeFaults)...)
				receipt.Wait()
			})
		}
	}()
	go func() {
		defer wg.Done()
		if n := *chaosQEMUTrials; n > 0 {
			t.Run("qemu", func(t *testing.T) {
				repo, err := filepath.Abs("../..")
				if err != nil {
					t.Fatal(err)
				}
				cacheDir := filepath.Join(repo, ".cache", "mayfly")
				requireQEMU(t, cacheDir)
				s := &chaosSetup{provider: "qemu", binDir: chaosBinaries(t), cacheDir: cacheDir,
					jobs: 2, boot: 6 * time.Second, within: 10 * time.Minute}
				add(runChaosTrials(t, s, n, *chaosQEMUPar, qemuPhases, qemuFaults)...)
			})
		}
	}()
}

// chaosRow sums the trials of one provider with one kind of fault.
type chaosRow struct {
	provider, fault string
	trials          int
	sum             trialResult
	phases          map[string]int
}

// runChaosTrials runs n trials, trial i in phase i mod len(phases) with
// fault i mod len(faults), or, when the two counts share a factor, fault
// (i + i/len(phases)) mod len(faults) (so that the first
// len(phases)*len(faults) trials try every pair), and fails the test on anything stuck, leaked,
// reused, run twice, wrong, or crashed, and when too few jobs killed
// mid-run end with their true result. It returns a row per fault.
func runChaosTrials(t *testing.T, s *chaosSetup, n, parallel int, phases, faults []string) []chaosRow {
	rows := map[string]*chaosRow{}
	for _, f := range faults {
		rows[f] = &chaosRow{provider: s.provider, fault: f, phases: map[string]int{}, sum: trialResult{why: map[string]int{}}}
	}
	var (
		mu  sync.Mutex
		wg  sync.WaitGroup
		sem = make(chan struct{}, max(1, parallel))
	)
	for i := range n {
		f := i
		if gcd(len(phases), len(faults)) != 1 {
			f += i / len(phases) // shift the faults each round of the phases
		}
		phase, fault := phases[i%len(phases)], faults[f%len(faults)]
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			t.Run(fmt.Sprintf("%03d-%s-%s", i, phase, fault), func(t *testing.T) {
				start := time.Now()
				r := runChaosTrial(t, s, *chaosSeed, i, phase, fault)
				mu.Lock()
				row := rows[fault]
				row.trials++
				row.phases[phase]++
				row.sum.add(r)
				mu.Unlock()
				t.Logf("%s/%s: %d jobs, %d true, %d running at the kill, %d true, %d clean failures, %d other clean failures, %d refused by GitLab's outage, %d wrong, %d stuck, %d lost at pick-up, %d leaked, %d reused, %d faults (%v)",
					phase, fault, r.jobs, r.trueAll, r.runningAtKill, r.trueAtKill, r.cleanAtKill, r.cleanOther, r.outageFailed, r.wrong, r.stuck, r.pickupLost, r.leaked, r.reused, r.injected, time.Since(start).Round(100*time.Millisecond))
				if r.wrong+r.stuck+r.leaked+r.reused+r.reran+r.badTrace+r.crashes > 0 {
					t.Errorf("trial %d (%s, %s):\n%s", i, phase, fault, strings.Join(r.problems, "\n"))
				} else if r.cleanAtKill+r.cleanOther+r.outageFailed > 0 || r.triggerMissed || r.pickupLost > 0 {
					t.Logf("trial %d (%s, %s):\n%s", i, phase, fault, strings.Join(r.problems, "\n"))
				}
			})
		}()
	}
	wg.Wait()
	var out []chaosRow
	var all trialResult
	for _, f := range faults {
		out = append(out, *rows[f])
		all.add(rows[f].sum)
	}
	if n := all.runningAtKill - all.pickupAtKill - all.outageAtKill; n > 0 {
		if pct := all.truePct(); pct < *chaosMinTrue {
			t.Errorf("%s: %.1f%% of the %d jobs running at a kill (%d lost at pick-up and %d failed by GitLab's outage left out) ended with their true result, want at least %.0f%%",
				s.provider, pct, n, all.pickupLost, all.outageAtKill, *chaosMinTrue)
		}
	}
	return out
}

func gcd(a, b int) int {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

func (r *trialResult) add(o trialResult) {
	r.jobs += o.jobs
	r.runningAtKill += o.runningAtKill
	r.trueAtKill += o.trueAtKill
	r.cleanAtKill += o.cleanAtKill
	r.wrong += o.wrong
	r.stuck += o.stuck
	r.pickupLost += o.pickupLost
	r.pickupAtKill += o.pickupAtKill
	r.leaked += o.leaked
	r.reused += o.reused
	r.reran += o.reran
	r.badTrace += o.badTrace
	r.crashes += o.crashes
	r.resume = append(r.resume, o.resume...)
	r.injected += o.injected
	r.trueAll += o.trueAll
	r.cleanOther += o.cleanOther
	r.resumedJobs += o.resumedJobs
	r.outageFailed += o.outageFailed
	r.outageAtKill += o.outageAtKill
	r.maxSilence = max(r.maxSilence, o.maxSilence)
	if r.why == nil {
		r.why = map[string]int{}
	}
	for k, v := range o.why {
		r.why[k] += v
	}
}

// truePct is the share of the jobs running at a kill that ended with
// their true result, of those the killed manager had journaled: a job lost
// at pick-up is the runner API's window, counted in its own column (with
// them, truePctAll). Jobs whose artifacts GitLab's outage refused are left
// out too (column gl503): the outage decided their result, not the kill.
func (r *trialResult) truePct() float64 {
	n := r.runningAtKill - r.pickupAtKill - r.outageAtKill
	if n <= 0 {
		return 100
	}
	return 100 * float64(r.trueAtKill) / float64(n)
}

// truePctAll is truePct with the jobs lost at pick-up counted as not true
// (those GitLab handed to the dead manager's request after the kill too).
func (r *trialResult) truePctAll() float64 {
	n := r.runningAtKill + r.pickupLost - r.pickupAtKill
	if n == 0 {
		return 100
	}
	return 100 * float64(r.trueAtKill) / float64(n)
}

// printChaosTable prints one line per provider and fault, a total per
// provider, and the reasons of the runner_system_failures.
func printChaosTable(t *testing.T, rows []chaosRow) {
	if len(rows) == 0 {
		return
	}
	var b strings.Builder
	fmt.Fprintf(&b, "chaos suite, seed %d, coordinator outage %v\n", *chaosSeed, *chaosOutage)
	head := "%-8s %-15s %6s %5s %5s %8s %7s %7s %5s %5s %5s %5s %6s %6s %6s %6s %5s %5s %7s %6s %10s %8s\n"
	fmt.Fprintf(&b, head, "provider", "fault", "trials", "jobs", "true", "run@kill", "true%", "true%+p", "rsf", "gl503", "wrong", "stuck", "pickup", "leaked", "reused", "reran", "badtr", "crash", "resumed", "faults", "resume-p50", "silence")
	line := func(provider, fault string, trials int, s trialResult) {
		fmt.Fprintf(&b, "%-8s %-15s %6d %5d %5d %8d %6.1f%% %6.1f%% %5d %5d %5d %5d %6d %6d %6d %6d %5d %5d %7d %6d %10s %8s\n",
			provider, fault, trials, s.jobs, s.trueAll, s.runningAtKill, s.truePct(), s.truePctAll(), s.cleanAtKill+s.cleanOther, s.outageFailed, s.wrong, s.stuck, s.pickupLost,
			s.leaked, s.reused, s.reran, s.badTrace, s.crashes, s.resumedJobs, s.injected, median(s.resume), s.maxSilence.Round(100*time.Millisecond))
	}
	for _, provider := range []string{"fake", "qemu"} {
		var total trialResult
		trials := 0
		phases := map[string]int{}
		for _, r := range rows {
			if r.provider != provider {
				continue
			}
			line(r.provider, r.fault, r.trials, r.sum)
			total.add(r.sum)
			trials += r.trials
			for p, n := range r.phases {
				phases[p] += n
			}
		}
		if trials == 0 {
			continue
		}
		line(provider, "all", trials, total)
		var ph []string
		for p, n := range phases {
			ph = append(ph, fmt.Sprintf("%s %d", p, n))
		}
		slices.Sort(ph)
		fmt.Fprintf(&b, "         kills by phase: %s\n", strings.Join(ph, ", "))
		var why []string
		for w, n := range total.why {
			why = append(why, fmt.Sprintf("%3d  %s", n, w))
		}
		slices.Sort(why)
		slices.Reverse(why)
		if len(why) > 0 {
			fmt.Fprintf(&b, "         runner_system_failure, why:\n")
			for _, w := range why {
				fmt.Fprintf(&b, "         %s\n", w)
			}
		}
	}
	fmt.Fprintf(&b, "true: jobs ended with the result their script decided; run@kill: running in GitLab at the manager's kill;\n"+
		"true%%: of those the killed manager had journaled (all but pickup and gl503), ended true (the check: at least -chaos.min-true); true%%+p: of all, pickup included;\n"+
		"rsf: failed cleanly with runner_system_failure and a reason; gl503: failed as GitLab's outage refused their artifacts past the helper's retry budget\n"+
		"(5 min; gitlab-runner's helper: 6 tries, 1-5 s apart; left out of true%%); faults: faults injected (plugin kills, provider faults, SSH connections cut, 503s);\n"+
		"resumed: jobs the restarted manager resumed from their journal; pickup: handed out by GitLab as the manager was killed, before their journal was written,\n"+
		"failed by GitLab's stuck-job clean-up (stuck_or_timeout_failure after %v without a runner call; coordinator_5xx trials %v); stuck: never ended;\n"+
		"silence: the longest a job a manager ran went without a call that touches it in GitLab (what the stuck timeout must outlast).\n",
		*chaosStuck, chaosStuckTimeout(faultCoordinator))
	t.Log("\n" + b.String())
	fmt.Print(b.String())
}

func median(ds []time.Duration) string {
	if len(ds) == 0 {
		return "-"
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	m := s[len(s)/2]
	if len(s)%2 == 0 {
		m = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return m.Round(10 * time.Millisecond).String()
}

// killRightAfterReceipt: a manager killed right after the journal of a
// job it was handed reached the disk, before anything else of the job was
// done (no trace, no VM), is replaced by one that finds the journal and
// runs the job: it ends with the result its script decides, never stuck.
func killRightAfterReceipt(t *testing.T, fakeSetup *chaosSetup) {
	s := *fakeSetup
	s.jobs, s.boot = 1, 500*time.Millisecond
	start := time.Now()
	r := runChaosTrial(t, &s, *chaosSeed, 1000, phaseJournaled, faultNone)
	t.Logf("trial: %v, %d faults", time.Since(start).Round(100*time.Millisecond), r.injected)
	if r.jobs != 1 || r.runningAtKill != 1 || r.trueAtKill != 1 || r.resumedJobs != 1 ||
		r.stuck+r.pickupLost+r.wrong+r.leaked+r.reused+r.reran+r.badTrace+r.crashes > 0 || r.triggerMissed {
		t.Errorf("killed right after the journal: %d jobs, %d running at the kill, %d true, %d resumed, %d stuck, %d lost at pick-up, %d wrong, %d leaked, %d reused, %d reran, %d bad traces, %d crashes; want the one job running, resumed and true:\n%s",
			r.jobs, r.runningAtKill, r.trueAtKill, r.resumedJobs, r.stuck, r.pickupLost, r.wrong, r.leaked, r.reused, r.reran, r.badTrace, r.crashes, strings.Join(r.problems, "\n"))
	}
}
