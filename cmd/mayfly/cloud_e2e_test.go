package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/plugins/aws/awsfake"
	"github.com/mayfly-ci/mayfly/vmexec"
	"github.com/mayfly-ci/mayfly/vmexec/sshexec"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

const (
	e2eAMI     = "ami-0123456789abcdef0"
	e2eKeyID   = "AKIDE2E00000000000"
	e2eSecret  = "e2e-secret-key/0123456789"
	cloudToken = "cloud-e2e-token"
)

// TestEC2LinuxFleetEndToEnd runs `mayfly run` with the real
// mayfly-plugin-aws process against the EC2 fake (the official SDK over
// HTTP, SigV4 checked). Every instance is played by one real dropbear on a
// loopback address of its own, port 22 as the plugin reports: the fake
// publishes dropbear's host key on the console so the pin matches, and
// plays cloud-init by authorising each instance's user-data key there.
func TestEC2LinuxFleetEndToEnd(t *testing.T) {
	t.Parallel() // waits more than it computes: overlaps the other waiting end-to-end tests
	sshd := sshtest.Run(t, sshtest.Dropbear)
	vm := listenLoopback(t, 22)
	forward(t, vm, sshd.Addr)
	vmIP, _, _ := net.SplitHostPort(vm.Addr().String())

	cloudInit := func(in awsfake.Instance) {
		key := authorizedKeyFromUserData(string(in.UserData))
		if key == "" {
			t.Errorf("instance %s: no ssh_authorized_keys in its user data:\n%s", in.ID, in.UserData)
			return
		}
		if err := authorize(sshd, key); err != nil {
			t.Errorf("instance %s: authorise its key: %v", in.ID, err)
		}
	}
	subnets := map[string]string{
		"subnet-0e2e0000000000001": "us-east-1a",
		"subnet-0e2e0000000000002": "us-east-1b",
		"subnet-0e2e0000000000003": "us-east-1c",
	}
	fake := awsfake.New(awsfake.Options{
		AccessKeyID: e2eKeyID, SecretAccessKey: e2eSecret,
		Subnets: subnets, Images: map[string]string{e2eAMI: "linux"},
		PendingDuration: 200 * time.Millisecond, ConsoleDelay: 300 * time.Millisecond,
		Address: vmIP, HostKey: sshd.HostKey, OnLaunch: cloudInit,
	})
	api := httptest.NewServer(fake)
	t.Cleanup(api.Close)
	// The first subnet's zone has no capacity: the plugin moves on.
	fake.SetCapacity("subnet-0e2e0000000000001", 0)

	dir := t.TempDir()
	pluginDir := filepath.Join(dir, "plugins")
	buildPlugin(t, pluginDir, "github.com/mayfly-ci/mayfly/plugins/aws/cmd/mayfly-plugin-aws")
	secretFile := filepath.Join(dir, "ssh-secret")
	if err := os.WriteFile(secretFile, []byte("e2e-0123456789abcdef0123456789abcdef"), 0o600); err != nil {
		t.Fatal(err)
	}

	srv, url := startCoordinator(t, cloudToken, `
projects:
  - name: web
    pipelines:
      - variables:
          - {key: GIT_STRATEGY, value: none}
          - {key: SECRET_X, value: s3cr3t-value-123, masked: true}
        jobs:
          - {name: one, script: ["echo hello-$CI_JOB_NAME"]}
          - {name: two, script: ["echo secret=$SECRET_X"]}
          - {name: three, script: ["echo about to fail", "exit 3"]}
          - {name: four, script: ["echo hello-$CI_JOB_NAME"], after_script: ["echo cleanup-$CI_JOB_STATUS"]}
`)
	cfg := fmt.Sprintf(`concurrent = 2
check_interval = 1
log_level = "info"

[[runners]]
  name = "ec2-fleet"
  url = %q
  token = %q
  executor = "instance"
  shell = "sh"
  builds_dir = %q
  [runners.autoscaler]
    plugin = "aws"
    max_use_count = 1
    max_instances = 3
    delete_instances_on_shutdown = true
    [runners.autoscaler.plugin_config]
      region = "us-east-1"
      endpoint = %q
      access_key_id = %q
      secret_access_key = %q
      ami = %q
      instance_type = "t3.micro"
      subnet_ids = ["subnet-0e2e0000000000001", "subnet-0e2e0000000000002", "subnet-0e2e0000000000003"]
      spot = true
      name_prefix = "e2e"
      username = %q
      key_secret_file = %q
    [runners.autoscaler.connector_config]
      timeout = "30s"
    [[runners.autoscaler.policy]]
      idle_count = 1
      idle_time = "1m"
`, url, cloudToken, filepath.Join(dir, "builds"), api.URL, e2eKeyID, e2eSecret, e2eAMI, sshd.User, secretFile)
	runUntilDone(t, srv, dir, pluginDir, cfg, 90*time.Second)

	want := map[string]struct{ status, reason, output string }{
		"one":   {"success", "", "\nhello-one\n"},
		"two":   {"success", "", "\nsecret=[MASKED]\n"},
		"three": {"failed", "script_failure", "\nabout to fail\n"},
		"four":  {"success", "", "\ncleanup-success\n"},
	}
	jobs := srv.Jobs()
	for _, j := range jobs {
		w := want[j.Name]
		if j.Status != w.status || j.FailureReason != w.reason || !strings.Contains(string(j.Trace), w.output) {
			t.Errorf("job %s: %s %q, want %s %q with %q in the trace:\n%s", j.Name, j.Status, j.FailureReason, w.status, w.reason, w.output, j.Trace)
		}
		if strings.Contains(string(j.Trace), "s3cr3t") {
			t.Errorf("job %s: the masked value leaked into the trace", j.Name)
		}
	}
	if len(jobs) != len(want) {
		t.Errorf("%d jobs at the coordinator, want %d", len(jobs), len(want))
	}

	// Nothing leaked: every instance the plugin launched is terminated, each
	// job had its own, and none landed in the zone without capacity.
	insts := fake.Instances()
	for _, in := range insts {
		if in.State != "terminated" && in.State != "shutting-down" {
			t.Errorf("instance %s is %s after shutdown", in.ID, in.State)
		}
		if in.SubnetID == "subnet-0e2e0000000000001" {
			t.Errorf("instance %s launched in the subnet without capacity", in.ID)
		}
		if !in.Spot || in.Tags["mayfly-manager"] != "e2e" {
			t.Errorf("instance %s: spot %t, tags %v; want a spot instance tagged with the manager", in.ID, in.Spot, in.Tags)
		}
	}
	if len(insts) < len(want) {
		t.Errorf("the plugin launched %d instances for %d jobs: an instance ran more than one job", len(insts), len(want))
	}
	calls, perJob := callsPerJob(fake.Calls(), len(want))
	t.Logf("EC2: %d jobs, %d instances launched, API calls %s: %.1f calls per job", len(want), len(insts), calls, perJob)
}

// authorizedKeyFromUserData returns the key of the cloud-config
// ssh_authorized_keys list in user data (a plain cloud-config or a MIME
// multipart archive holding one).
func authorizedKeyFromUserData(ud string) string {
	_, rest, ok := strings.Cut(ud, "ssh_authorized_keys:")
	if !ok {
		return ""
	}
	for line := range strings.Lines(rest) {
		if k, ok := strings.CutPrefix(strings.TrimSpace(line), "- "); ok {
			return strings.TrimSpace(k)
		}
	}
	return ""
}

// authorize appends key to the login user's authorized_keys on the SSH
// test server, logging in with the test's own key.
func authorize(sshd *sshtest.Server, key string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := sshexec.Dial(ctx, sshd.Target())
	if err != nil {
		return err
	}
	defer c.Close()
	var out bytes.Buffer
	code, err := c.Run(ctx, vmexec.Command{
		Script: "printf '%s\\n' '" + strings.ReplaceAll(key, "'", "") + "' >> \"$HOME/.ssh/authorized_keys\"",
		Shell:  "sh", Stdout: &out, Stderr: &out,
	})
	if err != nil {
		return err
	}
	if code != 0 {
		return fmt.Errorf("exit %d: %s", code, out.String())
	}
	return nil
}
