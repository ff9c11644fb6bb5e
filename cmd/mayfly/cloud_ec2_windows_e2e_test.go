package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http/httptest"
	"path/filepath"
	"regexp"
	"sync"
	"testing"
	"time"

	"software.sslmate.com/src/go-pkcs12"

	"github.com/mayfly-ci/mayfly/plugins/aws/awsfake"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/provisioner"
	"github.com/mayfly-ci/mayfly/vmexec/winrm/wsmantest"
)

const e2eWinAMI = "ami-0e2e0000000000001"

// ec2WinVM is one EC2 Windows instance as the test plays it: its own
// loopback address with port 5986, relayed to an HTTPS endpoint of the
// shared WinRM test server that serves the certificate from the
// instance's user data.
type ec2WinVM struct {
	ln    net.Listener
	cert  *x509.Certificate
	conns func() (tlsConns, other int)
}

// TestEC2WindowsPasswordPinnedWinRMAndFailedStageTrace proves, with
// `mayfly run` and the real mayfly-plugin-aws process against the EC2
// fake, the parts of a Windows fleet that run without Windows: a WinRM
// certificate per instance, made by the plugin and sent with its key in
// the instance's user data (the test plays EC2Launch: it opens the PFX
// with the password beside it and serves the in-repo WS-Management server
// over HTTPS with that certificate, on a loopback address of the
// instance's own, port 5986), the pin (every connection TLS; another
// instance's certificate, a stranger's or none refused), EC2's password
// path (the plugin's imported key pair, GetPasswordData, the plugin's
// decryption), and a job's first stage whose output and failure reach
// GitLab.
//
// As in TestGCEWindowsPasswordPinnedWinRMAndFailedStageTrace, no
// PowerShell runs here: the instance-ready command runs under sh, and each
// job fails in its first PowerShell stage with sh's syntax error, which
// the test expects.
func TestEC2WindowsPasswordPinnedWinRMAndFailedStageTrace(t *testing.T) {
	const user, password = "Administrator", "E2e-Ec2-Wind0ws!"
	winrm := wsmantest.StartTLS(t, wsmantest.Config{
		Username: user, Password: password, Interpreter: wsmantest.Sh, Dir: t.TempDir(),
		Shims: map[string]wsmantest.Shim{winrmLoader: {StdinProgram: true}},
	})

	var (
		mu  sync.Mutex
		vms = map[string]*ec2WinVM{} // by instance id
	)
	// AddressFor runs under the fake's lock as RunInstances launches: each
	// instance gets a loopback address of its own, since each serves its
	// own certificate on the same port.
	addressFor := func(in awsfake.Instance) string {
		ln, err := ec2WinListen(5986)
		if err != nil {
			t.Errorf("instance %s: %v", in.ID, err)
			return ""
		}
		t.Cleanup(func() { ln.Close() })
		mu.Lock()
		vms[in.ID] = &ec2WinVM{ln: ln}
		mu.Unlock()
		ip, _, _ := net.SplitHostPort(ln.Addr().String())
		return ip
	}
	// OnLaunch starts the boot: EC2Launch running the user data's
	// <powershell> block, which imports the PFX and serves WinRM over
	// HTTPS with it. It runs after RunInstances answered, as on EC2 (the
	// manager asks for the password, then connects, well after that).
	var booting sync.WaitGroup
	t.Cleanup(booting.Wait)
	boot := func(in awsfake.Instance) {
		mu.Lock()
		vm := vms[in.ID]
		mu.Unlock()
		if vm == nil {
			return // AddressFor failed and said so
		}
		booting.Go(func() { ec2WinBoot(t, in, vm, winrm, &mu) })
	}
	fake := awsfake.New(awsfake.Options{
		AccessKeyID: e2eKeyID, SecretAccessKey: e2eSecret,
		Images:          map[string]string{e2eWinAMI: "windows"},
		PendingDuration: 200 * time.Millisecond, PasswordDelay: 300 * time.Millisecond,
		WindowsPassword: password, AddressFor: addressFor, OnLaunch: boot,
	})
	api := httptest.NewServer(fake)
	t.Cleanup(api.Close)

	dir := t.TempDir()
	pluginDir := filepath.Join(dir, "plugins")
	buildPlugin(t, pluginDir, "github.com/mayfly-ci/mayfly/plugins/aws/cmd/mayfly-plugin-aws")
	srv, url := startCoordinator(t, cloudToken, windowsPipeline)
	cfg := fmt.Sprintf(`concurrent = 2
check_interval = 1
log_level = "info"

[[runners]]
  name = "ec2-windows"
  url = %q
  token = %q
  executor = "instance"
  shell = "powershell"
  builds_dir = 'C:\builds'
  [runners.autoscaler]
    plugin = "aws"
    max_use_count = 1
    max_instances = 3
    delete_instances_on_shutdown = true
    instance_ready_command = "echo mayfly-ready"
    [runners.autoscaler.plugin_config]
      region = "us-east-1"
      endpoint = %q
      access_key_id = %q
      secret_access_key = %q
      ami = %q
      instance_type = "m5.large"
      os = "windows"
      name_prefix = "e2e-win"
      user_data = '''
<powershell>
Write-Output "user-data-setting: runs after the WinRM setup"
</powershell>
'''
    [runners.autoscaler.connector_config]
      os = "windows"
      protocol = "winrm"
      timeout = "30s"
    [[runners.autoscaler.policy]]
      idle_count = 1
      idle_time = "1m"
`, url, cloudToken, api.URL, e2eKeyID, e2eSecret, e2eWinAMI)
	runUntilDone(t, srv, dir, pluginDir, cfg, 45*time.Second)
	booting.Wait()

	jobs := srv.Jobs()
	checkWindowsTransport(t, jobs, winrm.Commands())

	// Nothing leaked, each job had an instance of its own.
	insts := fake.Instances()
	for _, in := range insts {
		if in.State != "terminated" && in.State != "shutting-down" {
			t.Errorf("instance %s is %s after shutdown", in.ID, in.State)
		}
		if in.Platform != "windows" || in.KeyName == "" {
			t.Errorf("instance %s: platform %q key pair %q, want a Windows instance with the plugin's key pair", in.ID, in.Platform, in.KeyName)
		}
	}
	if len(insts) < len(jobs) {
		t.Errorf("the plugin launched %d instances for %d jobs", len(insts), len(jobs))
	}

	// WinRM ran over TLS only, each instance with a certificate of its
	// own. The relay of an instance leads only to an endpoint serving the
	// certificate from that instance's user data, so a job that ran there
	// means the manager accepted that certificate; below, the same path
	// refuses any other.
	mu.Lock()
	defer mu.Unlock()
	var tlsConns, plainConns, served int
	thumbs := map[string]bool{}
	var pinVM *ec2WinVM
	for id, vm := range vms {
		if vm.cert == nil {
			t.Errorf("instance %s never served WinRM", id)
			continue
		}
		thumbs[string(vm.cert.Raw)] = true
		n, other := vm.conns()
		tlsConns, plainConns = tlsConns+n, plainConns+other
		if n > 0 {
			served++
			pinVM = vm
		}
	}
	if len(thumbs) != len(vms) {
		t.Errorf("%d instances served %d distinct certificates, want one each", len(vms), len(thumbs))
	}
	if tlsConns == 0 || plainConns != 0 || served < len(jobs) {
		t.Errorf("connections to the WinRM port: %d TLS, %d not TLS, to %d instances; want only TLS, to at least %d instances", tlsConns, plainConns, served, len(jobs))
	}
	if pinVM == nil {
		t.Fatal("no instance was connected to")
	}

	// The pin on the manager's path (provisioner.Connect with what
	// ConnectInfo reports): another instance's certificate, a stranger's,
	// or none is refused before any WS-Man request; the instance's own
	// certificate is accepted.
	vmIP, _, _ := net.SplitHostPort(pinVM.ln.Addr().String())
	own := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: pinVM.cert.Raw})
	var others [][]byte
	for _, vm := range vms {
		if vm != pinVM && vm.cert != nil {
			others = append(others, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: vm.cert.Raw}))
			break
		}
	}
	others = append(others, winrm.CertPEM, nil)
	connect := func(cert []byte) error {
		ci := providers.ConnectInfo{ID: "pin-check", Address: vmIP, Port: 5986, Protocol: providers.ProtocolWinRM,
			OS: "windows", Arch: "amd64", Username: user, Password: password, TLSCert: cert}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		exec, err := provisioner.Connect(ctx, ci, 2*time.Second, nil)
		if err == nil {
			exec.Close()
		}
		return err
	}
	before := len(winrm.Events())
	for _, cert := range others {
		if err := connect(cert); err == nil {
			t.Errorf("Connect with certificate %q succeeded, want it refused", cert)
		}
	}
	if n := len(winrm.Events()) - before; n != 0 {
		t.Errorf("refused connections reached the WinRM server with %d requests", n)
	}
	if err := connect(own); err != nil {
		t.Errorf("Connect with the instance's own certificate: %v", err)
	}

	calls := fake.Calls()
	if calls["DescribeInstanceAttribute"] != 0 {
		t.Errorf("DescribeInstanceAttribute calls = %d; the plugin that made the certificates needs none", calls["DescribeInstanceAttribute"])
	}
	summary, perJob := callsPerJob(calls, len(jobs))
	t.Logf("EC2 Windows: %d jobs, %d instances launched, %d distinct WinRM certificates, API calls %s: %.1f calls per job",
		len(jobs), len(insts), len(thumbs), summary, perJob)
}

// ec2WinBoot plays the boot of instance in: its user data keeps the
// user_data setting after mayfly's part, and its PFX serves WinRM over
// HTTPS on the instance's address, relayed to winrm.
func ec2WinBoot(t *testing.T, in awsfake.Instance, vm *ec2WinVM, winrm *wsmantest.TestServer, mu *sync.Mutex) {
	if i, j := bytes.Index(in.UserData, []byte("$mayflyWinRMPfx")), bytes.Index(in.UserData, []byte("user-data-setting: runs")); i < 0 || j < i {
		t.Errorf("instance %s: user data lacks mayfly's WinRM script or, after it, the user_data setting:\n%s", in.ID, in.UserData)
	}
	cert, err := ec2WinCertFromUserData(in.UserData)
	if err != nil {
		t.Errorf("instance %s: %v\n%s", in.ID, err, in.UserData)
		return
	}
	endpoint, err := winrm.ServeTLS(cert)
	if err != nil {
		t.Errorf("instance %s: %v", in.ID, err)
		return
	}
	conns := relayRecordingTLS(t, vm.ln, endpoint)
	mu.Lock()
	vm.cert, vm.conns = cert.Leaf, conns
	mu.Unlock()
}

// ec2WinListen listens on port of a random address in 127.0.0.0/8, like
// listenLoopback, but returns its error: it runs in the fake's handler.
func ec2WinListen(port int) (net.Listener, error) {
	var lastErr error
	for range 20 {
		ip := fmt.Sprintf("127.%d.%d.%d", 10+rand.IntN(240), rand.IntN(256), 1+rand.IntN(254))
		ln, err := net.Listen("tcp", net.JoinHostPort(ip, fmt.Sprint(port)))
		if err == nil {
			return ln, nil
		}
		lastErr = err
	}
	return nil, fmt.Errorf("no free loopback address for port %d: %w", port, lastErr)
}

var (
	ec2WinPFXRE      = regexp.MustCompile(`(?m)^\$mayflyWinRMPfx = '([A-Za-z0-9+/=]+)'\r?$`)
	ec2WinPasswordRE = regexp.MustCompile(`(?m)^\$mayflyWinRMPfxPassword = '([^'\r\n]+)'\r?$`)
)

// ec2WinCertFromUserData does what the user data's PowerShell does with
// its PFX: open it with the password beside it, for a TLS server.
func ec2WinCertFromUserData(ud []byte) (tls.Certificate, error) {
	if !bytes.HasPrefix(ud, []byte("<powershell>")) || !bytes.Contains(ud, []byte("New-WSManInstance -ResourceURI winrm/config/Listener")) {
		return tls.Certificate{}, fmt.Errorf("user data is not a <powershell> block making a WinRM listener")
	}
	pfxM, pwM := ec2WinPFXRE.FindSubmatch(ud), ec2WinPasswordRE.FindSubmatch(ud)
	if pfxM == nil || pwM == nil {
		return tls.Certificate{}, fmt.Errorf("user data carries no PFX and password")
	}
	pfx, err := base64.StdEncoding.DecodeString(string(pfxM[1]))
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("PFX: %w", err)
	}
	key, cert, err := pkcs12.Decode(pfx, string(pwM[1]))
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("open the PFX: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}, nil
}
