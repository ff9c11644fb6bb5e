package providers_test

import (
	"bytes"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/mayfly-ci/mayfly/providers"
)

const pemKey = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n-----END OPENSSH PRIVATE KEY-----\n"

func TestIsSecretKey(t *testing.T) {
	for _, k := range []string{"password", "winrm_password", "private_key", "token", "session_token", "secret_access_key",
		"client_secret", "amazonec2-secret-key", "amazonec2-session-token", "digitalocean-access-token", "credentials", "Passphrase"} {
		if !providers.IsSecretKey(k) {
			t.Errorf("IsSecretKey(%q) = false", k)
		}
	}
	for _, k := range []string{"region", "key_secret_file", "credentials_file", "windows_key_file", "access_key_id", "username", "private_key_path", "token_dir"} {
		if providers.IsSecretKey(k) {
			t.Errorf("IsSecretKey(%q) = true", k)
		}
	}
}

func TestRedactSettings(t *testing.T) {
	serviceAccount := `{"type": "service_account", "client_email": "a@b", "private_key": "` + strings.ReplaceAll(pemKey, "\n", `\n`) + `"}`
	in := map[string]any{
		"region":            "us-east-1",
		"secret_access_key": "SUPERSECRET1234",
		"password":          "hunter2",
		"nested":            map[string]any{"token": "tok-123", "name": "ok"},
		"list":              []any{map[string]any{"client_secret": "cs-999"}, "plain"},
		"inline_key":        pemKey,
		"sa":                serviceAccount,
		"aws_file":          "[default]\naws_access_key_id = AKID\naws_secret_access_key = wJalrXUtnFEMI\n",
		"empty_password":    "",
		"options":           []string{"amazonec2-secret-key=SK-777", "amazonec2-region=eu-west-1", "engine-opt"},
	}
	out := fmt.Sprint(providers.RedactSettings(in))
	for _, secret := range []string{"SUPERSECRET1234", "hunter2", "tok-123", "cs-999", "b3BlbnNzaC1rZXkt", "wJalrXUtnFEMI", "SK-777"} {
		if strings.Contains(out, secret) {
			t.Errorf("redacted settings still hold %q: %s", secret, out)
		}
	}
	for _, kept := range []string{"us-east-1", "name:ok", "plain", "client_email", "aws_access_key_id = AKID", "amazonec2-region=eu-west-1", "engine-opt", "empty_password:"} {
		if !strings.Contains(out, kept) {
			t.Errorf("redacted settings lost %q: %s", kept, out)
		}
	}
	if in["password"] != "hunter2" {
		t.Error("RedactSettings changed its input")
	}
	if got := providers.RedactSettings(map[string]string{"google-password": "pw", "google-zone": "z"}).(map[string]string); got["google-password"] != providers.Redacted || got["google-zone"] != "z" {
		t.Errorf("docker-machine options: %v", got)
	}
	if got := providers.RedactText("cut off: -----BEGIN RSA PRIVATE KEY-----\nMIIEow"); strings.Contains(got, "MIIEow") {
		t.Errorf("a truncated private key block is not redacted: %q", got)
	}
}

func TestConnectInfoPrintsNoSecret(t *testing.T) {
	ci := providers.ConnectInfo{ID: "i-1", Address: "10.0.0.1", Port: 22, Protocol: providers.ProtocolSSH, OS: "linux", Arch: "amd64",
		Username: "mayfly", PrivateKey: []byte(pemKey), Password: "hunter2"}
	var logs bytes.Buffer
	slog.New(slog.NewJSONHandler(&logs, nil)).Info("connect", "ci", ci)
	for name, s := range map[string]string{"%v": fmt.Sprintf("%v", ci), "%+v": fmt.Sprintf("%+v", ci), "slog": logs.String()} {
		if strings.Contains(s, "hunter2") || strings.Contains(s, "b3BlbnNzaC1rZXkt") {
			t.Errorf("%s shows a secret: %s", name, s)
		}
		if !strings.Contains(s, "10.0.0.1") || !strings.Contains(s, providers.Redacted) {
			t.Errorf("%s does not describe the instance: %s", name, s)
		}
	}
}

func TestRedactAttr(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{ReplaceAttr: providers.RedactAttr}))
	log.Info("init", "region", "us-east-1", "secret_access_key", "SECRET-1", "password", "", slog.Group("winrm", "password", "SECRET-2"),
		"err", fmt.Errorf("parse key: %s", pemKey), "note", "key follows "+pemKey)
	out := logs.String()
	for _, s := range []string{"SECRET-1", "SECRET-2", "b3BlbnNzaC1rZXkt"} {
		if strings.Contains(out, s) {
			t.Errorf("log shows %s: %s", s, out)
		}
	}
	for _, want := range []string{`"region":"us-east-1"`, `"password":""`, `"secret_access_key":"[redacted]"`, `"note":"key follows [redacted]`} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %s: %s", want, out)
		}
	}
}
