package aws_test

import (
	"bytes"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	awssdk "github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"software.sslmate.com/src/go-pkcs12"

	"github.com/mayfly-ci/mayfly/plugins/aws"
	"github.com/mayfly-ci/mayfly/plugins/aws/awsfake"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/conformance"
)

var winLabels = map[string]string{providers.LabelManager: "mgr-1", providers.LabelRunner: "windows"}

// userDataCert is what a Windows instance's user data hands it: the
// certificate and key from the PFX, and the thumbprint the listener is
// told to use.
type userDataCert struct {
	cert       *x509.Certificate
	key        *rsa.PrivateKey
	thumbprint string
}

var (
	pfxLine        = regexp.MustCompile(`(?m)^\$mayflyWinRMPfx = '([A-Za-z0-9+/=]+)'$`)
	passwordLine   = regexp.MustCompile(`(?m)^\$mayflyWinRMPfxPassword = '([^']+)'$`)
	thumbprintLine = regexp.MustCompile(`(?m)^\$mayflyWinRMThumbprint = '([0-9A-F]{40})'$`)
)

// parseUserData checks the structure of a Windows instance's user data
// and opens the PFX in it with the password beside it.
func parseUserData(t *testing.T, ud []byte) userDataCert {
	t.Helper()
	s := string(ud)
	block, _, ok := strings.Cut(s[strings.Index(s, "<powershell>")+1:], "</powershell>")
	if !strings.HasPrefix(s, "<powershell>\n") || !ok {
		t.Fatalf("user data is not an EC2Launch <powershell> block:\n%s", s)
	}
	// The script, in order: PFX to the machine store, the HTTPS listener
	// on 5986 with the thumbprint and mayfly's host name, basic
	// authentication, the firewall.
	steps := []string{
		`[IO.File]::WriteAllBytes($pfxFile, [Convert]::FromBase64String($mayflyWinRMPfx))`,
		`ConvertTo-SecureString -String $mayflyWinRMPfxPassword -AsPlainText -Force`,
		`Import-PfxCertificate -FilePath $pfxFile -CertStoreLocation Cert:\LocalMachine\My -Password $password`,
		`New-WSManInstance -ResourceURI winrm/config/Listener -SelectorSet @{Address = '*'; Transport = 'HTTPS'} -ValueSet @{Hostname = 'mayfly-winrm'; CertificateThumbprint = $mayflyWinRMThumbprint; Port = '5986'}`,
		`Set-Item WSMan:\localhost\Service\Auth\Basic $true`,
		`New-NetFirewallRule -Name mayfly-winrm-https -DisplayName 'mayfly WinRM HTTPS' -Direction Inbound -Protocol TCP -LocalPort 5986 -Action Allow`,
	}
	at := 0
	for _, step := range steps {
		i := strings.Index(block[at:], step)
		if i < 0 {
			t.Fatalf("user data lacks, after byte %d of its <powershell> block, %q:\n%s", at, step, block)
		}
		at += i + len(step)
	}
	pfxM, pwM, tpM := pfxLine.FindStringSubmatch(block), passwordLine.FindStringSubmatch(block), thumbprintLine.FindStringSubmatch(block)
	if pfxM == nil || pwM == nil || tpM == nil {
		t.Fatalf("user data lacks the PFX, its password or the thumbprint:\n%s", block)
	}
	pfx, err := base64.StdEncoding.DecodeString(pfxM[1])
	if err != nil {
		t.Fatal(err)
	}
	key, cert, err := pkcs12.Decode(pfx, pwM[1])
	if err != nil {
		t.Fatalf("open the PFX of the user data: %v", err)
	}
	rk, ok := key.(*rsa.PrivateKey)
	if !ok || !rk.PublicKey.Equal(cert.PublicKey) {
		t.Fatalf("PFX key %T does not belong to its certificate", key)
	}
	sum := sha1.Sum(cert.Raw)
	if want := strings.ToUpper(hex.EncodeToString(sum[:])); tpM[1] != want {
		t.Errorf("listener thumbprint %s, the PFX certificate's is %s", tpM[1], want)
	}
	return userDataCert{cert: cert, key: rk, thumbprint: tpM[1]}
}

func certOfPEM(t *testing.T, b []byte) []byte {
	t.Helper()
	block, rest := pem.Decode(b)
	if block == nil || block.Type != "CERTIFICATE" || len(bytes.TrimSpace(rest)) != 0 {
		t.Fatalf("TLSCert %q is not one PEM certificate", b)
	}
	return block.Bytes
}

func windowsEnv(t *testing.T, opts awsfake.Options) (*env, json.RawMessage) {
	t.Helper()
	e := newEnv(t, opts)
	keyFile := filepath.Join(t.TempDir(), "win.pem")
	writeRSAKey(t, keyFile)
	return e, e.with("os", "windows", "ami", winAMI, "instance_type", "m5.large", "windows_key_file", keyFile)
}

// TestWinRMCertPerInstance checks that every Windows instance gets a
// certificate of its own in its user data, ready for the WinRM HTTPS
// listener, and that ConnectInfo pins exactly that certificate.
func TestWinRMCertPerInstance(t *testing.T) {
	e, settings := windowsEnv(t, awsfake.Options{})
	p := start(t, settings)
	ids, err := p.Create(ctxT(t), 3, winLabels)
	if err != nil {
		t.Fatal(err)
	}
	waitRunning(t, p, ids)
	seen := map[string]string{}
	for _, id := range ids {
		in, _ := e.srv.Instance(id)
		got := parseUserData(t, in.UserData)
		c := got.cert
		if c.Subject.CommonName != "mayfly-winrm" || len(c.ExtKeyUsage) != 1 || c.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth {
			t.Errorf("%s: certificate %s with extended key usage %v, want CN mayfly-winrm for server authentication", id, c.Subject, c.ExtKeyUsage)
		}
		if err := c.CheckSignature(c.SignatureAlgorithm, c.RawTBSCertificate, c.Signature); err != nil || c.IsCA {
			t.Errorf("%s: certificate is not a self-signed end-entity certificate (CA %t): %v", id, c.IsCA, err)
		}
		if now := time.Now(); now.Before(c.NotBefore) || now.After(c.NotAfter) {
			t.Errorf("%s: certificate valid %s to %s, not now", id, c.NotBefore, c.NotAfter)
		}
		if other, dup := seen[got.thumbprint]; dup {
			t.Errorf("instances %s and %s share certificate %s", other, id, got.thumbprint)
		}
		seen[got.thumbprint] = id
		ci, err := p.ConnectInfo(ctxT(t), id)
		if err != nil {
			t.Fatalf("ConnectInfo(%s): %v", id, err)
		}
		if err := ci.Validate(); err != nil {
			t.Error(err)
		}
		if !bytes.Equal(certOfPEM(t, ci.TLSCert), c.Raw) {
			t.Errorf("%s: ConnectInfo pins another certificate than the user data's", id)
		}
		if ci.Password != e.srv.Password(id) || ci.Port != 5986 || ci.Protocol != providers.ProtocolWinRM {
			t.Errorf("%s: ConnectInfo %+v", id, ci)
		}
	}
	if n := e.srv.Calls()["DescribeInstanceAttribute"]; n != 0 {
		t.Errorf("DescribeInstanceAttribute calls = %d, want 0: the plugin knows the certificates it made", n)
	}
}

// TestWinRMCertAfterRestart gives a new provider value (a restarted plugin
// process, without memory) the instances of the first: ConnectInfo reads
// each certificate back from the user data with one
// DescribeInstanceAttribute, then serves it from memory.
func TestWinRMCertAfterRestart(t *testing.T) {
	e, settings := windowsEnv(t, awsfake.Options{})
	p1 := start(t, settings)
	ids, err := p1.Create(ctxT(t), 2, winLabels)
	if err != nil {
		t.Fatal(err)
	}
	waitRunning(t, p1, ids)
	before := map[string][]byte{}
	for _, id := range ids {
		ci, err := p1.ConnectInfo(ctxT(t), id)
		if err != nil {
			t.Fatal(err)
		}
		before[id] = ci.TLSCert
	}

	p2 := start(t, settings)
	e.srv.ResetCalls()
	for _, id := range ids {
		for range 3 {
			ci, err := p2.ConnectInfo(ctxT(t), id)
			if err != nil {
				t.Fatalf("ConnectInfo(%s) after restart: %v", id, err)
			}
			if !bytes.Equal(ci.TLSCert, before[id]) {
				t.Errorf("%s: certificate after restart differs from the one before", id)
			}
		}
	}
	calls := e.srv.Calls()
	if calls["DescribeInstanceAttribute"] != len(ids) {
		t.Errorf("DescribeInstanceAttribute calls = %d for %d instances asked 3 times each, want one per instance", calls["DescribeInstanceAttribute"], len(ids))
	}
	for _, r := range e.srv.Requests() {
		if r.Get("Action") == "DescribeInstanceAttribute" && r.Get("Attribute") != "userData" {
			t.Errorf("DescribeInstanceAttribute asked for %q", r.Get("Attribute"))
		}
	}
	if pc := p2.APICalls(); pc["DescribeInstanceAttribute"] != len(ids) {
		t.Errorf("provider counts %d DescribeInstanceAttribute calls, the endpoint %d", pc["DescribeInstanceAttribute"], len(ids))
	}

	// An instance of the group whose user data holds no mayfly certificate
	// (made by hand, or by an older plugin) cannot be trusted: permanent.
	c := ec2.New(ec2.Options{
		Region:       "us-east-1",
		Credentials:  credentials.NewStaticCredentialsProvider(akid, secret, ""),
		BaseEndpoint: awssdk.String(e.url),
	})
	tags := []types.Tag{{Key: awssdk.String(aws.TagGroup), Value: awssdk.String("mayfly")}, {Key: awssdk.String(providers.LabelManager), Value: awssdk.String("mgr-1")}}
	out, err := c.RunInstances(ctxT(t), &ec2.RunInstancesInput{
		ImageId: awssdk.String(winAMI), MinCount: awssdk.Int32(1), MaxCount: awssdk.Int32(1), KeyName: awssdk.String(e.srv.KeyPairs()[0]),
		UserData:          awssdk.String(base64.StdEncoding.EncodeToString([]byte("<powershell>Enable-PSRemoting</powershell>"))),
		TagSpecifications: []types.TagSpecification{{ResourceType: types.ResourceTypeInstance, Tags: tags}},
	})
	if err != nil {
		t.Fatal(err)
	}
	foreign := awssdk.ToString(out.Instances[0].InstanceId)
	waitRunning(t, p2, []string{foreign})
	if _, err := p2.ConnectInfo(ctxT(t), foreign); providers.KindOf(err) != providers.KindPermanent || !strings.Contains(err.Error(), "no mayfly WinRM certificate") {
		t.Errorf("ConnectInfo of an instance without mayfly's certificate = %v, want a permanent error", err)
	}
}

// TestWinRMUserDataKeepsUserScript checks that the user_data setting
// survives beside mayfly's script: in the same <powershell> block after
// it, other blocks untouched; without a <powershell> block one is added.
func TestWinRMUserDataKeepsUserScript(t *testing.T) {
	for _, tc := range []struct {
		name, userData string
		before, after  string // around mayfly's script
	}{
		{"none", "", "<powershell>\n", "</powershell>\n"},
		{"powershell", "<powershell>\nEnable-PSRemoting\n</powershell>\n<persist>true</persist>", "<powershell>\n", "\nEnable-PSRemoting\n</powershell>\n<persist>true</persist>"},
		{"script only", "<script>echo batch</script>", "<powershell>\n", "</powershell>\n<script>echo batch</script>"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, awsfake.Options{})
			p := start(t, e.with("os", "windows", "ami", winAMI, "user_data", tc.userData))
			ids, err := p.Create(ctxT(t), 1, winLabels)
			if err != nil {
				t.Fatal(err)
			}
			in, _ := e.srv.Instance(ids[0])
			ud := string(in.UserData)
			parseUserData(t, in.UserData)
			start := strings.Index(ud, "# mayfly: WinRM")
			end := strings.LastIndex(ud, "\n}\n") + len("\n}\n")
			if start < 0 || end < start || ud[:start] != tc.before || ud[end:] != tc.after {
				t.Errorf("user data around mayfly's script = %q ... %q, want %q ... %q", ud[:max(start, 0)], ud[max(end, 0):], tc.before, tc.after)
			}
		})
	}
}

func TestConformanceWindowsInProcess(t *testing.T) {
	opts := conformanceOptions(t)
	opts.Settings = func(t *testing.T) json.RawMessage {
		_, settings := windowsEnv(t, awsfake.Options{PendingDuration: 200 * time.Millisecond, ShuttingDownDuration: 200 * time.Millisecond})
		return settings
	}
	opts.Faults, opts.NoFaults = nil, "TestConformanceInProcess covers the typed errors; they do not depend on the OS"
	conformance.Run(t, func(t *testing.T) providers.Provider {
		return aws.New(aws.Options{})
	}, opts)
}
