package gce_test

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/plugins/gce/gcefake"
	"github.com/mayfly-ci/mayfly/vmexec/winrm/wsmantest"
)

// TestWindowsWinRMCert: Windows instances get the startup script that
// publishes the WinRM certificate (before the user's script) and guest
// attributes enabled; ConnectInfo returns the published certificate as
// TLSCert, and an empty one while none (or an unusable one) is published.
func TestWindowsWinRMCert(t *testing.T) {
	_, certPEM, err := wsmantest.SelfSignedCert("win.invalid")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name      string
		published []byte
		want      []byte
	}{
		{"published certificate", certPEM, certPEM},
		{"nothing published", nil, nil},
		{"garbage published", []byte("-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n"), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, url := startFake(t, gcefake.Options{BootDelay: 100 * time.Millisecond, AgentDelay: 100 * time.Millisecond, WindowsCertPEM: tt.published})
			p := newProvider(t, settings(t, url, map[string]any{"os": "windows", "startup_script": "Write-Output user-script"}))
			id := createOne(t, p, testLabels)

			md := f.Instances()[0].Metadata
			script := md["windows-startup-script-ps1"]
			certAt := strings.Index(script, "guest-attributes/mayfly/winrm-cert")
			userAt := strings.Index(script, "Write-Output user-script")
			if certAt < 0 || userAt < certAt || !strings.Contains(script, "-Transport HTTPS") {
				t.Errorf("windows-startup-script-ps1 %q: want mayfly's HTTPS listener and certificate script, then the user's", script)
			}
			if md["enable-guest-attributes"] != "TRUE" {
				t.Errorf("enable-guest-attributes = %q, want TRUE", md["enable-guest-attributes"])
			}

			ci, err := p.ConnectInfo(ctx(t), id)
			if err != nil {
				t.Fatalf("ConnectInfo: %v", err)
			}
			if !bytes.Equal(ci.TLSCert, tt.want) {
				t.Fatalf("TLSCert = %q, want %q", ci.TLSCert, tt.want)
			}
			if err := ci.Validate(); err != nil {
				t.Error(err)
			}
			reads := f.Calls()["instances.getGuestAttributes"]
			if reads != 1 {
				t.Errorf("%d getGuestAttributes calls, want 1", reads)
			}
			again, err := p.ConnectInfo(ctx(t), id)
			if err != nil || !bytes.Equal(again.TLSCert, tt.want) {
				t.Errorf("second ConnectInfo = %q, %v", again.TLSCert, err)
			}
			wantReads := reads + 1 // asked again while not known
			if tt.want != nil {
				wantReads = reads // known: not asked again
			}
			if n := f.Calls()["instances.getGuestAttributes"]; n != wantReads {
				t.Errorf("second ConnectInfo: %d getGuestAttributes calls, want %d", n, wantReads)
			}
		})
	}
}
