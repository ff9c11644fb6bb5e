package aws

import (
	"bytes"
	"encoding/base64"
	"encoding/pem"
	"strings"
	"testing"
	"time"
)

func TestWinRMUserDataSize(t *testing.T) {
	c, err := newWinRMCert(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	ud, err := windowsUserData(c, "")
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := base64.StdEncoding.DecodeString(ud)
	t.Logf("mayfly's Windows user data: %d bytes (%d of PFX), leaving %d of EC2's %d", len(raw), len(c.pfx), maxUserData-len(raw), maxUserData)
	// The user_data setting may hold 10 KiB on Windows: that must fit.
	if len(raw)+10<<10 > maxUserData {
		t.Errorf("mayfly's part is %d bytes: a 10 KiB user_data setting would not fit in %d", len(raw), maxUserData)
	}
	if _, err := windowsUserData(c, "<powershell>"+strings.Repeat("#", maxUserData)+"</powershell>"); err == nil || !strings.Contains(err.Error(), "user_data") {
		t.Errorf("oversized user data: %v, want an error naming user_data", err)
	}
}

func TestCertFromUserData(t *testing.T) {
	c, err := newWinRMCert(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	other, err := newWinRMCert(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	ud64, err := windowsUserData(c, "<powershell>Write-Output hi</powershell>")
	if err != nil {
		t.Fatal(err)
	}
	ud, _ := base64.StdEncoding.DecodeString(ud64)
	got, err := certFromUserData(ud)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, c.certPEM) {
		t.Errorf("certificate read back differs from the one made")
	}
	// Windows line ends (a user data edited on Windows) read the same.
	if got, err := certFromUserData(bytes.ReplaceAll(ud, []byte("\n"), []byte("\r\n"))); err != nil || !bytes.Equal(got, c.certPEM) {
		t.Errorf("with CRLF: %v", err)
	}
	block, _ := pem.Decode(c.certPEM)
	if thumbprint(block.Bytes) != c.thumbprint || len(c.thumbprint) != 40 || strings.ToUpper(c.thumbprint) != c.thumbprint {
		t.Errorf("thumbprint %q", c.thumbprint)
	}
	for _, tc := range []struct {
		name string
		ud   string
		want string
	}{
		{"no certificate", "<powershell>Write-Output hi</powershell>", "no mayfly WinRM certificate"},
		{"empty", "", "no mayfly WinRM certificate"},
		{"wrong password", strings.Replace(string(ud), c.password, other.password, 1), "WinRM certificate in the user data"},
		{"other thumbprint", strings.Replace(string(ud), c.thumbprint, other.thumbprint, 1), "thumbprint"},
		{"broken PFX", strings.Replace(string(ud), base64.StdEncoding.EncodeToString(c.pfx)[:40], strings.Repeat("A", 40), 1), "WinRM certificate in the user data"},
	} {
		if _, err := certFromUserData([]byte(tc.ud)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
}
