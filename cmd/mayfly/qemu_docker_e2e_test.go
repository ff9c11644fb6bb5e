package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/internal/testenv"

	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/provisioner/image"
	"github.com/mayfly-ci/mayfly/vmexec/dockertest"
)

// TestQEMUDockerJobEndToEnd runs a project's .gitlab-ci.yml with image: and
// services: through the coordinator (as mayfly coordinator --project:
// its git, its registry, jobs at http://10.0.2.2:PORT) and mayfly run on
// the local qemu fleet with the debian-docker profile: the job's stages
// run in containers on the VM's own Docker Engine, driven over the job's
// SSH connection; the images are pulled from the coordinator's registry
// with the job token. It asserts from the stored trace that the script ran
// inside the image (its os-release, not the VM's Debian), the service
// answered by its alias, the image came from the coordinator's registry,
// the job token stayed masked, and that no VM is left. The same run clones
// testdata/projects/with-submodule in the VM's shell (issue 12: depth 1
// at the pipeline's commit, a submodule, pre_clone_script).
func TestQEMUDockerJobEndToEnd(t *testing.T) {
	repo, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	cacheDir := filepath.Join(repo, ".cache", "mayfly")
	requireQEMU(t, cacheDir)
	if os.Geteuid() != 0 {
		testenv.Missing(t, "the debian-docker image is built as root (mmdebstrap)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	img, err := image.Build(ctx, image.Options{CacheDir: cacheDir, Profile: image.ProfileDebianDocker,
		Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatalf("build the debian-docker image: %v", err)
	}
	t.Logf("debian-docker image %s (cached %v)", img.Hash, img.Cached)

	dir := t.TempDir()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	srv, err := coordinator.New(coordinator.Config{Logger: slog.New(slog.DiscardHandler), TraceUpdateInterval: time.Second,
		ExternalURL: fmt.Sprintf("http://10.0.2.2:%d", port), StateDir: filepath.Join(dir, "coordinator"),
		Registry: &coordinator.RegistryConfig{}})
	if err != nil {
		t.Fatal(err)
	}
	srvCtx, stopSrv := context.WithCancel(context.Background())
	srvDone := make(chan struct{})
	go func() { defer close(srvDone); _ = srv.Serve(srvCtx, ln) }()
	t.Cleanup(func() { stopSrv(); <-srvDone })
	if _, err := srv.RegisterRunner(coordinator.RunnerOptions{RegistrationToken: srv.RegistrationToken(), RunUntagged: true, Token: "qemu-docker-token"}); err != nil {
		t.Fatal(err)
	}
	bb, err := dockertest.BusyboxImage()
	if err != nil {
		t.Fatal(err)
	}
	local := ln.Addr().String()
	pushImage(t, local, srv.PushToken(), "mayfly/busybox:test", bb)
	pushImage(t, local, srv.PushToken(), "mayfly/pong:test", withPortAndCmd(t, bb, "6379/tcp", "nc", "-ll", "-p", "6379", "-e", "echo", "PONG"))
	proj := filepath.Join(dir, "with-service")
	if err := os.MkdirAll(proj, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(proj, ".gitlab-ci.yml"), []byte(`check:
  image: $CI_REGISTRY/mayfly/busybox:test
  services:
    - name: $CI_REGISTRY/mayfly/pong:test
      alias: db
  script:
    - cat /etc/os-release
    - nc db 6379 </dev/null
    - cat greeting.txt
    - echo "token $CI_JOB_TOKEN"
`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(proj, "greeting.txt"), []byte("cloned in the VM\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// Issue 12's clone, in the same run: testdata/projects/with-submodule,
	// a shallow clone at the pipeline's commit with a submodule served as
	// the project shared-lib, and the hosted config's pre_clone_script.
	added, err := srv.AddProjects(ctx, []coordinator.ProjectSource{{Dir: proj},
		{Dir: filepath.Join(repo, "testdata", "projects", "shared-lib")},
		{Dir: filepath.Join(repo, "testdata", "projects", "with-submodule")}})
	if err != nil {
		t.Fatal(err)
	}
	var pipelineSHA string
	for _, a := range added {
		if strings.HasSuffix(a.Project.Path, "/with-submodule") {
			pipelineSHA = a.Commit
		}
	}
	if pipelineSHA == "" {
		t.Fatalf("no with-submodule project among %+v", added)
	}

	pluginDir := filepath.Join(dir, "plugins")
	buildPlugin(t, pluginDir, "github.com/mayfly-ci/mayfly/plugins/qemu/cmd/mayfly-plugin-qemu")
	stateDir := filepath.Join(dir, "qemu")
	cfg := fmt.Sprintf(`concurrent = 1
check_interval = 1
log_level = "debug"

[[runners]]
  name = "qemu-docker"
  url = "http://%s"
  token = "qemu-docker-token"
  executor = "docker-autoscaler"
  shell = "bash"
  builds_dir = "/builds"
  pre_clone_script = "eval \"$CI_PRE_CLONE_SCRIPT\""
  [runners.docker]
    wait_for_services_timeout = 60
  [runners.autoscaler]
    plugin = "qemu"
    max_instances = 1
    delete_instances_on_shutdown = true
    [runners.autoscaler.plugin_config]
      state_dir = %q
      image_cache_dir = %q
      image = "debian-docker"
      boot_timeout = "600s"
      egress_allow = [%q]
    [runners.autoscaler.connector_config]
      timeout = "10m"
    [[runners.autoscaler.policy]]
      idle_count = 1
      idle_time = "10m"
`, local, stateDir, cacheDir, local)
	logs := runUntilDone(t, srv, dir, pluginDir, cfg, 20*time.Minute)
	defer func() {
		if t.Failed() {
			t.Logf("mayfly run logs:\n%s", logs)
		}
	}()
	for line := range strings.Lines(logs) {
		if strings.Contains(line, "job script starting") {
			if _, v, ok := strings.Cut(line, "pickup_to_start_seconds="); ok {
				t.Logf("image job on a warm debian-docker VM: pick-up to script start %s s", strings.Fields(v)[0])
			}
		}
		if strings.Contains(line, "job phases") {
			t.Logf("phases: %s", strings.TrimSpace(line[max(0, strings.Index(line, "phases.")):]))
		}
	}
	jobs := srv.Jobs()
	if len(jobs) != 2 {
		t.Fatalf("%d jobs, want 2 (check and show)", len(jobs))
	}
	var j, show coordinator.JobRecord
	for _, r := range jobs {
		switch r.Name {
		case "check":
			j = r
		case "show":
			show = r
		}
	}
	checkClone(t, show, pipelineSHA)
	tr := string(j.Trace)
	for _, want := range []string{
		fmt.Sprintf("Pulling docker image 10.0.2.2:%d/mayfly/busybox:test ...", port),
		"Authenticating with credentials from job payload (GitLab Registry)",
		dockertest.BusyboxOSRelease,
		"\nPONG\n",
		"\ncloned in the VM\n",
		"token [MASKED]",
	} {
		if !strings.Contains(tr, want) {
			t.Errorf("the trace lacks %q", want)
		}
	}
	if j.Status != "success" || strings.Contains(tr, "Debian GNU/Linux") {
		t.Errorf("job %s %s (the script must see the image's os-release, not the VM's Debian):\n%s", j.Status, j.FailureReason, tr)
	}
	if left := qemuProcesses(stateDir); len(left) > 0 {
		t.Errorf("qemu processes left after shutdown: %v", left)
	}
}

// checkClone checks the with-submodule job of issue 12 from its stored
// trace: it succeeded (its script compares HEAD with CI_COMMIT_SHA, checks
// the clone is shallow and reads the submodule's file), it checked out the
// pipeline's commit, the hooks before the clone ran in order, and no
// credential is in the trace.
func checkClone(t *testing.T, j coordinator.JobRecord, sha string) {
	t.Helper()
	tr := string(j.Trace)
	if j.Status != "success" {
		t.Errorf("job show: %s %s, want success:\n%s", j.Status, j.FailureReason, tr)
	}
	pre, hook := strings.Index(tr, "pre-clone script ran for root/with-submodule"), strings.Index(tr, "\npre_get_sources_script ran")
	if pre < 0 || hook < 0 {
		t.Errorf("job show: the pre_clone_script (%d) or the pre_get_sources_script hook (%d) did not run:\n%s", pre, hook, tr)
	}
	for _, want := range []string{"checked out " + sha, "shared-lib 1.0"} {
		if !strings.Contains(tr, want) {
			t.Errorf("job show: the trace lacks %q:\n%s", want, tr)
		}
	}
	if strings.Contains(tr, "gitlab-ci-token:") {
		t.Errorf("job show: a credential is in the trace:\n%s", tr)
	}
}
