package aws_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/plugins/aws/awsfake"
	"github.com/mayfly-ci/mayfly/providers"
)

func TestConnectInfoLinux(t *testing.T) {
	// The console shows the host key a minute after boot on the fake's
	// clock, which moves only when the test says.
	now, advance := handClock()
	e := newEnv(t, awsfake.Options{ConsoleDelay: time.Minute, Now: now})
	secretFile := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secretFile, []byte(strings.Repeat("k", 48)), 0o600); err != nil {
		t.Fatal(err)
	}
	e.settings["key_secret_file"] = secretFile
	p := start(t, e.with("user_data", "#!/bin/sh\necho ready > /run/mayfly\n", "username", "admin", "instance_type", "t4g.small"))
	ids, err := p.Create(ctxT(t), 2, labels)
	if err != nil {
		t.Fatal(err)
	}
	waitRunning(t, p, ids)
	var pubs []string
	for _, id := range ids {
		in, _ := e.srv.Instance(id)
		ud := string(in.UserData)
		if !strings.Contains(ud, "multipart/mixed") || !strings.Contains(ud, "text/x-shellscript") || !strings.Contains(ud, "echo ready > /run/mayfly") {
			t.Errorf("user data of %s lacks the multipart parts:\n%s", id, ud)
		}
		keys := authorizedKeys(in.UserData)
		if len(keys) != 1 {
			t.Fatalf("user data of %s authorises %d keys: %v", id, len(keys), keys)
		}
		ci, err := p.ConnectInfo(ctxT(t), id)
		if err != nil {
			t.Fatalf("ConnectInfo(%s): %v", id, err)
		}
		if err := ci.Validate(); err != nil {
			t.Error(err)
		}
		if ci.Protocol != providers.ProtocolSSH || ci.Port != 22 || ci.Username != "admin" || ci.Address != in.PrivateIP || ci.Arch != "arm64" || ci.OS != "linux" {
			t.Errorf("ConnectInfo = %+v", ci)
		}
		signer, err := ssh.ParsePrivateKey(ci.PrivateKey)
		if err != nil {
			t.Fatal(err)
		}
		pub := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(signer.PublicKey())))
		if !strings.HasPrefix(keys[0], pub+" ") {
			t.Errorf("private key of %s signs as %s, user data authorises %s", id, pub, keys[0])
		}
		pubs = append(pubs, pub)
		// The console has not shown the host key yet.
		if ci.HostKey != "" {
			t.Errorf("host key %q before the console output exists", ci.HostKey)
		}
	}
	if pubs[0] == pubs[1] {
		t.Error("two instances share one SSH key")
	}
	advance(time.Minute)
	in, _ := e.srv.Instance(ids[0])
	ci, err := p.ConnectInfo(ctxT(t), ids[0])
	if err != nil {
		t.Fatal(err)
	}
	if ci.HostKey != in.HostKey {
		t.Errorf("host key %q, the instance's is %q", ci.HostKey, in.HostKey)
	}
	before := e.srv.Calls()["GetConsoleOutput"]
	if _, err := p.ConnectInfo(ctxT(t), ids[0]); err != nil {
		t.Fatal(err)
	}
	if after := e.srv.Calls()["GetConsoleOutput"]; after != before {
		t.Errorf("a known host key was fetched again (%d → %d calls)", before, after)
	}

	pub := start(t, e.with("use_external_ip", true))
	ci, err = pub.ConnectInfo(ctxT(t), ids[1])
	if err != nil {
		t.Fatal(err)
	}
	if in, _ := e.srv.Instance(ids[1]); ci.Address != in.PublicIP || ci.Address == in.PrivateIP {
		t.Errorf("use_external_ip address %q, public %q", ci.Address, in.PublicIP)
	}
	// An instance of another group is not ours to connect to.
	other := start(t, e.with("name_prefix", "other"))
	if _, err := other.ConnectInfo(ctxT(t), ids[0]); !providers.IsNotFound(err) {
		t.Errorf("ConnectInfo from another group = %v, want not found", err)
	}
}

func TestWindowsPassword(t *testing.T) {
	// The password is published a minute after boot on the fake's clock,
	// which moves only when the test says, whatever the machine's load.
	now, advance := handClock()
	e := newEnv(t, awsfake.Options{PasswordDelay: time.Minute, Now: now})
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "win.pem")
	writeRSAKey(t, keyFile)
	settings := e.with("os", "windows", "ami", winAMI, "instance_type", "m5.large", "windows_key_file", keyFile,
		"user_data", "<powershell>Enable-PSRemoting</powershell>")
	p := start(t, settings)
	ids, err := p.Create(ctxT(t), 2, map[string]string{providers.LabelManager: "mgr-1", providers.LabelRunner: "windows"})
	if err != nil {
		t.Fatal(err)
	}
	if calls := e.srv.Calls(); calls["ImportKeyPair"] != 1 {
		t.Errorf("ImportKeyPair calls = %d, want 1 per plugin", calls["ImportKeyPair"])
	}
	if kp := e.srv.KeyPairs(); len(kp) != 1 || !strings.HasPrefix(kp[0], "mayfly-win-") {
		t.Errorf("key pairs %v", kp)
	}
	in, _ := e.srv.Instance(ids[0])
	if ud := string(in.UserData); !strings.HasPrefix(ud, "<powershell>\n# mayfly: WinRM over HTTPS") || !strings.HasSuffix(ud, "\nEnable-PSRemoting</powershell>") || in.KeyName == "" {
		t.Errorf("windows user data %q key %q, want mayfly's WinRM script then the user_data setting's", ud, in.KeyName)
	}
	waitRunning(t, p, ids)
	_, err = p.ConnectInfo(ctxT(t), ids[0])
	if providers.KindOf(err) != providers.KindTransient || !strings.Contains(err.Error(), "not available yet") {
		t.Errorf("ConnectInfo before the password exists = %v, want transient", err)
	}
	advance(time.Minute)
	for _, id := range ids {
		ci, err := p.ConnectInfo(ctxT(t), id)
		if err != nil {
			t.Fatalf("ConnectInfo(%s): %v", id, err)
		}
		if err := ci.Validate(); err != nil {
			t.Error(err)
		}
		if ci.Password != e.srv.Password(id) || ci.Protocol != providers.ProtocolWinRM || ci.Port != 5986 || ci.Username != "Administrator" || ci.OS != "windows" {
			t.Errorf("ConnectInfo(%s) = %+v, fake password %q", id, ci, e.srv.Password(id))
		}
	}
	if _, err := p.Create(ctxT(t), 1, labels); err != nil {
		t.Fatal(err)
	}
	if got := e.srv.Calls()["ImportKeyPair"]; got != 1 {
		t.Errorf("ImportKeyPair calls after a second Create = %d, want 1", got)
	}
	// A restarted plugin with the same key file decrypts the passwords of
	// the instances made before; a duplicate key pair is no error.
	p2 := start(t, settings)
	if _, err := p2.Create(ctxT(t), 1, labels); err != nil {
		t.Fatalf("Create after restart: %v", err)
	}
	ci, err := p2.ConnectInfo(ctxT(t), ids[1])
	if err != nil || ci.Password != e.srv.Password(ids[1]) {
		t.Errorf("ConnectInfo after restart = %+v, %v", ci, err)
	}
	// The key pair of a key file outlives Shutdown; a generated one does not.
	if err := p2.Shutdown(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if kp := e.srv.KeyPairs(); len(kp) != 1 {
		t.Errorf("key pairs after Shutdown = %v, want the file's pair kept", kp)
	}
	eph := start(t, e.with("os", "windows", "ami", winAMI))
	if _, err := eph.Create(ctxT(t), 1, labels); err != nil {
		t.Fatal(err)
	}
	if _, err := eph.ConnectInfo(ctxT(t), ids[0]); providers.KindOf(err) != providers.KindPermanent {
		t.Errorf("ConnectInfo with another Windows key = %v, want permanent", err)
	}
	if err := eph.Shutdown(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if kp := e.srv.KeyPairs(); len(kp) != 1 {
		t.Errorf("key pairs after an ephemeral plugin's Shutdown = %v, want only the file's", kp)
	}
}
