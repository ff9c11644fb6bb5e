package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/plugins/qemu/qemuvm"
	"github.com/mayfly-ci/mayfly/provisioner/image"
	"github.com/mayfly-ci/mayfly/vmexec"
	"github.com/mayfly-ci/mayfly/vmexec/sshexec"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

// warmTarget is the one SSH server every instance of the fake provider
// points at.
type warmTarget struct {
	host, port, user, hostKey string
	clientKeyPEM              []byte
	buildsDir                 string
	// listed leaves the fake's launch setting off: the fleet learns that
	// an instance runs from the provider's list, as with clouds whose
	// address comes after creation, instead of from Create.
	listed bool
}

// warmJobs is the number of trivial jobs of one run.
const warmJobs = 20

// warmRuns is how many runs the figures are the medians of.
const warmRuns = 3

// BenchmarkWarmStart is the measurement of issue 14: the built-in
// coordinator with 20 trivial jobs (three echo lines and an after_script)
// and `mayfly run` with concurrent = 1, check_interval = 1 and idle_count =
// 2 on the fake provider plugin, whose instances all point at one local SSH
// server: OpenSSH on this host, or dropbear in one qemu microVM. It prints
// each run's wall time (first pick-up to last final update), pick-up →
// script start and pick-up → final update (p50, p90), the median of the
// three runs, and the median time of each phase of a job.
// The fake launches (gives each instance's connect info with Create, as
// the qemu provider's address is known at creation); the -listed runs are
// the same without, where the idle pool's refill waits for a list.
func BenchmarkWarmStart(b *testing.B) {
	openssh := func(b *testing.B, listed bool) {
		s := sshtest.Run(b, sshtest.OpenSSH)
		host, port, _ := net.SplitHostPort(s.Addr)
		benchWarm(b, warmTarget{host: host, port: port, user: s.User, hostKey: s.HostKey, clientKeyPEM: s.ClientKeyPEM, buildsDir: filepath.Join(b.TempDir(), "builds"), listed: listed})
	}
	b.Run("openssh", func(b *testing.B) { openssh(b, false) })
	b.Run("openssh-listed", func(b *testing.B) { openssh(b, true) })
	b.Run("qemu-dropbear", func(b *testing.B) {
		benchWarm(b, startBenchVM(b))
	})
	b.Run("qemu-dropbear-listed", func(b *testing.B) {
		tgt := startBenchVM(b)
		tgt.listed = true
		benchWarm(b, tgt)
	})
}

// warmRun is the figures of one run.
type warmRun struct {
	wall                    time.Duration
	pickupStart, pickupDone []time.Duration
	phases                  map[string][]time.Duration // per job
}

func benchWarm(b *testing.B, tgt warmTarget) {
	dir := b.TempDir()
	pluginDir := filepath.Join(dir, "plugins")
	buildPlugin(b, pluginDir, "github.com/mayfly-ci/mayfly/providers/fake/cmd/mayfly-plugin-fake")
	var runs []warmRun
	for i := range warmRuns * b.N {
		r := warmStartRun(b, filepath.Join(dir, fmt.Sprint("run", i)), pluginDir, tgt)
		b.Logf("run %d: %d jobs in %v; pick-up → script start p50 %v p90 %v; pick-up → final update p50 %v p90 %v",
			i+1, warmJobs, r.wall.Round(time.Millisecond), ms(quantile(r.pickupStart, 0.5)), ms(quantile(r.pickupStart, 0.9)),
			ms(quantile(r.pickupDone, 0.5)), ms(quantile(r.pickupDone, 0.9)))
		runs = append(runs, r)
	}
	med := func(f func(warmRun) time.Duration) time.Duration {
		var v []time.Duration
		for _, r := range runs {
			v = append(v, f(r))
		}
		return quantile(v, 0.5)
	}
	wall := med(func(r warmRun) time.Duration { return r.wall })
	s50 := med(func(r warmRun) time.Duration { return quantile(r.pickupStart, 0.5) })
	s90 := med(func(r warmRun) time.Duration { return quantile(r.pickupStart, 0.9) })
	d50 := med(func(r warmRun) time.Duration { return quantile(r.pickupDone, 0.5) })
	d90 := med(func(r warmRun) time.Duration { return quantile(r.pickupDone, 0.9) })
	b.Logf("median of %d runs: %d jobs in %v; pick-up → script start p50 %v p90 %v; pick-up → final update p50 %v p90 %v",
		len(runs), warmJobs, wall.Round(time.Millisecond), ms(s50), ms(s90), ms(d50), ms(d90))
	all := map[string][]time.Duration{}
	for _, r := range runs {
		for ph, v := range r.phases {
			all[ph] = append(all[ph], v...)
		}
	}
	names := make([]string, 0, len(all))
	for ph := range all {
		names = append(names, ph)
	}
	sort.Slice(names, func(i, j int) bool { return quantile(all[names[i]], 0.5) > quantile(all[names[j]], 0.5) })
	var parts []string
	for _, ph := range names {
		parts = append(parts, fmt.Sprintf("%s %v", ph, ms(quantile(all[ph], 0.5))))
	}
	b.Logf("median per job and phase: %s", strings.Join(parts, ", "))
	b.ReportMetric(wall.Seconds(), "wall-s")
	b.ReportMetric(float64(s50.Microseconds())/1000, "start-p50-ms")
	b.ReportMetric(float64(s90.Microseconds())/1000, "start-p90-ms")
	b.ReportMetric(float64(d50.Microseconds())/1000, "done-p50-ms")
	b.ReportMetric(float64(d90.Microseconds())/1000, "done-p90-ms")
}

func ms(d time.Duration) time.Duration { return d.Round(100 * time.Microsecond) }

// quantile returns the q-quantile of v (nearest rank); 0 for none.
func quantile(v []time.Duration, q float64) time.Duration {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	i := int(q*float64(len(s))+0.5) - 1
	return s[min(max(i, 0), len(s)-1)]
}

var (
	pickupStartRE = regexp.MustCompile(`msg="job script starting".* job=(\d+) pickup_to_start_seconds=([0-9.e-]+)`)
	phasesRE      = regexp.MustCompile(`msg="job phases".* job=(\d+) (.*)`)
	phaseRE       = regexp.MustCompile(`phases\.(\w+)=(\S+)`)
)

// warmStartRun runs the 20 jobs once with a fresh coordinator and manager.
func warmStartRun(b *testing.B, dir, pluginDir string, tgt warmTarget) warmRun {
	var pipeline strings.Builder
	pipeline.WriteString("projects:\n  - name: warm\n    pipelines:\n      - variables: [{key: GIT_STRATEGY, value: none}]\n        jobs:\n")
	for i := range warmJobs {
		fmt.Fprintf(&pipeline, "          - {name: job%02d, script: [\"echo one\", \"echo two\", \"echo three\"], after_script: [\"echo after\"]}\n", i)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	srv, url := startCoordinator(b, "warm-token", pipeline.String())
	cfg := fmt.Sprintf(`concurrent = 1
check_interval = 1
log_level = "debug"

[[runners]]
  name = "warm"
  url = %q
  token = "warm-token"
  executor = "instance"
  shell = "sh"
  builds_dir = %q
  [runners.autoscaler]
    plugin = "fake"
    max_instances = 10
    delete_instances_on_shutdown = true
    [runners.autoscaler.plugin_config]
      launch = %t
      [runners.autoscaler.plugin_config.connect]
        address = %q
        port = %s
        username = %q
        host_key = %q
        private_key = '''
%s'''
    [runners.autoscaler.connector_config]
      timeout = "60s"
    [[runners.autoscaler.policy]]
      idle_count = 2
`, url, tgt.buildsDir, !tgt.listed, tgt.host, tgt.port, tgt.user, tgt.hostKey, tgt.clientKeyPEM)
	logs := runUntilDone(b, srv, dir, pluginDir, cfg, 5*time.Minute)
	if d := os.Getenv("MAYFLY_BENCH_LOG_DIR"); d != "" { // keep the manager's log to study a run
		if err := os.WriteFile(filepath.Join(d, filepath.Base(dir)+".log"), []byte(logs), 0o644); err != nil {
			b.Fatal(err)
		}
	}

	r := warmRun{phases: map[string][]time.Duration{}}
	var first, last time.Time
	for _, j := range srv.Jobs() {
		if j.Status != "success" {
			b.Fatalf("job %s: %s %s\n%s", j.Name, j.Status, j.FailureReason, j.Trace)
		}
		if first.IsZero() || j.StartedAt.Before(first) {
			first = j.StartedAt
		}
		if j.FinishedAt.After(last) {
			last = j.FinishedAt
		}
		r.pickupDone = append(r.pickupDone, j.FinishedAt.Sub(j.StartedAt))
	}
	r.wall = last.Sub(first)
	for _, m := range pickupStartRE.FindAllStringSubmatch(logs, -1) {
		sec, err := strconv.ParseFloat(m[2], 64)
		if err != nil {
			b.Fatalf("pickup_to_start_seconds %q: %v", m[2], err)
		}
		r.pickupStart = append(r.pickupStart, time.Duration(sec*float64(time.Second)))
	}
	for _, m := range phasesRE.FindAllStringSubmatch(logs, -1) {
		for _, p := range phaseRE.FindAllStringSubmatch(m[2], -1) {
			d, err := time.ParseDuration(p[2])
			if err != nil {
				b.Fatalf("phase %s %q: %v", p[1], p[2], err)
			}
			r.phases[p[1]] = append(r.phases[p[1]], d)
		}
	}
	if len(r.pickupStart) != warmJobs {
		b.Fatalf("found %d script starts in the log, want %d", len(r.pickupStart), warmJobs)
	}
	return r
}

// startBenchVM boots one microVM of the base image (dropbear, busybox) for
// the whole benchmark.
func startBenchVM(b *testing.B) warmTarget {
	repo, err := filepath.Abs("../..")
	if err != nil {
		b.Fatal(err)
	}
	cacheDir := filepath.Join(repo, ".cache", "mayfly")
	requireQEMU(b, cacheDir)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	img, err := image.Build(ctx, image.Options{CacheDir: cacheDir})
	if err != nil {
		b.Fatal(err)
	}
	_, clientKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	_, hostKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	signer, err := ssh.NewSignerFromKey(clientKey)
	if err != nil {
		b.Fatal(err)
	}
	block, err := ssh.MarshalPrivateKey(clientKey, "")
	if err != nil {
		b.Fatal(err)
	}
	vm, err := qemuvm.Start(ctx, qemuvm.Options{
		Name: "warm-bench", StateDir: filepath.Join(b.TempDir(), "vm"), Kernel: img.Kernel, Initrd: img.Initrd,
		AuthorizedKeys: []ssh.PublicKey{signer.PublicKey()}, HostKey: hostKey, MemoryMB: 256, BootTimeout: 3 * time.Minute,
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = vm.Stop(sctx)
	})
	host, port, _ := net.SplitHostPort(vm.SSHAddr)
	b.Logf("microVM up (accel %s) after %v", vm.Accel, vm.ReadyAfter.Round(time.Millisecond))
	return warmTarget{host: host, port: port, user: "root", hostKey: vm.HostKeyLine, clientKeyPEM: pem.EncodeToMemory(block), buildsDir: "/builds"}
}

// BenchmarkWarmFloor measures the floor under a trivial job's stages on
// the targets of BenchmarkWarmStart, on one warm connection: a session
// that runs `true` in sh (opening it and starting the shell), and inside
// one session a subshell (fork) and a `cat </dev/null` (fork and exec), as
// medians of 15.
func BenchmarkWarmFloor(b *testing.B) {
	b.Run("openssh", func(b *testing.B) {
		s := sshtest.Run(b, sshtest.OpenSSH)
		host, port, _ := net.SplitHostPort(s.Addr)
		benchFloor(b, warmTarget{host: host, port: port, user: s.User, hostKey: s.HostKey, clientKeyPEM: s.ClientKeyPEM})
	})
	b.Run("qemu-dropbear", func(b *testing.B) {
		benchFloor(b, startBenchVM(b))
	})
}

func benchFloor(b *testing.B, tgt warmTarget) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c, err := sshexec.Dial(ctx, sshexec.Target{Addr: net.JoinHostPort(tgt.host, tgt.port), User: tgt.user, PrivateKey: tgt.clientKeyPEM, HostKey: tgt.hostKey})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	// timed runs script n times in one session and returns the time per
	// run, from the shell's own clock (/proc/uptime, 10 ms ticks: hence
	// the 20 runs).
	timed := func(script string) time.Duration {
		var out strings.Builder
		const n = 20
		loop := fmt.Sprintf(`read -r a _ </proc/uptime; i=0; while [ $i -lt %d ]; do %s; i=$((i+1)); done; read -r z _ </proc/uptime; echo "$a $z"`, n, script)
		if code, err := c.Stream(ctx, vmexec.Command{Script: loop, Shell: "sh", Stdout: &out}); err != nil || code != 0 {
			b.Fatalf("%s: %d %v", script, code, err)
		}
		var a, z float64
		if _, err := fmt.Sscan(out.String(), &a, &z); err != nil {
			b.Fatalf("%q: %v", out.String(), err)
		}
		return time.Duration((z - a) / n * float64(time.Second))
	}
	var session, fork, exec []time.Duration
	for range 15 * b.N {
		t0 := time.Now()
		if code, err := c.Stream(ctx, vmexec.Command{Script: "true", Shell: "sh"}); err != nil || code != 0 {
			b.Fatalf("true: %d %v", code, err)
		}
		session = append(session, time.Since(t0))
		fork = append(fork, timed("( : )"))
		exec = append(exec, timed("cat </dev/null"))
	}
	b.Logf("session open + sh start + true: p50 %v; in one session: subshell %v, cat </dev/null %v",
		ms(quantile(session, 0.5)), ms(quantile(fork, 0.5)), ms(quantile(exec, 0.5)))
	b.ReportMetric(float64(quantile(session, 0.5).Microseconds())/1000, "session-ms")
	b.ReportMetric(float64(quantile(fork, 0.5).Microseconds())/1000, "subshell-ms")
	b.ReportMetric(float64(quantile(exec, 0.5).Microseconds())/1000, "cat-ms")
}
