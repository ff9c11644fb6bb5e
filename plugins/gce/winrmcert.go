package gce

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"

	"cloud.google.com/go/compute/apiv1/computepb"
	"google.golang.org/protobuf/proto"

	"github.com/mayfly-ci/mayfly/providers"
)

// winrmCertKey is the guest attribute (namespace/key) where the Windows
// startup script publishes the PEM certificate of the WinRM HTTPS listener.
const winrmCertKey = "mayfly/winrm-cert"

// winrmCertScript is the PowerShell that Windows instances run first at
// every boot (metadata windows-startup-script-ps1, before the user's
// startup_script). It makes a self-signed certificate once, serves WinRM
// over HTTPS on 5986 with it (basic authentication, which TLS protects;
// the plain-HTTP listener is left to the image and never used by mayfly),
// opens the firewall port and writes the certificate as PEM to the guest
// attribute winrmCertKey through the metadata server, where ConnectInfo
// reads it with instances.getGuestAttributes. The certificate is pinned by
// the manager: whoever cannot write this VM's guest attributes cannot
// impersonate it. Guest attributes need metadata enable-guest-attributes
// = TRUE, which Windows instances get too.
//
// It cannot run in the tests (no Windows); gcefake plays its effect:
// instances whose startup script contains the attribute path publish the
// certificate the test gives it.
const winrmCertScript = `# mayfly: WinRM over HTTPS with a pinned self-signed certificate.
$ErrorActionPreference = 'Stop'
$cert = Get-ChildItem Cert:\LocalMachine\My | Where-Object { $_.FriendlyName -eq 'mayfly-winrm' } | Select-Object -First 1
if (-not $cert) {
  $cert = New-SelfSignedCertificate -DnsName $env:COMPUTERNAME -CertStoreLocation Cert:\LocalMachine\My -FriendlyName 'mayfly-winrm' -KeyAlgorithm RSA -KeyLength 2048 -NotAfter (Get-Date).AddYears(5)
}
Get-ChildItem WSMan:\localhost\Listener | Where-Object { $_.Keys -contains 'Transport=HTTPS' } | Remove-Item -Recurse -Force
New-Item -Path WSMan:\localhost\Listener -Transport HTTPS -Address * -CertificateThumbPrint $cert.Thumbprint -Force | Out-Null
Set-Item WSMan:\localhost\Service\Auth\Basic $true
if (-not (Get-NetFirewallRule -Name mayfly-winrm-https -ErrorAction SilentlyContinue)) {
  New-NetFirewallRule -Name mayfly-winrm-https -DisplayName 'mayfly WinRM HTTPS' -Direction Inbound -Protocol TCP -LocalPort 5986 -Action Allow | Out-Null
}
$nl = [string][char]10
$pem = '-----BEGIN CERTIFICATE-----' + $nl + [Convert]::ToBase64String($cert.RawData, 'InsertLineBreaks') + $nl + '-----END CERTIFICATE-----' + $nl
$uri = 'http://metadata.google.internal/computeMetadata/v1/instance/guest-attributes/` + winrmCertKey + `'
Invoke-RestMethod -Method Put -Uri $uri -Headers @{ 'Metadata-Flavor' = 'Google' } -ContentType 'text/plain' -Body $pem
$ErrorActionPreference = 'Continue'
`

// windowsStartupScript is the windows-startup-script-ps1 value: the WinRM
// certificate script, then the user's script, if any.
func windowsStartupScript(user string) string {
	if user == "" {
		return winrmCertScript
	}
	return winrmCertScript + "\n" + user
}

// winrmCert reads the WinRM certificate the startup script published; nil
// when it has published none yet (or something unusable, logged).
func (p *Provider) winrmCert(ctx context.Context, s Settings, zone, name string) ([]byte, error) {
	_, ic, _, err := p.client()
	if err != nil {
		return nil, err
	}
	cctx, cancel := context.WithTimeout(ctx, apiCallTimeout)
	defer cancel()
	ga, err := ic.GetGuestAttributes(cctx, &computepb.GetGuestAttributesInstanceRequest{
		Project: s.Project, Zone: zone, Instance: name, VariableKey: proto.String(winrmCertKey),
	}, noRetry)
	if err != nil {
		err = p.throttle(classify(err, zone))
		if providers.IsNotFound(err) {
			return nil, nil // not published (yet)
		}
		return nil, fmt.Errorf("read winrm certificate: %w", err)
	}
	cert, err := parseCertPEM([]byte(ga.GetVariableValue()))
	if err != nil {
		p.log.Warn("unusable winrm certificate in guest attributes", "instance", instanceID(zone, name), "key", winrmCertKey, "err", err)
		return nil, nil
	}
	return cert, nil
}

// parseCertPEM checks that b holds exactly one PEM certificate and returns
// it re-encoded canonically.
func parseCertPEM(b []byte) ([]byte, error) {
	block, rest := pem.Decode(b)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("no PEM CERTIFICATE block")
	}
	if next, _ := pem.Decode(rest); next != nil {
		return nil, fmt.Errorf("more than one PEM block")
	}
	if _, err := x509.ParseCertificate(block.Bytes); err != nil {
		return nil, fmt.Errorf("certificate: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: block.Bytes}), nil
}
