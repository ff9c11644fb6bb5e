package aws

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"regexp"
	"strings"
	"time"

	"software.sslmate.com/src/go-pkcs12"
)

// WinRM over HTTPS on Windows instances.
//
// mayfly speaks WinRM only over HTTPS with the instance's certificate
// pinned. EC2 has no reliable channel through which a booted instance
// could hand its own self-signed certificate back to the plugin (the
// console output is late, truncated and written by anything on the
// instance; tags would need an instance role allowed ec2:CreateTags). So
// the plugin makes the certificate and its private key itself, a fresh
// pair per instance, and sends both in the instance's user data as a
// PKCS #12 (PFX) file; the user data's PowerShell imports it and serves
// WinRM on 5986 with it. ConnectInfo reports the certificate it made, and
// after a plugin restart reads it back from the instance's user data
// (DescribeInstanceAttribute, once per instance).
//
// Security trade-off: the private key sits in the user data. Inside the
// instance, every process can read it from the instance metadata service;
// that is the job of the single-use VM, which runs as Administrator there
// anyway and gains nothing by impersonating its own VM. Outside, every
// principal allowed ec2:DescribeInstanceAttribute on the instance can read
// it, and with a network position between the manager and the instance
// could impersonate the instance to the manager (and so learn the password
// and the job). Restrict that permission in accounts that run mayfly; the
// key is unique per instance and dies with it. The PFX password travels
// beside the PFX and protects nothing: it is there because
// Import-PfxCertificate wants one.

// winrmCertName is the common name and only DNS name of the certificates,
// and the Hostname of the WinRM listener (WinRM refuses an HTTPS listener
// whose Hostname is not in its certificate). mayfly pins the exact
// certificate and ignores names, so one fixed name serves every instance,
// whose address is not known before launch anyway.
const winrmCertName = "mayfly-winrm"

// winrmCertValidity is how long the certificates are valid. mayfly does
// not check validity dates (the pin is the identity), Windows does when
// it creates the listener at first boot; a VM lives one job.
const winrmCertValidity = 365 * 24 * time.Hour

// winrmCert is the WinRM certificate of one instance.
type winrmCert struct {
	certPEM    []byte
	pfx        []byte
	password   string
	thumbprint string // SHA-1 of the DER certificate, upper-case hex, as Windows names it
}

// newWinRMCert makes a self-signed RSA 2048 server certificate (RSA
// rather than ECDSA: every Windows Server release serves it over WinRM)
// and packs it with its key in a PFX under a random password. The PFX uses
// 3DES and SHA-1 (pkcs12.LegacyDES), the only scheme Windows Server 2016
// imports; its password is public to whoever reads the file anyway.
func newWinRMCert(now time.Time) (*winrmCert, error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, fmt.Errorf("winrm certificate: generate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("winrm certificate: serial: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: winrmCertName},
		DNSNames:              []string{winrmCertName},
		NotBefore:             now.Add(-time.Hour), // the guest's clock may be behind
		NotAfter:              now.Add(winrmCertValidity),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("winrm certificate: create: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("winrm certificate: parse: %w", err)
	}
	password := rand.Text()
	pfx, err := pkcs12.LegacyDES.Encode(key, cert, nil, password)
	if err != nil {
		return nil, fmt.Errorf("winrm certificate: encode PFX: %w", err)
	}
	return &winrmCert{
		certPEM:    pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pfx:        pfx,
		password:   password,
		thumbprint: thumbprint(der),
	}, nil
}

// thumbprint is Windows' name of a certificate: the SHA-1 of its DER form
// in upper-case hex.
func thumbprint(der []byte) string {
	sum := sha1.Sum(der)
	return strings.ToUpper(hex.EncodeToString(sum[:]))
}

// The PowerShell variables of winrmScript that carry the certificate;
// certFromUserData finds them again.
const (
	psVarPFX        = "$mayflyWinRMPfx"
	psVarPassword   = "$mayflyWinRMPfxPassword"
	psVarThumbprint = "$mayflyWinRMThumbprint"
)

// winrmScript is the PowerShell that makes a Windows instance serve WinRM
// over HTTPS with c: it imports the PFX into Cert:\LocalMachine\My,
// replaces any HTTPS listener with one on port 5986 that uses c (basic
// authentication, which TLS protects; the image's plain-HTTP listener is
// left alone and never used by mayfly) and opens 5986 in the firewall. It
// runs in a script block of its own: its failure is written out and the
// rest of the user data still runs; WinRM then never answers and the boot
// watchdog replaces the instance.
func winrmScript(c *winrmCert) string {
	var b strings.Builder
	b.WriteString("# mayfly: WinRM over HTTPS with the certificate the plugin pinned.\n")
	fmt.Fprintf(&b, "%s = '%s'\n", psVarPFX, base64.StdEncoding.EncodeToString(c.pfx))
	fmt.Fprintf(&b, "%s = '%s'\n", psVarPassword, c.password)
	fmt.Fprintf(&b, "%s = '%s'\n", psVarThumbprint, c.thumbprint)
	b.WriteString(`& {
  $ErrorActionPreference = 'Stop'
  try {
    $pfxFile = Join-Path $env:SystemRoot 'Temp\mayfly-winrm.pfx'
    [IO.File]::WriteAllBytes($pfxFile, [Convert]::FromBase64String(` + psVarPFX + `))
    try {
      $password = ConvertTo-SecureString -String ` + psVarPassword + ` -AsPlainText -Force
      Import-PfxCertificate -FilePath $pfxFile -CertStoreLocation Cert:\LocalMachine\My -Password $password | Out-Null
    } finally {
      Remove-Item -LiteralPath $pfxFile -Force -ErrorAction SilentlyContinue
    }
    Get-ChildItem WSMan:\localhost\Listener | Where-Object { $_.Keys -contains 'Transport=HTTPS' } | Remove-Item -Recurse -Force
    New-WSManInstance -ResourceURI winrm/config/Listener -SelectorSet @{Address = '*'; Transport = 'HTTPS'} -ValueSet @{Hostname = '` + winrmCertName + `'; CertificateThumbprint = ` + psVarThumbprint + `; Port = '5986'} | Out-Null
    Set-Item WSMan:\localhost\Service\Auth\Basic $true
    if (-not (Get-NetFirewallRule -Name mayfly-winrm-https -ErrorAction SilentlyContinue)) {
      New-NetFirewallRule -Name mayfly-winrm-https -DisplayName 'mayfly WinRM HTTPS' -Direction Inbound -Protocol TCP -LocalPort 5986 -Action Allow | Out-Null
    }
  } catch {
    Write-Output "mayfly: WinRM HTTPS setup failed: $_"
  }
}
`)
	return b.String()
}

// maxUserData is the most user data EC2 accepts, before base64.
const maxUserData = 16 << 10

// windowsUserData returns the base64 user data of a Windows instance:
// EC2Launch's <powershell> block with winrmScript first, then whatever
// the user_data setting (extra) holds. When extra has a <powershell>
// block, the script goes at its start and the rest of extra (other
// blocks, <persist>) is kept as it is; otherwise a <powershell> block is
// put before extra.
func windowsUserData(c *winrmCert, extra string) (string, error) {
	script := winrmScript(c)
	var ud string
	if i := strings.Index(strings.ToLower(extra), "<powershell>"); i >= 0 {
		at := i + len("<powershell>")
		ud = extra[:at] + "\n" + script + extra[at:]
	} else {
		ud = "<powershell>\n" + script + "</powershell>\n" + extra
	}
	if len(ud) > maxUserData {
		return "", fmt.Errorf("user_data: %d bytes with mayfly's WinRM certificate script (%d bytes); EC2 takes at most %d", len(ud), len(script), maxUserData)
	}
	return base64.StdEncoding.EncodeToString([]byte(ud)), nil
}

// checkWindowsUserData reports what in the user_data setting of a Windows
// group mayfly cannot combine with its own script.
func checkWindowsUserData(ud string) error {
	lower := strings.ToLower(ud)
	trimmed := strings.TrimSpace(lower)
	switch {
	case strings.HasPrefix(trimmed, "version:"):
		return errors.New("is an EC2Launch v2 YAML task document; mayfly adds its WinRM setup to a <powershell> block, so give the user data as <powershell> (and <script>) blocks")
	case strings.Contains(lower, "<powershell>") != strings.Contains(lower, "</powershell>"):
		return errors.New("has an unclosed <powershell> block")
	}
	return nil
}

var (
	psPFXRE        = regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(psVarPFX) + ` = '([A-Za-z0-9+/=]+)'\r?$`)
	psPasswordRE   = regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(psVarPassword) + ` = '([^'\r\n]*)'\r?$`)
	psThumbprintRE = regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(psVarThumbprint) + ` = '([0-9A-F]{40})'\r?$`)
)

// certFromUserData finds the WinRM certificate winrmScript put in the
// (decoded) user data ud and returns it as PEM. It checks that the PFX
// opens with the password beside it, holds a key for the certificate, and
// that the certificate is the one the listener is told to use.
func certFromUserData(ud []byte) ([]byte, error) {
	pfxM, pwM, tpM := psPFXRE.FindSubmatch(ud), psPasswordRE.FindSubmatch(ud), psThumbprintRE.FindSubmatch(ud)
	if pfxM == nil || pwM == nil || tpM == nil {
		return nil, errors.New("the user data carries no mayfly WinRM certificate (made by another program or an older plugin?)")
	}
	pfx, err := base64.StdEncoding.DecodeString(string(pfxM[1]))
	if err != nil {
		return nil, fmt.Errorf("WinRM certificate in the user data: PFX is not base64: %w", err)
	}
	key, cert, err := pkcs12.Decode(pfx, string(pwM[1]))
	if err != nil {
		return nil, fmt.Errorf("WinRM certificate in the user data: %w", err)
	}
	pub, ok := key.(*rsa.PrivateKey)
	if !ok || !pub.PublicKey.Equal(cert.PublicKey) {
		return nil, errors.New("WinRM certificate in the user data: the PFX key does not belong to its certificate")
	}
	if got := thumbprint(cert.Raw); got != string(tpM[1]) {
		return nil, fmt.Errorf("WinRM certificate in the user data: thumbprint %s, the listener is told %s", got, tpM[1])
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), nil
}
