package winrm

import (
	"strings"
	"testing"

	"github.com/mayfly-ci/mayfly/vmexec"
	"github.com/mayfly-ci/mayfly/vmexec/winrm/wsmantest"
)

func TestPSQuote(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", "''"},
		{"plain", "'plain'"},
		{"it's", "'it''s'"},
		{"‘curly’ ‚low‛", "'‘‘curly’’ ‚‚low‛‛'"},
		{"$HOME `n \"dq\" $(x)", "'$HOME `n \"dq\" $(x)'"},
		{"a\nb", "'a\nb'"},
	} {
		if got := psQuote(tc.in); got != tc.want {
			t.Errorf("psQuote(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// TestProgramPreludeRoundTrip parses the $env: assignments of a program with
// the test server's independent reading of PowerShell's quoting rules.
func TestProgramPreludeRoundTrip(t *testing.T) {
	values := []string{"", "plain", "it's", "'''", "‘x’‚y‛'", "$env:PATH `t \"q\"", "multi\nline\r\n", "trailing'", "ünïcødé ✓"}
	var env []vmexec.EnvVar
	for i, v := range values {
		env = append(env, vmexec.EnvVar{Name: "V" + string(rune('A'+i)), Value: v})
	}
	prog, err := program(env, "echo body")
	if err != nil {
		t.Fatal(err)
	}
	got, body := wsmantest.SplitPrelude(prog)
	if strings.TrimSpace(body) != "echo body" {
		t.Errorf("body %q", body)
	}
	if len(got) != len(values) {
		t.Fatalf("parsed %d assignments, want %d: %+v", len(got), len(values), got)
	}
	for i, a := range got {
		if !a.Env || a.Name != env[i].Name || a.Value != values[i] {
			t.Errorf("assignment %d: %+v, want $env:%s = %q", i, a, env[i].Name, values[i])
		}
	}
	if _, err := program([]vmexec.EnvVar{{Name: "X", Value: "\xff"}}, ""); err == nil || !strings.Contains(err.Error(), "env X") {
		t.Errorf("invalid UTF-8 value: %v", err)
	}
}

func TestEncodeCommand(t *testing.T) {
	script := prelude(psVar{"mayflyTemp", `C:\Temp\x.tmp`}, psVar{"mayflyOffset", 42}) + chunkBody
	line, err := encodeCommand("powershell", script)
	if err != nil {
		t.Fatal(err)
	}
	i := strings.Index(line, "-EncodedCommand ")
	if !strings.HasPrefix(line, "powershell -NoLogo -NoProfile -NonInteractive") || i < 0 {
		t.Fatalf("line %q", line)
	}
	dec, err := wsmantest.DecodeEncodedCommand(line[i+len("-EncodedCommand "):])
	if err != nil || dec != script {
		t.Fatalf("decoded %q, %v", dec, err)
	}
	if line, _ := encodeCommand(`C:\Program Files\PowerShell\7\pwsh.exe`, "1"); !strings.HasPrefix(line, `"C:\Program Files\PowerShell\7\pwsh.exe" -NoLogo`) {
		t.Errorf("path with spaces not quoted: %q", line)
	}
	if _, err := encodeCommand("powershell", strings.Repeat("x", 3100)); err == nil || !strings.Contains(err.Error(), "8191") {
		t.Errorf("over-long command line: %v", err)
	}
	// Every fixed body leaves room in the command line for long paths.
	for _, body := range []string{loaderBody, chunkBody, finalizeBody, cleanupBody} {
		long := strings.Repeat("d", 250)
		s := prelude(psVar{"mayflyTemp", `C:\` + long + `\` + long}, psVar{"mayflyPath", `C:\` + long + `\` + long},
			psVar{"mayflyOffset", 1 << 40}, psVar{"mayflyLength", 1 << 30}, psVar{"mayflySHA256", strings.Repeat("f", 64)}) + body
		if _, err := encodeCommand("powershell", s); err != nil {
			t.Errorf("body %.30q: %v", body, err)
		}
	}
}

func TestCheckShell(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		ok       bool
	}{
		{"", "powershell", true},
		{"pwsh", "pwsh", true},
		{`C:\Program Files\PowerShell\7\pwsh.exe`, `C:\Program Files\PowerShell\7\pwsh.exe`, true},
		{"powershell & calc", "", false},
		{`"pwsh"`, "", false},
		{"pwsh%PATH%", "", false},
		{" pwsh", "", false},
	} {
		got, err := checkShell(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("checkShell(%q) = %q, %v", tc.in, got, err)
		}
		if err != nil && !strings.Contains(err.Error(), "Command.Shell") {
			t.Errorf("error does not name the field: %v", err)
		}
	}
}

func TestValidateUploadPath(t *testing.T) {
	for _, tc := range []struct {
		path string
		ok   bool
	}{
		{`C:\builds\x.ps1`, true},
		{`c:/builds/x`, true},
		{`\\server\share\f`, true},
		{`/tmp/x`, true},
		{``, false},
		{`builds\x`, false},
		{`C:x`, false},
		{`C:\`, false},
		{`C:\dir\`, false},
		{`C:\a\..\b`, false},
		{`/tmp/./x`, false},
		{"C:\\a\nb", false},
	} {
		if err := validateUploadPath(tc.path); (err == nil) != tc.ok {
			t.Errorf("validateUploadPath(%q) = %v, want ok=%v", tc.path, err, tc.ok)
		}
	}
}

func TestTargetCheck(t *testing.T) {
	ok := Target{Addr: "127.0.0.1", Username: "u"}
	for _, tc := range []struct {
		name string
		edit func(*Target)
		want string
	}{
		{"no addr", func(t *Target) { t.Addr = "" }, "Target.Addr"},
		{"addr with port", func(t *Target) { t.Addr = "[::1]:5985" }, "Target.Addr"},
		{"bracketed addr", func(t *Target) { t.Addr = "[::1]" }, "Target.Addr"},
		{"addr url", func(t *Target) { t.Addr = "http://x" }, "Target.Addr"},
		{"port", func(t *Target) { t.Port = 70000 }, "Target.Port"},
		{"user", func(t *Target) { t.Username = "" }, "Target.Username"},
		{"auth", func(t *Target) { t.Auth = "kerberos" }, "Target.Auth"},
		{"pin without https", func(t *Target) { t.ServerCertPEM = []byte("x") }, "Target.ServerCertPEM"},
		{"bad pin", func(t *Target) { t.HTTPS = true; t.ServerCertPEM = []byte("not pem") }, "exactly one CERTIFICATE"},
		{"envelope", func(t *Target) { t.MaxEnvelopeSize = 100 }, "Target.MaxEnvelopeSize"},
	} {
		tg := ok
		tc.edit(&tg)
		_, err := New(tg)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !vmexec.IsSystemFailure(err) {
			t.Errorf("%s: %v, want a SystemError naming %s", tc.name, err, tc.want)
		}
	}
	c, err := New(ok)
	if err != nil {
		t.Fatal(err)
	}
	if c.url != "http://127.0.0.1:5985/wsman" {
		t.Errorf("url %s", c.url)
	}
	c.Close()
	six, _ := New(Target{Addr: "::1", HTTPS: true, Username: "u"})
	if six.url != "https://[::1]:5986/wsman" {
		t.Errorf("url %s", six.url)
	}
	six.Close()
}
