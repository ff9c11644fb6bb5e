package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mayfly-ci/mayfly/manager/config"
)

// secretConfig holds secrets in every place a config carries provider
// settings: plugin_config keys (top level and nested), a private key and a
// service-account JSON pasted inline, and docker-machine options.
const secretConfig = `concurrent = 2
listen_address = "127.0.0.1:0"

[[runners]]
  name = "aws"
  url = "http://127.0.0.1:1"
  token = "glrt-abcdefghijklmnop"
  executor = "instance"
  [runners.autoscaler]
    plugin = "aws"
    [runners.autoscaler.plugin_config]
      region = "us-east-1"
      access_key_id = "AKIDEXAMPLE"
      secret_access_key = "SECRET-ACCESS-KEY-1"
      session_token = "SESSION-TOKEN-2"
      winrm = { password = "PASSWORD-3", user = "Administrator" }
      private_key = """
-----BEGIN OPENSSH PRIVATE KEY-----
PRIVATE-KEY-BODY-4
-----END OPENSSH PRIVATE KEY-----
"""
      service_account = '{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----\nSA-KEY-5\n-----END PRIVATE KEY-----\n"}'

[[runners]]
  name = "machine"
  url = "http://127.0.0.1:1"
  token = "glrt-qrstuvwxyz012345"
  executor = "docker+machine"
  [runners.machine]
    IdleCount = 0
    MachineDriver = "amazonec2"
    MachineName = "m-%s"
    MachineOptions = ["amazonec2-region=us-east-1", "amazonec2-secret-key=SECRET-KEY-6", "amazonec2-access-key=AKIDEXAMPLE"]
`

var secrets = []string{"SECRET-ACCESS-KEY-1", "SESSION-TOKEN-2", "PASSWORD-3", "PRIVATE-KEY-BODY-4", "SA-KEY-5", "SECRET-KEY-6"}

// TestVerifyRedactsSecrets: mayfly verify prints the providers' settings
// with every secret replaced, and the rest as it is.
func TestVerifyRedactsSecrets(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(path, []byte(secretConfig), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out, errOut := runCLI("verify", "--config", path)
	if code != 0 {
		t.Fatalf("exit %d, stderr:\n%s", code, errOut)
	}
	for _, s := range secrets {
		if strings.Contains(out+errOut, s) {
			t.Errorf("verify prints the secret %s:\n%s", s, out)
		}
	}
	for _, want := range []string{"region=us-east-1", "access_key_id=AKIDEXAMPLE", "secret_access_key=[redacted]", "user:Administrator",
		"amazonec2-secret-key=[redacted]", "amazonec2-region=us-east-1"} {
		if !strings.Contains(out, want) {
			t.Errorf("verify output lacks %q:\n%s", want, out)
		}
	}
}

// TestManagerLogRedacts: the manager's log (which also carries the plugins'
// records) redacts secret attributes and private keys, in both formats.
func TestManagerLogRedacts(t *testing.T) {
	for _, format := range []string{"text", "json"} {
		var buf strings.Builder
		log := newLogger(&config.Config{LogFormat: format}, &buf)
		log.Info("provider settings", "region", "us-east-1", "session_token", "SESSION-TOKEN-2",
			"detail", "-----BEGIN OPENSSH PRIVATE KEY-----\nPRIVATE-KEY-BODY-4\n-----END OPENSSH PRIVATE KEY-----")
		if out := buf.String(); strings.Contains(out, "SESSION-TOKEN-2") || strings.Contains(out, "PRIVATE-KEY-BODY-4") || !strings.Contains(out, "us-east-1") {
			t.Errorf("%s log: %s", format, out)
		}
	}
}

// TestFleetStatusPrintsNoSecret: fleet status reads the same config (for
// its listen_address) and prints nothing of its settings, also when the
// manager cannot be reached.
func TestFleetStatusPrintsNoSecret(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(path, []byte(strings.Replace(secretConfig, "127.0.0.1:0", "127.0.0.1:1", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out, errOut := runCLI("fleet", "status", "--config", path)
	if code != 1 || !strings.Contains(errOut, "127.0.0.1:1") {
		t.Errorf("fleet status against no manager: exit %d, stderr %q", code, errOut)
	}
	for _, s := range secrets {
		if strings.Contains(out+errOut, s) {
			t.Errorf("fleet status prints the secret %s:\n%s%s", s, out, errOut)
		}
	}
}
