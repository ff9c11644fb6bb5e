package providers

import (
	"fmt"
	"log/slog"
	"regexp"
	"strings"
)

// Redacted stands in for a secret wherever settings or connect info are
// printed or logged.
const Redacted = "[redacted]"

// IsSecretKey reports whether a settings key names a secret: a password or
// passphrase, a token, a secret (secret_access_key, client_secret, …) or a
// private key. Keys that name where a secret is kept (…_file, …_path,
// …_dir) are not secrets. Dashes count as underscores, so docker-machine
// option names (amazonec2-secret-key) are judged alike.
func IsSecretKey(key string) bool {
	k := strings.ReplaceAll(strings.ToLower(key), "-", "_")
	for _, where := range []string{"_file", "_path", "_dir"} {
		if strings.HasSuffix(k, where) {
			return false
		}
	}
	switch {
	case strings.Contains(k, "password"), strings.Contains(k, "passphrase"), strings.Contains(k, "passwd"):
		return true
	case strings.Contains(k, "secret"), strings.HasSuffix(k, "token"), strings.HasSuffix(k, "private_key"):
		return true
	case k == "credentials", strings.HasSuffix(k, "_credentials"), k == "credentials_json":
		return true
	}
	return false
}

// secretText finds what is secret in free text: PEM private key blocks
// (whole, or cut off), and the private part of credentials files pasted
// inline (a service-account JSON's "private_key", an AWS shared
// credentials file's aws_secret_access_key).
var secretText = regexp.MustCompile(`(?s)-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(-----END [A-Z0-9 ]*PRIVATE KEY-----|\z)` +
	`|("private_key"\s*:\s*)"(?:[^"\\]|\\.)*"` +
	`|(?i)(aws_secret_access_key|aws_session_token)(\s*=\s*)\S+`)

// RedactText returns s with private keys and the secrets of credentials
// files replaced by Redacted.
func RedactText(s string) string {
	return secretText.ReplaceAllStringFunc(s, func(m string) string {
		sub := secretText.FindStringSubmatch(m)
		switch {
		case sub[2] != "":
			return sub[2] + `"` + Redacted + `"`
		case sub[3] != "":
			return sub[3] + sub[4] + Redacted
		}
		return Redacted
	})
}

// RedactSettings returns a copy of settings (decoded JSON or TOML: maps,
// slices and scalars, at any depth) in which the value of every secret key
// (IsSecretKey) is Redacted and every other string is passed through
// RedactText. Docker-machine options ("name=value" strings) are judged by
// their name.
func RedactSettings(settings any) any {
	switch v := settings.(type) {
	case map[string]any:
		out := make(map[string]any, len(v))
		for k, x := range v {
			if IsSecretKey(k) && x != nil && x != "" {
				out[k] = Redacted
			} else {
				out[k] = RedactSettings(x)
			}
		}
		return out
	case map[string]string:
		out := make(map[string]string, len(v))
		for k, x := range v {
			if IsSecretKey(k) && x != "" {
				out[k] = Redacted
			} else {
				out[k] = RedactText(x)
			}
		}
		return out
	case []any:
		out := make([]any, len(v))
		for i, x := range v {
			out[i] = RedactSettings(x)
		}
		return out
	case []map[string]any:
		out := make([]any, len(v))
		for i, x := range v {
			out[i] = RedactSettings(x)
		}
		return out
	case []string:
		out := make([]string, len(v))
		for i, x := range v {
			out[i] = RedactOption(x)
		}
		return out
	case string:
		return RedactText(v)
	}
	return settings
}

// RedactOption redacts a docker-machine option ("name=value", or a bare
// flag name): the value of a secret option, and secrets in any value.
func RedactOption(opt string) string {
	name, value, ok := strings.Cut(opt, "=")
	if !ok {
		return RedactText(opt)
	}
	if IsSecretKey(name) && value != "" {
		return name + "=" + Redacted
	}
	return name + "=" + RedactText(value)
}

// RedactAttr is a slog.HandlerOptions.ReplaceAttr that redacts log
// attributes: the value of a secret key (IsSecretKey), and private keys
// and credentials-file secrets in any string value.
func RedactAttr(_ []string, a slog.Attr) slog.Attr {
	switch v := a.Value; {
	case v.Kind() == slog.KindGroup:
		return a
	case IsSecretKey(a.Key) && !(v.Kind() == slog.KindString && v.String() == ""):
		return slog.String(a.Key, Redacted)
	case v.Kind() == slog.KindString:
		if r := RedactText(v.String()); r != v.String() {
			return slog.String(a.Key, r)
		}
	case v.Kind() == slog.KindAny:
		if err, ok := v.Any().(error); ok {
			if r := RedactText(err.Error()); r != err.Error() {
				return slog.String(a.Key, r)
			}
		}
	}
	return a
}

// String describes c for people and logs, with the private key and the
// password redacted.
func (c ConnectInfo) String() string {
	return fmt.Sprintf("%s %s@%s:%d (%s/%s) private_key=%s password=%s host_key=%q tls_cert=%d bytes",
		c.Protocol, c.Username, c.Address, c.Port, c.OS, c.Arch, secretState(len(c.PrivateKey) > 0), secretState(c.Password != ""), c.HostKey, len(c.TLSCert))
}

// LogValue implements slog.LogValuer: c's fields, with the private key and
// the password redacted.
func (c ConnectInfo) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("id", c.ID), slog.String("address", c.Address), slog.Int("port", c.Port),
		slog.String("protocol", string(c.Protocol)), slog.String("os", c.OS), slog.String("arch", c.Arch),
		slog.String("username", c.Username),
		slog.String("private_key", secretState(len(c.PrivateKey) > 0)), slog.String("password", secretState(c.Password != "")),
		slog.String("host_key", c.HostKey), slog.Int("tls_cert_bytes", len(c.TLSCert)),
	)
}

func secretState(set bool) string {
	if set {
		return Redacted
	}
	return "none"
}
