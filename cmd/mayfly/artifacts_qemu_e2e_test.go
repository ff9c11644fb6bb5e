package main

import (
	"archive/zip"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fsouza/fake-gcs-server/fakestorage"

	"github.com/mayfly-ci/mayfly/internal/testenv"
	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/manager/gitlab"
	"github.com/mayfly-ci/mayfly/provisioner/image"
)

// guestHost is how a qemu VM with isolated egress names an allowed host
// endpoint 127.0.0.1:PORT: 10.0.2.2:PORT, through the plugin's guestfwd.
const guestHost = image.GuestEgressAddr

// cloudCacheJob is a job of the "cloud" project for the runner tagged
// store: it restores the cache the test put in that store's bucket,
// rewrites it (saved at the end), and searches the VM for the store's
// credential. SECRET_B64 is base64 of the strings to look for (one a
// line), so the search can name them without the VM holding them: the
// pattern exists only in grep's pattern pipe. The canary, a variable of the
// job and so in its environment, shows the same search finds what is there.
const cloudCacheJob = `
          - name: %[1]s
            tags: [%[1]s]
            variables: [{key: SECRET_B64, value: %[2]q}]
            script:
              - cat vendor/dep.txt
              - echo cached-by-$CI_JOB_ID > vendor/dep.txt
              - 'hits() { grep -rlsF -D skip -f <(printf %%s "$1" | base64 -d) /proc/[0-9]*/environ /builds "$HOME" /tmp /var/tmp /run /etc; }'
              - 'echo "canary found: $(hits "$CANARY_B64" | grep -c /environ)"'
              - 'echo "secret found: [$(hits "$SECRET_B64" | tr "\n" " ")]"'
            cache: [{key: deps, paths: [vendor/]}]
`

// qemuArtifactsSetup returns the VM image cache (with the debian image:
// skipped without it, failed under CI=true), a temporary directory, and in
// it the qemu plugin and the mayfly-helper binaries, built.
func qemuArtifactsSetup(tb testing.TB) (cacheDir, dir, pluginDir, helperDir string) {
	tb.Helper()
	repo, err := filepath.Abs("../..")
	if err != nil {
		tb.Fatal(err)
	}
	cacheDir = filepath.Join(repo, ".cache", "mayfly")
	requireDebian(tb, cacheDir)
	dir = tb.TempDir()
	pluginDir, helperDir = filepath.Join(dir, "plugins"), filepath.Join(dir, "helpers")
	buildPlugin(tb, pluginDir, "github.com/mayfly-ci/mayfly/plugins/qemu/cmd/mayfly-plugin-qemu")
	buildHelper(tb, helperDir)
	return cacheDir, dir, pluginDir, helperDir
}

// TestQEMUArtifactsAndCache is issue 18's end-to-end run on real microVMs
// (the debian profile, isolated egress) through mayfly run with the qemu
// plugin and the coordinator as GitLab at its external URL
// http://10.0.2.2:PORT. One manager serves three runners, each its own
// fleet: "local" runs artifactsPipeline (artifacts, junit and dotenv
// reports, needs, on_failure artifacts) with the manager's local cache
// store, and cachePipeline, applied once job a finished, restores a's
// cache on another VM; "gcs" and "s3" each run one job whose cache goes
// through fake-gcs-server or gofakes3 with URLs the manager pre-signed for
// the address the VMs use (10.0.2.2:PORT: the host is part of the
// signature), the fakes checking every signature. Each VM reaches only the
// host endpoints its runner allows. The cloud jobs search their VM's
// processes' environments and files for the store's credential.
func TestQEMUArtifactsAndCache(t *testing.T) {
	// The package's parallel tests are issue 18's three end-to-end runs,
	// after the others: the two on the fake fleet mostly wait on the
	// manager's and coordinator's timers while this one's VMs use the CPU.
	t.Parallel()
	cacheDir, dir, pluginDir, helperDir := qemuArtifactsSetup(t)

	// The coordinator, as VMs see it.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	coord := ln.Addr().String()
	const localToken, gcsToken, s3Token = "qemu-artifacts-local", "qemu-artifacts-gcs", "qemu-artifacts-s3"
	srv := serveArtifactsCoordinator(t, ln, "http://"+guestView(coord),
		coordinator.RunnerOptions{RunUntagged: true, Token: localToken},
		coordinator.RunnerOptions{Tags: []string{"gcs"}, Token: gcsToken},
		coordinator.RunnerOptions{Tags: []string{"s3"}, Token: s3Token})

	// The GCS fake: V4 URLs signed with a service account key.
	g := startFakeGCS(t, guestView)
	gcs, gcsV, gcsAddr, pemKey := g.srv, g.v, g.addr, g.pemKey

	// The S3 fake: SigV4 presigned with an access key.
	const keyID, s3Secret, region = "AKIAMAYFLYQEMU000001", "qemu-s3-secret/mayfly+cache+9876543210", "eu-west-1"
	s3f := startFakeS3(t, keyID, s3Secret, region)
	s3b, s3V, s3Addr := s3f.backend, s3f.v, s3f.addr

	// Pipeline 1: artifactsPipeline for the local runner, and the cloud
	// jobs, which look for the PEM key's lines and the S3 secret key.
	pemLines := strings.Split(strings.TrimSpace(pemKey), "\n")
	gcsSecret := strings.Join(pemLines[1:len(pemLines)-1], "\n")
	canary := "mayfly-canary-" + rand.Text()
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	apply(t, srv, artifactsPipeline+fmt.Sprintf(`  - name: cloud
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: empty}, {key: CANARY, value: %q}, {key: CANARY_B64, value: %q}]
        jobs:`, canary, b64(canary))+fmt.Sprintf(cloudCacheJob, "gcs", b64(gcsSecret))+fmt.Sprintf(cloudCacheJob, "s3", b64(s3Secret)))

	// Each bucket starts with a cache the test made, at the object name
	// gitlab-runner uses.
	project := jobByName(t, srv, "gcs").ProjectID
	seed := seedCacheZip(t)
	gcsObject := fmt.Sprintf("ci/runner/%s/project/%d/deps-non_protected", gitlab.ShortToken(gcsToken), project)
	s3Object := fmt.Sprintf("runner/%s/project/%d/deps-non_protected", gitlab.ShortToken(s3Token), project)
	gcs.CreateObject(fakestorage.Object{ObjectAttrs: fakestorage.ObjectAttrs{BucketName: "ci-cache", Name: gcsObject}, Content: seed})
	if _, err := s3b.PutObject("ci-cache", s3Object, map[string]string{}, bytes.NewReader(seed), int64(len(seed)), nil); err != nil {
		t.Fatal(err)
	}

	storeDir, storeAddr := filepath.Join(dir, "cache-store"), freePort(t)
	stateDir := filepath.Join(dir, "qemu")
	debian := func(name, token string, maxInstances, idle int, allow, cache string) qemuRunner {
		return qemuRunner{name: name, url: "http://" + coord, token: token, shell: "bash", image: "debian", group: name,
			maxInstances: maxInstances, idle: idle, maxJobTimeout: 600, bootTimeout: "300s",
			egressAllow: []string{coord, allow}, extra: "  [runners.cache]\n" + cache}
	}
	cfg := qemuConfig(4, "debug", stateDir, cacheDir,
		// a and c at once, then b and d: one VM kept booted ahead.
		debian("local", localToken, 3, 1, storeAddr, fmt.Sprintf(`    Type = "local"
    [runners.cache.local]
      Dir = %q
      ListenAddress = %q
      URL = "http://%s"
`, storeDir, storeAddr, guestView(storeAddr))),
		// The signing address is the one the VMs use; the manager never
		// connects to it (it only signs).
		debian("gcs", gcsToken, 1, 0, gcsAddr, g.cacheTOML()),
		debian("s3", s3Token, 1, 0, s3Addr, s3f.cacheTOML(guestView(s3Addr))))

	// Pipeline 2 (cachePipeline) once a saved its cache: d runs on another VM.
	start := time.Now()
	logs := managerRun{dir: dir, pluginDir: pluginDir, helperDir: helperDir, cfg: cfg, within: 15 * time.Minute,
		during: func(ctx context.Context) error {
			if _, err := srv.WaitJob(ctx, jobByName(t, srv, "a").ID); err != nil {
				return fmt.Errorf("job a: %w", err)
			}
			apply(t, srv, cachePipeline)
			return nil
		}}.untilDone(t, srv)
	t.Logf("6 jobs on 3 qemu fleets: %s", time.Since(start).Round(time.Second))
	defer func() {
		if t.Failed() {
			t.Logf("mayfly run logs:\n%s", logs)
		}
	}()
	for line := range strings.Lines(logs) {
		if strings.Contains(line, `"job phases"`) {
			t.Logf("%s", strings.TrimSpace(line))
		}
	}

	// Artifacts, reports, dotenv, needs, on_failure and the local cache.
	a := checkArtifactsPipeline(t, srv)
	if env := zipFile(t, artifactPath(a, "archive"), "out/env.txt"); !strings.Contains(env, "CI_SERVER_URL=http://"+guestView(coord)+"\n") {
		t.Errorf("job a's environment lacks the coordinator's external URL:\n%s", env)
	}
	object := filepath.Join(storeDir, "objects", "runner", gitlab.ShortToken(localToken), "project", fmt.Sprint(a.ProjectID), "deps-non_protected")
	if _, err := os.Stat(object); err != nil {
		t.Errorf("local cache object: %v", err)
	}
	checkCacheRestored(t, jobByName(t, srv, "d"), a)

	// One VM per job: what b and d found came through the coordinator and
	// the store, not a disk they shared with a.
	vms := map[string]string{}
	for _, j := range srv.Jobs() {
		m := runningOn.FindStringSubmatch(string(j.Trace))
		if m == nil {
			t.Errorf("job %s: no 'Running on' line in the trace", j.Name)
		} else if prev, dup := vms[m[1]]; dup {
			t.Errorf("jobs %s and %s ran on the same VM %s", prev, j.Name, m[1])
		} else {
			vms[m[1]] = j.Name
		}
	}

	checkCloudCacheJob(t, jobByName(t, srv, "gcs"), gcsV, guestView(gcsAddr), func() ([]byte, error) {
		o, err := gcs.GetObject("ci-cache", gcsObject)
		return o.Content, err
	})
	checkCloudCacheJob(t, jobByName(t, srv, "s3"), s3V, guestView(s3Addr), func() ([]byte, error) {
		o, err := s3b.GetObject("ci-cache", s3Object, nil)
		if err != nil {
			return nil, err
		}
		defer o.Contents.Close()
		return io.ReadAll(o.Contents)
	})

	// No credential in a trace or a stored artifact (a's env.txt is a
	// VM's whole environment).
	signing, err := os.ReadFile(filepath.Join(storeDir, "signing-key"))
	if err != nil {
		t.Fatal(err)
	}
	secrets := slices.Concat(pemLines[1:len(pemLines)-1], []string{s3Secret, string(signing), fmt.Sprintf("%x", signing)})
	for _, j := range srv.Jobs() {
		for _, art := range j.Artifacts {
			if b, err := os.ReadFile(art.Path); err == nil && containsAny(b, secrets) {
				t.Errorf("job %s: a credential is in its %s artifact", j.Name, art.Type)
			}
		}
		if containsAny(j.Trace, secrets) {
			t.Errorf("job %s: a credential is in the trace", j.Name)
		}
	}
	if env := zipFile(t, artifactPath(a, "archive"), "out/env.txt"); containsAny([]byte(env), secrets) {
		t.Error("a credential is in job a's environment")
	}
	if left := qemuProcesses(stateDir); len(left) > 0 {
		t.Errorf("qemu processes left after shutdown: %v", left)
	}
}

var canaryFound = regexp.MustCompile(`\ncanary found: ([1-9][0-9]*)\n`)

// requireDebian is requireQEMU and the debian image, built when missing
// (as make setup builds it; as root, minutes).
func requireDebian(t testing.TB, cacheDir string) {
	t.Helper()
	requireQEMU(t, cacheDir)
	if os.Geteuid() != 0 {
		testenv.Missing(t, "the debian image is built as root (mmdebstrap)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	if _, err := image.Build(ctx, image.Options{CacheDir: cacheDir, Profile: image.ProfileDebian, Logger: slog.New(slog.DiscardHandler)}); err != nil {
		t.Fatalf("build the debian image: %v", err)
	}
}

// checkCloudCacheJob checks a cloud job of TestQEMUArtifactsAndCache: it
// restored the seeded cache and saved its own through URLs naming host
// (the address the VM uses), every request's signature held, the bucket
// holds its archive, and its search of the VM found the canary and no
// credential.
func checkCloudCacheJob(t *testing.T, j coordinator.JobRecord, v *verifier, host string, stored func() ([]byte, error)) {
	t.Helper()
	tr := string(j.Trace)
	if j.Status != "success" {
		t.Errorf("job %s: %s %s:\n%s", j.Name, j.Status, j.FailureReason, tr)
	}
	for _, want := range []string{"Checking cache for deps-non_protected...", "Successfully extracted cache", "\nseeded-by-test\n",
		"Creating cache deps-non_protected...", "Uploading cache.zip to http://" + host + "/", "Created cache", "\nsecret found: []\n"} {
		if !strings.Contains(tr, want) {
			t.Errorf("job %s: the trace lacks %q:\n%s", j.Name, want, tr)
		}
	}
	if !canaryFound.MatchString(tr) {
		t.Errorf("job %s: the search did not find the canary in the job's environment, so it proves nothing:\n%s", j.Name, tr)
	}
	if v.ok.Load() < 2 || v.refused.Load() != 0 {
		t.Errorf("job %s: signed requests: %d verified, %d refused", j.Name, v.ok.Load(), v.refused.Load())
	}
	b, err := stored()
	if err != nil {
		t.Fatalf("job %s: the bucket's object: %v", j.Name, err)
	}
	path := filepath.Join(t.TempDir(), "cache.zip")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if got := zipFile(t, path, "vendor/dep.txt"); got != fmt.Sprintf("cached-by-%d\n", j.ID) {
		t.Errorf("job %s: the saved cache holds vendor/dep.txt %q", j.Name, got)
	}
}

// seedCacheZip is a cache archive as the helper makes one: vendor/dep.txt.
func seedCacheZip(t *testing.T) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	if _, err := zw.Create("vendor/"); err != nil {
		t.Fatal(err)
	}
	w, err := zw.Create("vendor/dep.txt")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(w, "seeded-by-test\n"); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// guestView is the address a qemu VM uses for the allowed host endpoint
// 127.0.0.1:PORT.
func guestView(hostAddr string) string {
	_, port, _ := net.SplitHostPort(hostAddr)
	return net.JoinHostPort(guestHost, port)
}

// artifactPath is where the coordinator stored a job's artifact of a type.
func artifactPath(j coordinator.JobRecord, typ string) string {
	for _, a := range j.Artifacts {
		if a.Type == typ {
			return a.Path
		}
	}
	return ""
}

func containsAny(b []byte, secrets []string) bool {
	for _, s := range secrets {
		if s != "" && bytes.Contains(b, []byte(s)) {
			return true
		}
	}
	return false
}

var phasesLine = regexp.MustCompile(`"msg":"job phases".*?"job":(\d+),"phases":\{([^}]*)\}`)

// jobPhases parses the manager's "job phases" debug lines (JSON logs):
// job id to phase to seconds.
func jobPhases(logs string) map[int64]map[string]float64 {
	out := map[int64]map[string]float64{}
	for _, m := range phasesLine.FindAllStringSubmatch(logs, -1) {
		var id int64
		fmt.Sscan(m[1], &id)
		out[id] = map[string]float64{}
		for _, kv := range strings.Split(m[2], ",") {
			k, v, _ := strings.Cut(kv, ":")
			var ns float64
			fmt.Sscan(v, &ns)
			out[id][strings.Trim(k, `"`)] = ns / 1e9
		}
	}
	return out
}

// BenchmarkQEMUCacheOverhead is the wall time a 10 MB cache restore + save
// adds to a job on a warm qemu VM (debian profile, TCG here; the manager's
// local store at 10.0.2.2): after a seed job filled the cache, jobs
// "plain" and "cached" (the same script, "cached" with the cache) take
// turns, one at a time, each on a VM booted ahead (idle_count 1). A job's
// time is the coordinator's start to finish less the manager's wait for
// its VM (phase acquire), so a VM still booting does not count; the
// figure is the median of the three pairs' differences, with the median
// phases that make it up.
//
//	go test -run '^$' -bench QEMUCacheOverhead -benchtime 1x ./cmd/mayfly/
func BenchmarkQEMUCacheOverhead(b *testing.B) {
	cacheDir, _, pluginDir, helperDir := qemuArtifactsSetup(b)
	const rounds = 3
	var p strings.Builder
	p.WriteString(`projects:
  - name: bench
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: empty}]
        jobs:
          - {name: seed, stage: s0, script: ["mkdir -p vendor", "head -c 10000000 /dev/urandom > vendor/blob"], cache: [{key: deps, paths: [vendor/]}]}
`)
	var stages []string
	for i := range rounds {
		fmt.Fprintf(&p, "          - {name: plain%d, stage: p%d, script: [\"ls -la\"]}\n", i, i)
		fmt.Fprintf(&p, "          - {name: cached%d, stage: c%d, script: [\"ls -la\"], cache: [{key: deps, paths: [vendor/]}]}\n", i, i)
		stages = append(stages, fmt.Sprintf("p%d", i), fmt.Sprintf("c%d", i))
	}
	fmt.Fprintf(&p, "        stages: [s0, %s]\n", strings.Join(stages, ", "))
	for range b.N {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		coord := ln.Addr().String()
		srv := serveArtifactsCoordinator(b, ln, "http://"+guestView(coord), coordinator.RunnerOptions{RunUntagged: true, Token: "qemu-bench-token"})
		apply(b, srv, p.String())
		storeAddr := freePortTB(b)
		sub := b.TempDir()
		cfg := qemuConfig(1, "debug", filepath.Join(sub, "qemu"), cacheDir, qemuRunner{name: "bench", url: "http://" + coord, token: "qemu-bench-token",
			shell: "bash", image: "debian", maxInstances: 2, idle: 1, bootTimeout: "300s", egressAllow: []string{coord, storeAddr},
			extra: fmt.Sprintf("  [runners.cache]\n    Type = \"local\"\n    [runners.cache.local]\n      Dir = %q\n      ListenAddress = %q\n      URL = \"http://%s\"\n",
				filepath.Join(sub, "store"), storeAddr, guestView(storeAddr))})
		logs := managerRun{dir: sub, pluginDir: pluginDir, helperDir: helperDir, cfg: cfg, within: 20 * time.Minute}.untilDone(b, srv)
		phases := jobPhases(logs)
		took := map[string]time.Duration{}
		ids := map[string]int64{}
		for _, j := range srv.Jobs() {
			if j.Status != "success" {
				b.Fatalf("job %s: %s\n%s", j.Name, j.Status, j.Trace)
			}
			if strings.HasPrefix(j.Name, "cached") && (!strings.Contains(string(j.Trace), "Successfully extracted cache") || !strings.Contains(string(j.Trace), "Created cache")) {
				b.Fatalf("job %s did not restore and save the cache:\n%s", j.Name, j.Trace)
			}
			ph, ok := phases[j.ID]
			if !ok {
				b.Fatalf("no phases logged for job %s", j.Name)
			}
			took[j.Name] = j.FinishedAt.Sub(j.StartedAt) - time.Duration(ph["acquire"]*float64(time.Second))
			ids[j.Name] = j.ID
		}
		var diffs []float64
		perPhase := map[string][]float64{}
		for i := range rounds {
			plain, cached := fmt.Sprintf("plain%d", i), fmt.Sprintf("cached%d", i)
			diffs = append(diffs, (took[cached] - took[plain]).Seconds())
			b.Logf("round %d: plain %.1fs, cached %.1fs", i, took[plain].Seconds(), took[cached].Seconds())
			for _, ph := range []string{"upload", "stage_restore_cache", "stage_archive_cache"} {
				perPhase[ph] = append(perPhase[ph], phases[ids[cached]][ph]-phases[ids[plain]][ph])
			}
		}
		median := func(v []float64) float64 { slices.Sort(v); return v[len(v)/2] }
		b.ReportMetric(median(slices.Clone(diffs)), "added-s-median")
		b.ReportMetric(slices.Min(diffs), "added-s-min")
		b.ReportMetric(slices.Max(diffs), "added-s-max")
		b.ReportMetric(median(perPhase["stage_restore_cache"]), "restore-s-median")
		b.ReportMetric(median(perPhase["stage_archive_cache"]), "save-s-median")
		b.ReportMetric(median(perPhase["upload"]), "upload-extra-s-median")
	}
}
