package gce_test

import (
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/plugins/gce/gcefake"
	"github.com/mayfly-ci/mayfly/providers"
)

// TestWindowsPassword runs the GCE password-reset flow end to end: the
// windows-keys entry goes in with the insert, the fake's guest agent
// answers on serial port 4 once the instance boots, the plugin decrypts
// the password. A restarted plugin (a new provider) asks for a new one
// with setMetadata, as gcloud reset-windows-password does.
func TestWindowsPassword(t *testing.T) {
	f, url := startFake(t, gcefake.Options{BootDelay: 200 * time.Millisecond, AgentDelay: 200 * time.Millisecond})
	raw := settings(t, url, map[string]any{"os": "windows", "username": "ci-admin", "machine_type": "n1-standard-2"})
	p := newProvider(t, raw)
	id := createOne(t, p, testLabels)
	zone, name, _ := strings.Cut(id, "/")

	md := f.Instances()[0].Metadata
	if !strings.Contains(md["windows-keys"], `"userName":"ci-admin"`) || md["ssh-keys"] != "" {
		t.Fatalf("metadata %v: want a windows-keys entry for ci-admin and no ssh-keys", md)
	}

	// The password is not there before the guest booted; ConnectInfo polls
	// serial port 4 until the agent answered.
	ci, err := p.ConnectInfo(ctx(t), id)
	if err != nil {
		t.Fatalf("ConnectInfo: %v", err)
	}
	want := f.WindowsPassword(zone, name, "ci-admin")
	if want == "" || ci.Password != want {
		t.Fatalf("password %q, the agent set %q", ci.Password, want)
	}
	if ci.Protocol != providers.ProtocolWinRM || ci.Port != 5986 || ci.Username != "ci-admin" || ci.OS != "windows" {
		t.Errorf("connect info %+v: want winrm on 5986 as ci-admin", ci)
	}
	if err := ci.Validate(); err != nil {
		t.Error(err)
	}
	serialReads := f.Calls()["instances.getSerialPortOutput"]
	if serialReads < 2 {
		t.Errorf("%d serial port reads: the password was there at once, the boot was not waited for", serialReads)
	}
	again, err := p.ConnectInfo(ctx(t), id)
	if err != nil || again.Password != want {
		t.Errorf("second ConnectInfo = %q, %v", again.Password, err)
	}
	if n := f.Calls()["instances.getSerialPortOutput"]; n != serialReads {
		t.Errorf("second ConnectInfo read the serial port again (%d -> %d)", serialReads, n)
	}

	// A restarted plugin has lost the RSA key: it resets the password.
	restarted := newProvider(t, raw)
	ci2, err := restarted.ConnectInfo(ctx(t), id)
	if err != nil {
		t.Fatalf("ConnectInfo after restart: %v", err)
	}
	want2 := f.WindowsPassword(zone, name, "ci-admin")
	if ci2.Password != want2 || want2 == want {
		t.Errorf("password after restart %q, agent set %q (before: %q)", ci2.Password, want2, want)
	}
	if n := f.Calls()["instances.setMetadata"]; n != 1 {
		t.Errorf("%d setMetadata calls, want 1", n)
	}
	if entries := strings.Count(f.Instances()[0].Metadata["windows-keys"], "\n") + 1; entries != 2 {
		t.Errorf("windows-keys has %d entries, want 2", entries)
	}
}

// TestWindowsPasswordTimeout: without an answer within password_timeout,
// ConnectInfo fails with a transient error for the caller to retry.
func TestWindowsPasswordTimeout(t *testing.T) {
	_, url := startFake(t, gcefake.Options{AgentDelay: time.Hour})
	p := newProvider(t, settings(t, url, map[string]any{"os": "windows", "password_timeout": "150ms"}))
	id := createOne(t, p, testLabels)
	_, err := p.ConnectInfo(ctx(t), id)
	if !providers.IsTransient(err) || !strings.Contains(err.Error(), "not yet on serial port 4") {
		t.Fatalf("ConnectInfo without an agent answer: %v, want a transient error", err)
	}
}
