package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/plugins/aws/awsfake"
	"github.com/mayfly-ci/mayfly/vmexec/dockertest"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

// TestEC2DockerJobEndToEnd runs a job with image: and services: through
// `mayfly run` with the real mayfly-plugin-aws against the EC2 fake, on a
// real Docker Engine: the instance is a network namespace of the test's
// (dockertest) holding dockerd and a real OpenSSH on port 22, joined to the
// host by a veth as a VM to its host. The coordinator (GitLab, with its
// registry) listens on the host's side of the veth; the job's image and
// service image are pushed there first. The manager drives the engine over
// the job's SSH connection.
func TestEC2DockerJobEndToEnd(t *testing.T) {
	d := dockertest.Run(t)
	sshd := sshtest.RunIn(t, sshtest.OpenSSH, d.NetNS, net.JoinHostPort(d.GuestIP, "22")) // EC2 instances answer SSH on 22

	// The coordinator, as the VM sees it: on the host's end of the veth.
	dir := t.TempDir()
	srv, err := coordinator.New(coordinator.Config{Logger: slog.New(slog.DiscardHandler), TraceUpdateInterval: time.Second,
		StateDir: filepath.Join(dir, "coordinator"), Registry: &coordinator.RegistryConfig{}})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(d.HostIP, "0"))
	if err != nil {
		t.Fatal(err)
	}
	url := "http://" + ln.Addr().String()
	srvCtx, stopSrv := context.WithCancel(context.Background())
	srvDone := make(chan struct{})
	go func() { defer close(srvDone); _ = srv.Serve(srvCtx, ln) }()
	t.Cleanup(func() { stopSrv(); <-srvDone })
	if _, err := srv.RegisterRunner(coordinator.RunnerOptions{RegistrationToken: srv.RegistrationToken(), RunUntagged: true, Token: cloudToken}); err != nil {
		t.Fatal(err)
	}
	registry := ln.Addr().String()
	bb, err := dockertest.BusyboxImage()
	if err != nil {
		t.Fatal(err)
	}
	pushImage(t, registry, srv.PushToken(), "mayfly/busybox:test", bb)
	pushImage(t, registry, srv.PushToken(), "mayfly/pong:test", withPortAndCmd(t, bb, "6379/tcp", "nc", "-ll", "-p", "6379", "-e", "echo", "PONG"))
	pipeline, err := coordinator.ParsePipelineFile("docker-e2e.yaml", []byte(`
projects:
  - name: web
    pipelines:
      - variables:
          - {key: GIT_STRATEGY, value: none}
        jobs:
          - name: in-image
            image: {name: "$CI_REGISTRY/mayfly/busybox:test"}
            services:
              - {name: "$CI_REGISTRY/mayfly/pong:test", alias: db}
            script:
              - cat /etc/os-release
              - nc db 6379 </dev/null
              - echo "token in env is $CI_JOB_TOKEN"
          - name: missing-image
            image: {name: "$CI_REGISTRY/mayfly/absent:test"}
            script: ["echo never"]
`))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Apply(pipeline); err != nil {
		t.Fatal(err)
	}

	cloudInit := func(in awsfake.Instance) {
		if key := authorizedKeyFromUserData(string(in.UserData)); key == "" {
			t.Errorf("instance %s: no ssh_authorized_keys in its user data", in.ID)
		} else if err := sshd.AuthorizeKey(key); err != nil {
			t.Errorf("instance %s: authorise its key: %v", in.ID, err)
		}
	}
	fake := awsfake.New(awsfake.Options{
		AccessKeyID: e2eKeyID, SecretAccessKey: e2eSecret,
		Subnets: map[string]string{"subnet-0e2e0000000000001": "us-east-1a"}, Images: map[string]string{e2eAMI: "linux"},
		PendingDuration: 200 * time.Millisecond, ConsoleDelay: 300 * time.Millisecond,
		Address: d.GuestIP, HostKey: sshd.HostKey, OnLaunch: cloudInit,
	})
	api := httptest.NewServer(fake)
	t.Cleanup(api.Close)
	pluginDir := filepath.Join(dir, "plugins")
	buildPlugin(t, pluginDir, "github.com/mayfly-ci/mayfly/plugins/aws/cmd/mayfly-plugin-aws")
	secretFile := filepath.Join(dir, "ssh-secret")
	if err := os.WriteFile(secretFile, []byte("e2e-0123456789abcdef0123456789abcdef"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`concurrent = 1
check_interval = 1

[[runners]]
  name = "ec2-docker"
  url = %q
  token = %q
  executor = "docker-autoscaler"
  shell = "bash"
  builds_dir = %q
  [runners.docker]
    host = "unix://%s"
    pull_policy = "always"
    wait_for_services_timeout = 20
  [runners.autoscaler]
    plugin = "aws"
    max_use_count = 1
    max_instances = 1
    delete_instances_on_shutdown = true
    [runners.autoscaler.plugin_config]
      region = "us-east-1"
      endpoint = %q
      access_key_id = %q
      secret_access_key = %q
      ami = %q
      instance_type = "t3.micro"
      subnet_ids = ["subnet-0e2e0000000000001"]
      name_prefix = "e2e"
      username = %q
      key_secret_file = %q
    [runners.autoscaler.connector_config]
      timeout = "30s"
    [[runners.autoscaler.policy]]
      idle_count = 1
      idle_time = "1m"
`, url, cloudToken, filepath.Join(dir, "builds"), d.Socket, api.URL, e2eKeyID, e2eSecret, e2eAMI, sshd.User, secretFile)
	logs := runUntilDone(t, srv, dir, pluginDir, cfg, 3*time.Minute)
	// The figure of the closing note: pick-up to script start of an image
	// job (image pull, network, service start and wait, two containers).
	for line := range strings.Lines(logs) {
		if strings.Contains(line, "job script starting") {
			if _, v, ok := strings.Cut(line, "pickup_to_start_seconds="); ok {
				t.Logf("image job: pick-up to script start %s s (includes pulling both images; see mayfly_job_phase_seconds)", strings.Fields(v)[0])
			}
		}
	}

	for _, j := range srv.Jobs() {
		tr := string(j.Trace)
		switch j.Name {
		case "in-image":
			for _, want := range []string{
				"Using Docker executor with image " + registry + "/mayfly/busybox:test",
				"Authenticating with credentials from job payload (GitLab Registry)",
				"Pulling docker image " + registry + "/mayfly/busybox:test ...",
				dockertest.BusyboxOSRelease,
				"\nPONG\n",
				"token in env is [MASKED]",
			} {
				if !strings.Contains(tr, want) {
					t.Errorf("job %s lacks %q:\n%s", j.Name, want, tr)
				}
			}
			if j.Status != "success" {
				t.Errorf("job %s: %s %s\n%s", j.Name, j.Status, j.FailureReason, tr)
			}
		case "missing-image":
			// Not found is the job's configuration (script_failure).
			if j.Status != "failed" || j.FailureReason != "script_failure" || !strings.Contains(tr, `failed to pull image "`+registry+`/mayfly/absent:test"`) {
				t.Errorf("job %s: %s %s\n%s", j.Name, j.Status, j.FailureReason, tr)
			}
		}
	}
	for _, in := range fake.Instances() {
		if in.State != "terminated" && in.State != "shutting-down" {
			t.Errorf("instance %s is %s after shutdown", in.ID, in.State)
		}
	}
}

func pushImage(t *testing.T, registry, token, repoTag string, img v1.Image) {
	t.Helper()
	tag, err := name.NewTag(registry+"/"+repoTag, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(tag, img, remote.WithAuth(&authn.Basic{Username: "admin", Password: token})); err != nil {
		t.Fatalf("push %s: %v", tag, err)
	}
}

func withPortAndCmd(t *testing.T, img v1.Image, port string, cmd ...string) v1.Image {
	t.Helper()
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.Config.ExposedPorts = map[string]struct{}{port: {}}
	cf.Config.Cmd = cmd
	out, err := mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return out
}
