package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/plugins/gce/gcefake"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/provisioner"
	"github.com/mayfly-ci/mayfly/vmexec/winrm/wsmantest"
)

// winrmLoader is vmexec/winrm's loader body (its loaderBody), which reads
// the program from stdin; the test server runs it as "sh -s" of the
// translated program. It must stay the same text as vmexec/winrm's.
const winrmLoader = `. ([ScriptBlock]::Create([Text.Encoding]::UTF8.GetString([Convert]::FromBase64String(((@($input) -join '') -replace '\s', '')))))`

// TestGCEWindowsPasswordPinnedWinRMAndFailedStageTrace proves, with
// `mayfly run` and the real mayfly-plugin-gce process against the GCE
// fake, the parts of a Windows fleet that run without Windows: the
// password flow (the plugin's windows-keys metadata entry, the fake guest
// agent's RSA-OAEP answer on serial port 4, the plugin's decryption), the
// WinRM certificate (published in guest attribute mayfly/winrm-cert as
// mayfly's startup script would, read by the plugin, pinned by the
// manager: every connection is TLS, another certificate or none is
// refused), the WinRM transport to the in-repo WS-Management server
// (wsmantest.StartTLS, one loopback address per instance, port 5986), and
// a job's first stage whose output and failure reach GitLab.
//
// What it does not prove: that a PowerShell job succeeds. No pwsh runs
// here; the test server runs PowerShell command lines with sh, so the
// instance-ready command (sh-compatible text) runs, and the job's
// generated PowerShell stage ("& { ... }") fails with sh's syntax error,
// which the test expects.
func TestGCEWindowsPasswordPinnedWinRMAndFailedStageTrace(t *testing.T) {
	t.Parallel() // waits more than it computes: overlaps the other waiting end-to-end tests
	const user, password = "mayfly", "E2e-Wind0ws-Pass!"
	winrm := wsmantest.StartTLS(t, wsmantest.Config{
		Username: user, Password: password, Interpreter: wsmantest.Sh, Dir: t.TempDir(),
		Shims: map[string]wsmantest.Shim{winrmLoader: {StdinProgram: true}},
	})
	vm := listenLoopback(t, 5986)
	vmIP, _, _ := net.SplitHostPort(vm.Addr().String())
	conns := relayRecordingTLS(t, vm, winrm.Addr())

	fake := gcefake.New(gcefake.Options{
		Project: "e2e-project", BootDelay: 300 * time.Millisecond, AgentDelay: 300 * time.Millisecond,
		Address: vmIP, WindowsPassword: password, WindowsCertPEM: winrm.CertPEM,
	})
	api := httptest.NewServer(fake)
	t.Cleanup(api.Close)

	dir := t.TempDir()
	pluginDir := filepath.Join(dir, "plugins")
	buildPlugin(t, pluginDir, "github.com/mayfly-ci/mayfly/plugins/gce/cmd/mayfly-plugin-gce")
	srv, url := startCoordinator(t, cloudToken, windowsPipeline)
	cfg := fmt.Sprintf(`concurrent = 2
check_interval = 1
log_level = "info"

[[runners]]
  name = "gce-windows"
  url = %q
  token = %q
  executor = "instance"
  shell = "powershell"
  builds_dir = 'C:\builds'
  [runners.autoscaler]
    plugin = "gce"
    max_use_count = 1
    max_instances = 3
    delete_instances_on_shutdown = true
    instance_ready_command = "echo mayfly-ready"
    [runners.autoscaler.plugin_config]
      project = "e2e-project"
      zones = ["us-east1-b", "us-east1-c"]
      machine_type = "n1-standard-2"
      os = "windows"
      username = %q
      endpoint = %q
      credentials_file = %q
      poll_interval = "100ms"
      password_timeout = "10s"
      rate_limit = { rate = 50.0, burst = 20 }
    [runners.autoscaler.connector_config]
      os = "windows"
      protocol = "winrm"
      timeout = "30s"
    [[runners.autoscaler.policy]]
      idle_count = 1
      idle_time = "1m"
`, url, cloudToken, user, api.URL, gceCredentials(t, api.URL, "e2e-project"))
	runUntilDone(t, srv, dir, pluginDir, cfg, 45*time.Second)

	jobs := srv.Jobs()
	checkWindowsTransport(t, jobs, winrm.Commands())
	insts := fake.Instances()
	if len(insts) != 0 {
		for _, in := range insts {
			t.Errorf("instance %s/%s is %s after shutdown, want deleted", in.Zone, in.Name, in.Status)
		}
	}
	created := 0
	for _, r := range fake.Requests() {
		if r.Method == "instances.insert" && r.Status == http.StatusOK {
			created++
		}
	}
	if created < len(jobs) {
		t.Errorf("%d instances inserted for %d jobs", created, len(jobs))
	}
	// WinRM ran over TLS only: every connection to port 5986 began with a
	// TLS handshake record.
	tlsConns, plainConns := conns()
	if tlsConns == 0 || plainConns != 0 {
		t.Errorf("connections to the WinRM port: %d TLS, %d not TLS; want only TLS", tlsConns, plainConns)
	}
	if fake.Calls()["instances.getGuestAttributes"] == 0 {
		t.Errorf("the WinRM certificate was never read from guest attributes")
	}
	// The pin is enforced on the same path: another certificate, or none,
	// is refused before any WS-Man request.
	_, otherPEM, err := wsmantest.SelfSignedCert(wsmantest.CertName)
	if err != nil {
		t.Fatal(err)
	}
	before := len(winrm.Events())
	for _, cert := range [][]byte{otherPEM, nil} {
		ci := providers.ConnectInfo{ID: "pin-check", Address: vmIP, Port: 5986, Protocol: providers.ProtocolWinRM,
			OS: "windows", Arch: "amd64", Username: user, Password: password, TLSCert: cert}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		exec, err := provisioner.Connect(ctx, ci, 2*time.Second, nil)
		cancel()
		if err == nil {
			exec.Close()
			t.Errorf("Connect with certificate %q succeeded, want it refused", cert)
		}
	}
	if n := len(winrm.Events()) - before; n != 0 {
		t.Errorf("refused connections reached the WinRM server with %d requests", n)
	}
	calls, perJob := callsPerJob(fake.Calls(), len(jobs))
	t.Logf("GCE Windows: %d jobs, %d instances inserted, API calls %s: %.1f calls per job", len(jobs), created, calls, perJob)
}

// relayRecordingTLS relays every connection accepted on ln to target until
// the test ends and returns a func counting the connections whose first
// byte was a TLS handshake record (0x16) and the others.
func relayRecordingTLS(t *testing.T, ln net.Listener, target string) func() (tlsConns, other int) {
	var mu sync.Mutex
	var conns []net.Conn
	var nTLS, nOther int
	var wg sync.WaitGroup
	track := func(c ...net.Conn) {
		mu.Lock()
		conns = append(conns, c...)
		mu.Unlock()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return // ln closed at cleanup
			}
			up, err := net.DialTimeout("tcp", target, 5*time.Second)
			if err != nil {
				c.Close()
				continue
			}
			track(c, up)
			wg.Add(2)
			go func() {
				defer wg.Done()
				first := make([]byte, 1)
				if _, err := io.ReadFull(c, first); err == nil {
					mu.Lock()
					if first[0] == 0x16 {
						nTLS++
					} else {
						nOther++
					}
					mu.Unlock()
					if _, err := up.Write(first); err == nil {
						_, _ = io.Copy(up, c)
					}
				}
				closeWrite(up)
			}()
			go func() { defer wg.Done(); _, _ = io.Copy(c, up); closeWrite(c) }()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return func() (int, int) {
		mu.Lock()
		defer mu.Unlock()
		return nTLS, nOther
	}
}
