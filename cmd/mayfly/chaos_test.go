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
// moment of each phase of its jobs' life (waiting for the VM to boot,
// get_sources, the script, after_script, the artifact upload, the final
// update), started again on the same state directory, and every job and
// instance accounted for. "pickup" counts jobs GitLab handed out as the
// manager was killed, before it read them: the runner API leaves nothing
// to finish those with (GitLab fails them as stuck), so they are shown
// apart from "stuck", which must stay 0. `make test` runs a few seeded trials; `make
// chaos` runs the long suite:
//
//	go test -run '^TestChaos$' -v ./cmd/mayfly/ -args -chaos.fake=100 -chaos.qemu=10 -chaos.parallel=4 -chaos.qemu-parallel=2
var (
	chaosFakeTrials = flag.Int("chaos.fake", 6, "chaos trials on the fake provider (local SSH server as every VM)")
	chaosQEMUTrials = flag.Int("chaos.qemu", 1, "chaos trials on the qemu provider (real microVMs)")
	chaosSeed       = flag.Uint64("chaos.seed", 16, "seed of the chaos trials (phases, kill moments, scripts)")
	chaosParallel   = flag.Int("chaos.parallel", 6, "fake-provider chaos trials run at once")
	chaosQEMUPar    = flag.Int("chaos.qemu-parallel", 1, "qemu chaos trials run at once (each boots its own VMs)")
	chaosMinTrue    = flag.Float64("chaos.min-true", 95, "per cent of the jobs running at a kill that must end with their true result")
)

var (
	fakePhases = []string{phaseBoot, phaseGetSources, phaseScript, phaseAfterScript, phaseUpload, phaseFinalUpdate}
	// qemu VMs here have no git and no route to the coordinator, so their
	// jobs fetch and upload nothing. The script first: a short run kills
	// a real VM's job mid-script.
	qemuPhases = []string{phaseScript, phaseAfterScript, phaseFinalUpdate, phaseBoot}
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
	add := func(r chaosRow) { mu.Lock(); rows = append(rows, r); mu.Unlock() }
	// The providers' trials run side by side: t.Run may be called from
	// several goroutines, and each subtest may end in t.Fatal.
	wg.Add(2)
	go func() {
		defer wg.Done()
		if n := *chaosFakeTrials; n > 0 {
			t.Run("fake", func(t *testing.T) {
				s := &chaosSetup{provider: "fake", binDir: chaosBinaries(t), ssh: sshtest.Run(t, sshtest.OpenSSH),
					jobs: 3, boot: 1500 * time.Millisecond, within: 2 * time.Minute}
				add(runChaosTrials(t, s, n, *chaosParallel, fakePhases))
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
				add(runChaosTrials(t, s, n, *chaosQEMUPar, qemuPhases))
			})
		}
	}()
}

// chaosRow sums the trials of one provider.
type chaosRow struct {
	provider string
	trials   int
	sum      trialResult
	phases   map[string]int
}

// runChaosTrials runs n trials, cycling through phases, and fails the
// test on anything stuck, leaked, reused, run twice, wrong, or crashed,
// and when too few jobs killed mid-run end with their true result.
func runChaosTrials(t *testing.T, s *chaosSetup, n, parallel int, phases []string) chaosRow {
	row := chaosRow{provider: s.provider, phases: map[string]int{}}
	var (
		mu  sync.Mutex
		wg  sync.WaitGroup
		sem = make(chan struct{}, max(1, parallel))
	)
	for i := range n {
		phase := phases[i%len(phases)]
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			t.Run(fmt.Sprintf("%03d-%s", i, phase), func(t *testing.T) {
				start := time.Now()
				r := runChaosTrial(t, s, *chaosSeed, i, phase)
				mu.Lock()
				row.trials++
				row.phases[phase]++
				row.sum.add(r)
				mu.Unlock()
				t.Logf("%s: %d jobs, %d running at the kill, %d true, %d clean failures, %d wrong, %d stuck, %d lost at pick-up, %d leaked, %d reused (%v)",
					phase, r.jobs, r.runningAtKill, r.trueAtKill, r.cleanAtKill, r.wrong, r.stuck, r.pickupLost, r.leaked, r.reused, time.Since(start).Round(100*time.Millisecond))
				if r.wrong+r.stuck+r.leaked+r.reused+r.reran+r.badTrace+r.crashes > 0 {
					t.Errorf("trial %d (%s):\n%s", i, phase, strings.Join(r.problems, "\n"))
				} else if r.cleanAtKill > 0 || r.triggerMissed || r.pickupLost > 0 {
					t.Logf("trial %d (%s):\n%s", i, phase, strings.Join(r.problems, "\n"))
				}
			})
		}()
	}
	wg.Wait()
	if row.sum.runningAtKill > 0 {
		if pct := row.sum.truePct(); pct < *chaosMinTrue {
			t.Errorf("%s: %.1f%% of the %d jobs running at a kill ended with their true result, want at least %.0f%%",
				s.provider, pct, row.sum.runningAtKill, *chaosMinTrue)
		}
	}
	return row
}

func (r *trialResult) add(o trialResult) {
	r.jobs += o.jobs
	r.runningAtKill += o.runningAtKill
	r.trueAtKill += o.trueAtKill
	r.cleanAtKill += o.cleanAtKill
	r.wrong += o.wrong
	r.stuck += o.stuck
	r.pickupLost += o.pickupLost
	r.leaked += o.leaked
	r.reused += o.reused
	r.reran += o.reran
	r.badTrace += o.badTrace
	r.crashes += o.crashes
	r.resume = append(r.resume, o.resume...)
}

func (r *trialResult) truePct() float64 {
	if r.runningAtKill == 0 {
		return 100
	}
	return 100 * float64(r.trueAtKill) / float64(r.runningAtKill)
}

// printChaosTable prints one line per provider.
func printChaosTable(t *testing.T, rows []chaosRow) {
	if len(rows) == 0 {
		return
	}
	slices.SortFunc(rows, func(a, b chaosRow) int { return strings.Compare(a.provider, b.provider) })
	var b strings.Builder
	fmt.Fprintf(&b, "chaos suite, seed %d\n", *chaosSeed)
	fmt.Fprintf(&b, "%-8s %6s %5s %8s %7s %6s %6s %5s %6s %6s %6s %6s %8s %7s %10s\n",
		"provider", "trials", "jobs", "run@kill", "true%", "clean", "wrong", "stuck", "pickup", "leaked", "reused", "reran", "badtrace", "crashes", "resume-p50")
	for _, r := range rows {
		s := r.sum
		fmt.Fprintf(&b, "%-8s %6d %5d %8d %6.1f%% %6d %6d %5d %6d %6d %6d %6d %8d %7d %10s\n",
			r.provider, r.trials, s.jobs, s.runningAtKill, s.truePct(), s.cleanAtKill, s.wrong, s.stuck, s.pickupLost, s.leaked, s.reused, s.reran, s.badTrace, s.crashes, median(s.resume))
		var ph []string
		for p, n := range r.phases {
			ph = append(ph, fmt.Sprintf("%s %d", p, n))
		}
		slices.Sort(ph)
		fmt.Fprintf(&b, "         kills by phase: %s\n", strings.Join(ph, ", "))
	}
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
