package main

import (
	"archive/zip"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager"
	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/manager/gitlab"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

// artifactsPipeline is issue 18's pipeline: a writes artifacts, a junit
// and a dotenv report and a cache; b (needs a) reads the artifact and the
// variable; c fails and uploads when:on_failure artifacts. GIT_STRATEGY
// empty empties the project directory first, so what b and the next
// pipeline's d find came through the helper, not from a job before them
// on the shared test machine.
const artifactsPipeline = `
projects:
  - name: app
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: empty}]
        jobs:
          - name: a
            stage: build
            script:
              - mkdir -p out vendor
              - echo built-by-$CI_JOB_ID > out/result.txt
              - echo '<testsuites><testsuite name="a" tests="1"/></testsuites>' > junit.xml
              - echo BUILD_VERSION=1.2.$CI_JOB_ID > build.env
              - echo cached-by-$CI_JOB_ID > vendor/dep.txt
              - env > out/env.txt
            artifacts:
              paths: [out/]
              reports: [{type: junit, paths: [junit.xml]}, {type: dotenv, paths: [build.env]}]
            cache: [{key: deps, paths: [vendor/]}]
          - name: b
            stage: test
            needs: [{job: a}]
            script: ["cat out/result.txt", "echo version=$BUILD_VERSION"]
          - name: c
            stage: test
            needs: []
            script: ["echo partial > partial.log", "exit 1"]
            artifacts: {paths: [partial.log], when: on_failure}
`

const cachePipeline = `
projects:
  - name: app
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: empty}]
        jobs:
          - {name: d, script: ["cat vendor/dep.txt"], cache: [{key: deps, paths: [vendor/], policy: pull}]}
`

// buildHelper builds mayfly-helper for this machine into dir, named as
// manager.Helpers looks it up for linux/amd64 VMs.
func buildHelper(t testing.TB, dir string) {
	t.Helper()
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", filepath.Join(dir, manager.HelperFileName("linux", "amd64")), "github.com/mayfly-ci/mayfly/cmd/mayfly-helper")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build mayfly-helper: %v\n%s", err, out)
	}
}

// startArtifactsCoordinator serves a coordinator with a state dir (for
// artifacts) and the pipeline applied.
func startArtifactsCoordinator(t *testing.T, token, pipeline string) (*coordinator.Server, string) {
	return startArtifactsCoordinatorTB(t, token, pipeline)
}

func startArtifactsCoordinatorTB(t testing.TB, token, pipeline string) (*coordinator.Server, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := serveArtifactsCoordinator(t, ln, "", coordinator.RunnerOptions{RunUntagged: true, Token: token})
	apply(t, srv, pipeline)
	return srv, "http://" + ln.Addr().String()
}

// serveArtifactsCoordinator serves a coordinator with a state dir (for
// artifacts) on ln until the test ends, with jobs told it is at
// externalURL ("": its listen URL), and registers the runners.
func serveArtifactsCoordinator(t testing.TB, ln net.Listener, externalURL string, runners ...coordinator.RunnerOptions) *coordinator.Server {
	t.Helper()
	srv, err := coordinator.New(coordinator.Config{Logger: slog.New(slog.DiscardHandler), TraceUpdateInterval: time.Second, StateDir: t.TempDir(), ExternalURL: externalURL})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); <-done })
	for _, r := range runners {
		r.RegistrationToken = srv.RegistrationToken()
		if _, err := srv.RegisterRunner(r); err != nil {
			t.Fatal(err)
		}
	}
	return srv
}

func apply(t testing.TB, srv *coordinator.Server, pipeline string) {
	t.Helper()
	f, err := coordinator.ParsePipelineFile("artifacts-e2e.yaml", []byte(pipeline))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Apply(f); err != nil {
		t.Fatal(err)
	}
}

func freePort(t *testing.T) string { return freePortTB(t) }

func freePortTB(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// fakeFleetConfig is a runner on the fake provider whose every instance
// is the sshd given, with extra TOML at the end of [[runners]]. One job at
// a time: the "VMs" share this host's file system, so two jobs of one
// project would share (and empty) one build directory, which no two real
// VMs do (seen: a's directory removed under it by c's get_sources).
func fakeFleetConfig(url, token, dir string, ssh *sshtest.Server, extra string) string {
	return fmt.Sprintf(`concurrent = 1
check_interval = 1
log_level = "warn"

[[runners]]
  name = "fake-fleet"
  url = %q
  token = %q
  executor = "instance"
  shell = "bash"
  builds_dir = %q
  [runners.autoscaler]
    plugin = "fake"
    max_instances = 3
    delete_instances_on_shutdown = true
%s    [runners.autoscaler.connector_config]
      timeout = "30s"
    [[runners.autoscaler.policy]]
      idle_count = 1
%s`, url, token, filepath.Join(dir, "builds"), fakePluginConfig(filepath.Join(dir, "fake-state"), ssh), extra)
}

// runWithHelper is runUntilDone with the helper directory set.
func runWithHelper(t *testing.T, srv *coordinator.Server, dir, pluginDir, helperDir, cfg string) string {
	return runWithHelperTB(t, srv, dir, pluginDir, helperDir, cfg)
}

func runWithHelperTB(t testing.TB, srv *coordinator.Server, dir, pluginDir, helperDir, cfg string) string {
	t.Helper()
	return managerRun{dir: dir, pluginDir: pluginDir, helperDir: helperDir, cfg: cfg, within: 3 * time.Minute}.untilDone(t, srv)
}

func jobByName(t *testing.T, srv *coordinator.Server, name string) coordinator.JobRecord {
	t.Helper()
	var found []coordinator.JobRecord
	for _, j := range srv.Jobs() {
		if j.Name == name {
			found = append(found, j)
		}
	}
	if len(found) == 0 {
		t.Fatalf("no job %s", name)
	}
	return found[len(found)-1]
}

func zipNames(t *testing.T, path string) []string {
	t.Helper()
	zr, err := zip.OpenReader(path)
	if err != nil {
		t.Fatalf("stored archive %s: %v", path, err)
	}
	defer zr.Close()
	var names []string
	for _, f := range zr.File {
		names = append(names, f.Name)
	}
	return names
}

// TestArtifactsAndCacheEndToEnd runs issue 18's pipelines through `mayfly
// run` on the fake provider, whose VMs are one real OpenSSH server (this
// machine's userland: bash, git): artifacts and reports go to the
// coordinator and come back to b, dotenv becomes b's variable, c's
// on_failure artifacts are kept, and a second pipeline restores the first
// one's cache from the manager's local store.
func TestArtifactsAndCacheEndToEnd(t *testing.T) {
	t.Parallel() // beside issue 18's other end-to-end runs (see TestQEMUArtifactsAndCache)
	ssh := sshtest.Run(t, sshtest.OpenSSH)
	dir := t.TempDir()
	pluginDir := filepath.Join(dir, "plugins")
	buildPlugin(t, pluginDir, "github.com/mayfly-ci/mayfly/providers/fake/cmd/mayfly-plugin-fake")
	helperDir := filepath.Join(dir, "helpers")
	buildHelper(t, helperDir)

	const token = "artifacts-e2e-token"
	srv, url := startArtifactsCoordinator(t, token, artifactsPipeline)
	storeDir := filepath.Join(dir, "cache-store")
	cfg := fakeFleetConfig(url, token, dir, ssh, fmt.Sprintf(`  [runners.cache]
    Type = "local"
    [runners.cache.local]
      Dir = %q
      ListenAddress = %q
`, storeDir, freePort(t)))
	runWithHelper(t, srv, dir, pluginDir, helperDir, cfg)

	a := checkArtifactsPipeline(t, srv)

	// The cache object, named as gitlab-runner names it.
	object := filepath.Join(storeDir, "objects", "runner", gitlab.ShortToken(token), "project", fmt.Sprint(a.ProjectID), "deps-non_protected")
	if _, err := os.Stat(object); err != nil {
		t.Fatalf("cache object: %v", err)
	}

	// A second pipeline restores the cache from the store.
	apply(t, srv, cachePipeline)
	runWithHelper(t, srv, dir, pluginDir, helperDir, cfg)
	checkCacheRestored(t, jobByName(t, srv, "d"), a)

	// The store's signing key never reached a VM: not in a job's
	// environment (a's env.txt), its files, or a trace.
	key, err := os.ReadFile(filepath.Join(storeDir, "signing-key"))
	if err != nil {
		t.Fatal(err)
	}
	assertNowhere(t, filepath.Join(dir, "builds"), srv, string(key), fmt.Sprintf("%x", key))
}

// checkArtifactsPipeline checks artifactsPipeline's jobs from the
// coordinator's records: their status and trace lines, a's stored archive
// (its content too) and reports, the dotenv variable, and c's on_failure
// archive. It returns job a.
func checkArtifactsPipeline(t *testing.T, srv *coordinator.Server) coordinator.JobRecord {
	t.Helper()
	a, b, c := jobByName(t, srv, "a"), jobByName(t, srv, "b"), jobByName(t, srv, "c")
	for _, j := range []struct {
		rec    coordinator.JobRecord
		status string
		trace  []string
	}{
		{a, "success", []string{`Uploading artifacts as "archive" to coordinator... 201 Created`, `Uploading artifacts as "junit" to coordinator... 201 Created`,
			`Uploading artifacts as "dotenv" to coordinator... 201 Created`, "Creating cache deps-non_protected...", "Created cache"}},
		{b, "success", []string{fmt.Sprintf("Downloading artifacts for a (%d)...", a.ID), "Downloading artifacts from coordinator... ok",
			fmt.Sprintf("built-by-%d", a.ID), fmt.Sprintf("version=1.2.%d", a.ID)}},
		{c, "failed", []string{"Uploading artifacts for failed job", `Uploading artifacts as "archive" to coordinator... 201 Created`}},
	} {
		tr := string(j.rec.Trace)
		if j.rec.Status != j.status {
			t.Errorf("job %s: %s, want %s:\n%s", j.rec.Name, j.rec.Status, j.status, tr)
		}
		for _, w := range j.trace {
			if !strings.Contains(tr, w) {
				t.Errorf("job %s: trace lacks %q:\n%s", j.rec.Name, w, tr)
			}
		}
	}
	types := map[string]coordinator.ArtifactRecord{}
	for _, art := range a.Artifacts {
		types[art.Type] = art
	}
	if got := zipNames(t, types["archive"].Path); !slices.Contains(got, "out/result.txt") || slices.Contains(got, "junit.xml") {
		t.Errorf("a's archive holds %q", got)
	}
	if types["junit"].Format != "gzip" || types["dotenv"].Format != "gzip" || len(a.Dotenv) != 1 || a.Dotenv[0].Key != "BUILD_VERSION" {
		t.Errorf("a's reports %+v, dotenv %+v", types, a.Dotenv)
	}
	if len(c.Artifacts) != 1 || !slices.Contains(zipNames(t, c.Artifacts[0].Path), "partial.log") {
		t.Errorf("c's artifacts %+v", c.Artifacts)
	}
	if got := zipFile(t, types["archive"].Path, "out/result.txt"); got != fmt.Sprintf("built-by-%d\n", a.ID) {
		t.Errorf("a's stored archive: out/result.txt is %q", got)
	}
	if got := gunzipFile(t, types["junit"].Path); !strings.Contains(got, `<testsuite name="a" tests="1"/>`) {
		t.Errorf("a's stored junit report: %q", got)
	}
	if len(a.Dotenv) == 1 && a.Dotenv[0].Value != fmt.Sprintf("1.2.%d", a.ID) {
		t.Errorf("a's dotenv: %+v", a.Dotenv)
	}
	return a
}

// checkCacheRestored checks that job d restored the cache job a saved.
func checkCacheRestored(t *testing.T, d, a coordinator.JobRecord) {
	t.Helper()
	for _, w := range []string{"Checking cache for deps-non_protected...", "Successfully extracted cache", fmt.Sprintf("cached-by-%d", a.ID)} {
		if !strings.Contains(string(d.Trace), w) {
			t.Errorf("job d: trace lacks %q:\n%s", w, d.Trace)
		}
	}
	if d.Status != "success" {
		t.Errorf("job d: %s", d.Status)
	}
}

// zipFile returns the content of one file of a stored zip archive.
func zipFile(t *testing.T, path, name string) string {
	t.Helper()
	zr, err := zip.OpenReader(path)
	if err != nil {
		t.Fatalf("stored archive %s: %v", path, err)
	}
	defer zr.Close()
	f, err := zr.Open(name)
	if err != nil {
		t.Errorf("stored archive %s: %v", path, err)
		return ""
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		t.Errorf("stored archive %s: %s: %v", path, name, err)
	}
	return string(b)
}

// gunzipFile returns the content of a stored gzip report.
func gunzipFile(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Errorf("stored report: %v", err)
		return ""
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Errorf("stored report %s: %v", path, err)
		return ""
	}
	b, err := io.ReadAll(zr)
	if err != nil {
		t.Errorf("stored report %s: %v", path, err)
	}
	return string(b)
}

// assertNowhere fails when any secret is in a file under root or in a trace.
func assertNowhere(t *testing.T, root string, srv *coordinator.Server, secrets ...string) {
	t.Helper()
	filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil
		}
		for _, s := range secrets {
			if s != "" && strings.Contains(string(b), s) {
				t.Errorf("a credential reached the VM: in %s", p)
			}
		}
		return nil
	})
	for _, j := range srv.Jobs() {
		for _, s := range secrets {
			if s != "" && strings.Contains(string(j.Trace), s) {
				t.Errorf("a credential is in job %s's trace", j.Name)
			}
		}
	}
}

// BenchmarkCacheOverhead is the wall time a 10 MB cache restore + save adds
// to a job on a warm VM (fake provider, OpenSSH on this machine, the
// manager's local store): jobs "plain" and "cached" run the same script
// side by side after a seed job filled the cache; the figure is the median
// difference of their durations over three pipelines.
//
//	go test -run '^$' -bench CacheOverhead -benchtime 1x ./cmd/mayfly/
func BenchmarkCacheOverhead(b *testing.B) {
	ssh := sshtest.Run(b, sshtest.OpenSSH)
	dir := b.TempDir()
	pluginDir := filepath.Join(dir, "plugins")
	buildPlugin(b, pluginDir, "github.com/mayfly-ci/mayfly/providers/fake/cmd/mayfly-plugin-fake")
	helperDir := filepath.Join(dir, "helpers")
	buildHelper(b, helperDir)
	const pipeline = `
projects:
  - name: bench
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: empty}]
        jobs:
          - {name: seed, stage: build, script: ["mkdir -p vendor", "head -c 10000000 /dev/urandom > vendor/blob"], cache: [{key: deps, paths: [vendor/]}]}
          - {name: plain, stage: test, script: ["ls -la"]}
          - {name: cached, stage: test, script: ["ls -la"], cache: [{key: deps, paths: [vendor/]}]}
`
	var diffs []time.Duration
	var logs string
	for round := range 3 {
		srv, url := startArtifactsCoordinatorTB(b, "bench-token", pipeline)
		sub := filepath.Join(dir, fmt.Sprint(round))
		if err := os.MkdirAll(sub, 0o755); err != nil {
			b.Fatal(err)
		}
		cfg := fakeFleetConfig(url, "bench-token", sub, ssh, fmt.Sprintf(`  [runners.cache]
    Type = "local"
    [runners.cache.local]
      Dir = %q
      ListenAddress = %q
`, filepath.Join(dir, "store"), freePortTB(b)))
		logs = runWithHelperTB(b, srv, sub, pluginDir, helperDir, strings.Replace(cfg, `log_level = "warn"`, `log_level = "debug"`, 1))
		var plain, cached time.Duration
		for _, j := range srv.Jobs() {
			switch j.Name {
			case "plain":
				plain = j.FinishedAt.Sub(j.StartedAt)
			case "cached":
				cached = j.FinishedAt.Sub(j.StartedAt)
				if !strings.Contains(string(j.Trace), "Successfully extracted cache") || !strings.Contains(string(j.Trace), "Created cache") {
					b.Fatalf("cached job did not restore and save:\n%s", j.Trace)
				}
			}
		}
		diffs = append(diffs, cached-plain)
	}
	slices.Sort(diffs)
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, "phase") && (strings.Contains(l, "restore_cache") || strings.Contains(l, "upload")) {
			b.Log(l)
		}
	}
	b.ReportMetric(diffs[1].Seconds(), "added-s-median")
	b.ReportMetric(diffs[0].Seconds(), "added-s-min")
	b.ReportMetric(diffs[2].Seconds(), "added-s-max")
}
