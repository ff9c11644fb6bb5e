package provisioner

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/vmexec/winrm/wsmantest"
)

// TestConnectWinRMPinsCertificate: WinRM is only ever spoken over HTTPS
// with the provider's certificate pinned. Without a certificate, with
// another one, or against a plain-HTTP server, Connect fails and the
// password never reaches a WS-Man handler.
func TestConnectWinRMPinsCertificate(t *testing.T) {
	const user, password = "ci", "Pinned-Only-1"
	cfg := wsmantest.Config{Username: user, Password: password, Interpreter: wsmantest.Sh, Dir: t.TempDir()}
	tlsSrv := wsmantest.StartTLS(t, cfg)
	other := wsmantest.StartTLS(t, cfg) // only its certificate is used
	plain := wsmantest.Start(t, cfg)
	ci := func(s *wsmantest.TestServer, cert []byte) providers.ConnectInfo {
		return providers.ConnectInfo{ID: "win-1", Address: s.Host, Port: s.Port, Protocol: providers.ProtocolWinRM,
			OS: "windows", Arch: "amd64", Username: user, Password: password, TLSCert: cert}
	}
	tests := []struct {
		name    string
		srv     *wsmantest.TestServer
		ci      providers.ConnectInfo
		wantErr string
	}{
		{"pinned certificate", tlsSrv, ci(tlsSrv, tlsSrv.CertPEM), ""},
		{"no certificate is refused", tlsSrv, ci(tlsSrv, nil), "no WinRM certificate to pin; mayfly does not trust on first use"},
		{"another certificate is refused", tlsSrv, ci(tlsSrv, other.CertPEM), "not the pinned one"},
		{"plain HTTP is never spoken", plain, ci(plain, tlsSrv.CertPEM), "no connection within"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			before := len(tt.srv.Events())
			exec, err := Connect(ctx, tt.ci, time.Second, nil)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("Connect: %v", err)
				}
				exec.Close()
				if len(tt.srv.Events()) == before {
					t.Errorf("Connect succeeded without a request reaching the server")
				}
				return
			}
			if err == nil {
				exec.Close()
				t.Fatalf("Connect succeeded, want an error containing %q", tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Connect error = %v, want it to contain %q", err, tt.wantErr)
			}
			if n := len(tt.srv.Events()) - before; n != 0 {
				t.Errorf("the refused connection reached the WS-Man handler with %d requests", n)
			}
		})
	}
}
