package aws_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/plugins/aws/awsfake"
	"github.com/mayfly-ci/mayfly/providers"
)

var labels = map[string]string{providers.LabelManager: "mgr-1", providers.LabelRunner: "linux"}

func TestDeleteUnknownAndMalformed(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	p := start(t, e.with())
	ids, err := p.Create(ctxT(t), 2, labels)
	if err != nil {
		t.Fatal(err)
	}
	e.srv.ResetCalls()
	ghost := "i-0123456789abcdef0"
	all := append(slices.Clone(ids), ghost, "not-an-instance", ids[0])
	deleted, err := p.Delete(ctxT(t), all)
	if err != nil {
		t.Fatalf("Delete: %v", err)
	}
	want := append(slices.Clone(ids), ghost, "not-an-instance")
	if !slices.Equal(slices.Sorted(slices.Values(deleted)), slices.Sorted(slices.Values(want))) {
		t.Errorf("Delete = %v, want %v", deleted, want)
	}
	// One call refused for the unknown id, one without it.
	if got := e.srv.Calls()["TerminateInstances"]; got != 2 {
		t.Errorf("TerminateInstances calls = %d, want 2", got)
	}
	for _, id := range ids {
		if in, _ := e.srv.Instance(id); in.State != "terminated" && in.State != "shutting-down" {
			t.Errorf("instance %s is %s after Delete", id, in.State)
		}
	}
	e.srv.FailNext("TerminateInstances", "RequestLimitExceeded", "", 1)
	if _, err := p.Delete(ctxT(t), ids); err == nil {
		t.Error("Delete succeeded through a throttle")
	} else if _, ok := providers.IsRateLimited(err); !ok {
		t.Errorf("throttled Delete = %v, want rate_limited", err)
	}
}

// TestRestartLeakFree kills the plugin process while it holds instances:
// the restarted process lists them (from EC2's tags, no local state), can
// still log in to them (same key secret), and deletes them all.
func TestRestartLeakFree(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	secretFile := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secretFile, []byte(strings.Repeat("k", 48)), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startPlugin(t)
	if _, err := p.Init(ctxT(t), e.with("key_secret_file", secretFile)); err != nil {
		t.Fatal(err)
	}
	ids, err := p.Create(ctxT(t), 3, labels)
	if err != nil {
		t.Fatal(err)
	}
	waitRunning(t, p, ids)
	before, err := p.ConnectInfo(ctxT(t), ids[0])
	if err != nil {
		t.Fatal(err)
	}
	pid := p.PID()
	proc, err := os.FindProcess(pid)
	if err != nil {
		t.Fatal(err)
	}
	if err := proc.Kill(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for p.Restarts() == 0 || p.PID() == 0 || p.PID() == pid {
		if time.Now().After(deadline) {
			t.Fatal("plugin was not restarted")
		}
		time.Sleep(20 * time.Millisecond)
	}
	list := waitRunning(t, p, ids)
	if len(list) != 3 {
		t.Errorf("List after restart = %+v", list)
	}
	after, err := p.ConnectInfo(ctxT(t), ids[0])
	if err != nil {
		t.Fatalf("ConnectInfo after restart: %v", err)
	}
	if publicOf(t, after.PrivateKey) != publicOf(t, before.PrivateKey) {
		t.Error("the restarted plugin derived another SSH key")
	}
	var listed []string
	for _, in := range list {
		listed = append(listed, in.ID)
	}
	deleted, err := p.Delete(ctxT(t), listed)
	if err != nil || len(deleted) != 3 {
		t.Fatalf("Delete(%v) = %v, %v", listed, deleted, err)
	}
	for _, in := range e.srv.Instances() {
		if in.State != "terminated" && in.State != "shutting-down" {
			t.Errorf("instance %s left %s (leak)", in.ID, in.State)
		}
	}
}

func TestRestartWithoutSecretRefusesOldInstances(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	ids, err := start(t, e.with()).Create(ctxT(t), 1, labels)
	if err != nil {
		t.Fatal(err)
	}
	p2 := start(t, e.with())
	_, err = p2.ConnectInfo(ctxT(t), ids[0])
	if providers.KindOf(err) != providers.KindPermanent || !strings.Contains(err.Error(), "key_secret_file") {
		t.Errorf("ConnectInfo after a restart without key_secret_file = %v, want a permanent error", err)
	}
}

// TestAPICallsPerJob counts the EC2 calls one job's instance costs: create,
// wait until it runs, get connect info (with host key), heartbeat, delete.
func TestAPICallsPerJob(t *testing.T) {
	for _, tc := range []struct {
		name string
		os   string
		n    int
	}{{"linux/1", "linux", 1}, {"linux/10", "linux", 10}, {"windows/1", "windows", 1}} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, awsfake.Options{PendingDuration: 100 * time.Millisecond})
			settings := e.with()
			if tc.os == "windows" {
				settings = e.with("os", "windows", "ami", winAMI)
			}
			p := start(t, settings)
			ids, err := p.Create(ctxT(t), tc.n, labels)
			if err != nil {
				t.Fatal(err)
			}
			polls := e.srv.Calls()["DescribeInstances"]
			waitRunning(t, p, ids)
			polls = e.srv.Calls()["DescribeInstances"] - polls
			for _, id := range ids {
				if _, err := p.ConnectInfo(ctxT(t), id); err != nil {
					t.Fatal(err)
				}
				if err := p.Heartbeat(ctxT(t), id); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := p.Delete(ctxT(t), ids); err != nil {
				t.Fatal(err)
			}
			calls := e.srv.Calls()
			perJob := func(action string) float64 { return float64(calls[action]) / float64(tc.n) }
			t.Logf("%s: per job RunInstances %.2f TerminateInstances %.2f GetConsoleOutput %.2f GetPasswordData %.2f ImportKeyPair %.2f; DescribeInstances %d (all from %d List polls, none from ConnectInfo/Heartbeat)",
				tc.name, perJob("RunInstances"), perJob("TerminateInstances"), perJob("GetConsoleOutput"), perJob("GetPasswordData"), perJob("ImportKeyPair"), calls["DescribeInstances"], polls)
			if calls["RunInstances"] != tc.n {
				t.Errorf("RunInstances = %d, want %d", calls["RunInstances"], tc.n)
			}
			if calls["TerminateInstances"] != 1 {
				t.Errorf("TerminateInstances = %d, want 1 for the batch", calls["TerminateInstances"])
			}
			if calls["DescribeInstances"] != polls {
				t.Errorf("DescribeInstances = %d, of which %d from List polls: ConnectInfo/Heartbeat missed the cache", calls["DescribeInstances"], polls)
			}
			switch tc.os {
			case "linux":
				if calls["GetConsoleOutput"] != tc.n {
					t.Errorf("GetConsoleOutput = %d, want %d", calls["GetConsoleOutput"], tc.n)
				}
			case "windows":
				// The WinRM certificate is the plugin's own: no call reads it.
				if calls["GetPasswordData"] != tc.n || calls["ImportKeyPair"] != 1 || calls["DescribeInstanceAttribute"] != 0 {
					t.Errorf("GetPasswordData = %d, ImportKeyPair = %d, DescribeInstanceAttribute = %d", calls["GetPasswordData"], calls["ImportKeyPair"], calls["DescribeInstanceAttribute"])
				}
			}
			if pc := p.APICalls(); pc["RunInstances"] != calls["RunInstances"] || pc["TerminateInstances"] != calls["TerminateInstances"] {
				t.Errorf("provider counts %v disagree with the endpoint's %v", pc, calls)
			}
		})
	}
}
