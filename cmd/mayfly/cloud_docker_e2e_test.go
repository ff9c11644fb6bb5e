package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/plugins/aws/awsfake"
	"github.com/mayfly-ci/mayfly/plugins/gce/gcefake"
	"github.com/mayfly-ci/mayfly/vmexec/dockertest"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

// dockerVM is the "VM" of the Docker end-to-end tests: dockertest's
// network namespace with dockerd and a real OpenSSH on port 22 (as cloud
// instances answer), joined to the host by a veth; the coordinator (GitLab,
// with its registry) listens on the host's end, as 10.0.2.2 for a qemu VM,
// with the job's image and service image pushed there.
type dockerVM struct {
	d        *dockertest.Daemon
	sshd     *sshtest.Server
	srv      *coordinator.Server
	url      string // the coordinator's
	registry string // host:port
	dir      string
}

func newDockerVM(t *testing.T) *dockerVM {
	t.Helper()
	d := dockertest.Run(t)
	v := &dockerVM{d: d, dir: t.TempDir()}
	v.sshd = sshtest.RunIn(t, sshtest.OpenSSH, d.NetNS, net.JoinHostPort(d.GuestIP, "22"))
	srv, err := coordinator.New(coordinator.Config{Logger: slog.New(slog.DiscardHandler), TraceUpdateInterval: time.Second,
		StateDir: filepath.Join(v.dir, "coordinator"), Registry: &coordinator.RegistryConfig{}})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(d.HostIP, "0"))
	if err != nil {
		t.Fatal(err)
	}
	v.srv, v.url, v.registry = srv, "http://"+ln.Addr().String(), ln.Addr().String()
	srvCtx, stopSrv := context.WithCancel(context.Background())
	srvDone := make(chan struct{})
	go func() { defer close(srvDone); _ = srv.Serve(srvCtx, ln) }()
	t.Cleanup(func() { stopSrv(); <-srvDone })
	if _, err := srv.RegisterRunner(coordinator.RunnerOptions{RegistrationToken: srv.RegistrationToken(), RunUntagged: true, Token: cloudToken}); err != nil {
		t.Fatal(err)
	}
	bb, err := dockertest.BusyboxImage()
	if err != nil {
		t.Fatal(err)
	}
	pushImage(t, v.registry, srv.PushToken(), "mayfly/busybox:test", bb)
	pushImage(t, v.registry, srv.PushToken(), "mayfly/pong:test", withPortAndCmd(t, bb, "6379/tcp", "nc", "-ll", "-p", "6379", "-e", "echo", "PONG"))
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
	// A project with a .gitlab-ci.yml, as with --project: get_sources
	// clones it in the VM's shell, the script reads it in the container.
	proj := filepath.Join(v.dir, "docker-demo")
	if err := os.MkdirAll(proj, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, content := range map[string]string{
		"greeting.txt": "hello from the repository\n",
		".gitlab-ci.yml": `show:
  image: $CI_REGISTRY/mayfly/busybox:test
  variables:
    GIT_DEPTH: "1"
  script:
    - cat greeting.txt
    - grep -q mayfly-busybox /etc/os-release
`,
	} {
		if err := os.WriteFile(filepath.Join(proj, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := srv.AddProjects(context.Background(), []coordinator.ProjectSource{{Dir: proj}}); err != nil {
		t.Fatal(err)
	}
	return v
}

// runnerHead is the [[runners]] entry up to the provider's block.
func (v *dockerVM) runnerHead(name string) string {
	return fmt.Sprintf(`concurrent = 1
check_interval = 1
log_level = "debug"

[[runners]]
  name = %q
  url = %q
  token = %q
  executor = "docker-autoscaler"
  shell = "bash"
  builds_dir = %q
  [runners.docker]
    host = "unix://%s"
    pull_policy = "always"
    wait_for_services_timeout = 20
`, name, v.url, cloudToken, filepath.Join(v.dir, "builds"), v.d.Socket)
}

// check asserts the jobs' outcomes from their stored traces, and logs the
// pick-up to script start of the image job from the manager's log.
func (v *dockerVM) check(t *testing.T, logs string) {
	t.Helper()
	for line := range strings.Lines(logs) {
		if strings.Contains(line, "job phases") && strings.Contains(line, "stage_step_script") && strings.Contains(line, "job=1 ") {
			t.Logf("image job phases: %s", strings.TrimSpace(line[strings.Index(line, "phases."):]))
		}
		if strings.Contains(line, "job script starting") {
			if _, val, ok := strings.Cut(line, "pickup_to_start_seconds="); ok {
				t.Logf("image job: pick-up to script start %s s (pulls, network, service and its wait, two containers)", strings.Fields(val)[0])
			}
		}
	}
	jobs := v.srv.Jobs()
	if len(jobs) != 3 {
		t.Errorf("%d jobs, want 3", len(jobs))
	}
	for _, j := range jobs {
		tr := string(j.Trace)
		switch j.Name {
		case "in-image":
			for _, want := range []string{
				"Using Docker executor with image " + v.registry + "/mayfly/busybox:test",
				"Authenticating with credentials from job payload (GitLab Registry)",
				"Pulling docker image " + v.registry + "/mayfly/busybox:test ...",
				"Waiting for services to be up and running (timeout 20 seconds)...",
				dockertest.BusyboxOSRelease,
				"\nPONG\n",
				"token in env is [MASKED]",
			} {
				if !strings.Contains(tr, want) {
					t.Errorf("job %s lacks %q:\n%s", j.Name, want, tr)
				}
			}
			if j.Status != "success" || strings.Contains(tr, "WARNING") {
				t.Errorf("job %s: %s %s\n%s", j.Name, j.Status, j.FailureReason, tr)
			}
		case "show":
			if j.Status != "success" || !strings.Contains(tr, "\nhello from the repository\n") || !strings.Contains(tr, "Getting source from Git repository") {
				t.Errorf("job %s (cloned in the VM, read in the container): %s %s\n%s", j.Name, j.Status, j.FailureReason, tr)
			}
		case "missing-image":
			// A missing image is the job's configuration (script_failure).
			if j.Status != "failed" || j.FailureReason != "script_failure" || !strings.Contains(tr, `failed to pull image "`+v.registry+`/mayfly/absent:test"`) {
				t.Errorf("job %s: %s %s\n%s", j.Name, j.Status, j.FailureReason, tr)
			}
		}
	}
}

// TestEC2DockerJobEndToEnd runs jobs with image: and services: through
// `mayfly run` with the real mayfly-plugin-aws against the EC2 fake; the
// instance is a dockerVM, whose Docker Engine the manager drives over the
// job's SSH connection.
func TestEC2DockerJobEndToEnd(t *testing.T) {
	v := newDockerVM(t)
	cloudInit := func(in awsfake.Instance) {
		if key := authorizedKeyFromUserData(string(in.UserData)); key == "" {
			t.Errorf("instance %s: no ssh_authorized_keys in its user data", in.ID)
		} else if err := v.sshd.AuthorizeKey(key); err != nil {
			t.Errorf("instance %s: authorise its key: %v", in.ID, err)
		}
	}
	fake := awsfake.New(awsfake.Options{
		AccessKeyID: e2eKeyID, SecretAccessKey: e2eSecret,
		Subnets: map[string]string{"subnet-0e2e0000000000001": "us-east-1a"}, Images: map[string]string{e2eAMI: "linux"},
		PendingDuration: 200 * time.Millisecond, ConsoleDelay: 300 * time.Millisecond,
		Address: v.d.GuestIP, HostKey: v.sshd.HostKey, OnLaunch: cloudInit,
	})
	api := httptest.NewServer(fake)
	t.Cleanup(api.Close)
	pluginDir := filepath.Join(v.dir, "plugins")
	buildPlugin(t, pluginDir, "github.com/mayfly-ci/mayfly/plugins/aws/cmd/mayfly-plugin-aws")
	secretFile := filepath.Join(v.dir, "ssh-secret")
	if err := os.WriteFile(secretFile, []byte("e2e-0123456789abcdef0123456789abcdef"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := v.runnerHead("ec2-docker") + fmt.Sprintf(`  [runners.autoscaler]
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
`, api.URL, e2eKeyID, e2eSecret, e2eAMI, v.sshd.User, secretFile)
	v.check(t, runUntilDone(t, v.srv, v.dir, pluginDir, cfg, 3*time.Minute))
	for _, in := range fake.Instances() {
		if in.State != "terminated" && in.State != "shutting-down" {
			t.Errorf("instance %s is %s after shutdown", in.ID, in.State)
		}
	}
}

// TestGCEDockerJobEndToEnd is the same jobs with the real
// mayfly-plugin-gce against the GCE fake (its guest agent authorises the
// instance's ssh-keys metadata).
func TestGCEDockerJobEndToEnd(t *testing.T) {
	v := newDockerVM(t)
	var mu sync.Mutex
	authorized := map[string]bool{}
	agent := func(in gcefake.InstanceInfo) {
		for line := range strings.Lines(in.Metadata["ssh-keys"]) {
			user, key, ok := strings.Cut(strings.TrimSpace(line), ":")
			if !ok || user != v.sshd.User {
				continue
			}
			mu.Lock()
			done := authorized[key]
			authorized[key] = true
			mu.Unlock()
			if !done {
				if err := v.sshd.AuthorizeKey(key); err != nil {
					t.Errorf("instance %s: authorise its key: %v", in.Name, err)
				}
			}
		}
	}
	fake := gcefake.New(gcefake.Options{
		Project: "e2e-project", BootDelay: 500 * time.Millisecond, AgentDelay: 200 * time.Millisecond,
		Address: v.d.GuestIP, HostKeys: []string{v.sshd.HostKey}, OnMetadata: agent,
	})
	api := httptest.NewServer(fake)
	t.Cleanup(api.Close)
	pluginDir := filepath.Join(v.dir, "plugins")
	buildPlugin(t, pluginDir, "github.com/mayfly-ci/mayfly/plugins/gce/cmd/mayfly-plugin-gce")
	cfg := v.runnerHead("gce-docker") + fmt.Sprintf(`  [runners.autoscaler]
    plugin = "gce"
    max_use_count = 1
    max_instances = 1
    delete_instances_on_shutdown = true
    [runners.autoscaler.plugin_config]
      project = "e2e-project"
      zones = ["us-east1-b"]
      machine_type = "n1-standard-1"
      os = "linux"
      username = %q
      endpoint = %q
      credentials_file = %q
      poll_interval = "100ms"
    [runners.autoscaler.connector_config]
      os = "linux"
      protocol = "ssh"
      timeout = "30s"
    [[runners.autoscaler.policy]]
      idle_count = 1
      idle_time = "1m"
`, v.sshd.User, api.URL, gceCredentials(t, api.URL, "e2e-project"))
	v.check(t, runUntilDone(t, v.srv, v.dir, pluginDir, cfg, 3*time.Minute))
	for _, in := range fake.Instances() {
		t.Errorf("instance %s is left after shutdown", in.Name)
	}
}

func pushImage(t *testing.T, registry, token, repoTag string, img v1.Image) {
	t.Helper()
	tag, err := name.NewTag(registry+"/"+repoTag, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	// The credentials go with every request: the coordinator's token
	// realm is its external URL, which may be the VMs' 10.0.2.2.
	rt := basicTransport{user: "admin", password: token, next: remote.DefaultTransport}
	if err := remote.Write(tag, img, remote.WithAuth(authn.Anonymous), remote.WithTransport(rt)); err != nil {
		t.Fatalf("push %s: %v", tag, err)
	}
}

type basicTransport struct {
	user, password string
	next           http.RoundTripper
}

func (b basicTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	req = req.Clone(req.Context())
	req.SetBasicAuth(b.user, b.password)
	return b.next.RoundTrip(req)
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
