package winrm

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/mayfly-ci/mayfly/vmexec"
)

// DefaultShell interprets scripts when Command.Shell is empty.
const DefaultShell = "powershell"

// MaxCommandLine is the longest command line cmd.exe accepts. WinRM starts
// commands through cmd.exe /c unless WINRS_SKIP_CMD_SHELL is set, and
// masterzen/winrm's requests leave it unset.
const MaxCommandLine = 8191

// shellName allows program names and paths such as
// C:\Program Files\PowerShell\7\pwsh.exe, but nothing cmd.exe would interpret.
var shellName = regexp.MustCompile(`^[A-Za-z0-9_.:\\/ ()+-]+$`)

// isPSQuote reports whether PowerShell treats r as a single quote: besides
// the apostrophe, the four typographic single quotes count too.
func isPSQuote(r rune) bool {
	switch r {
	case '\'', '\u2018', '\u2019', '\u201a', '\u201b':
		return true
	}
	return false
}

// psQuote returns s as a PowerShell single-quoted string literal, in which
// nothing is expanded and a quote character is escaped by doubling it.
func psQuote(s string) string {
	var b strings.Builder
	b.Grow(len(s) + 2)
	b.WriteByte('\'')
	for _, r := range s {
		if isPSQuote(r) {
			b.WriteRune(r)
		}
		b.WriteRune(r)
	}
	b.WriteByte('\'')
	return b.String()
}

// psVar is one variable of a generated script's assignment prelude.
type psVar struct {
	name  string
	value any // string or int
}

// prelude renders assignments, one per line. Every generated script starts
// with such a prelude followed by a fixed body, so the test server can run
// the body's sh stand-in with the same variables.
func prelude(vars ...psVar) string {
	var b strings.Builder
	b.WriteString("$ProgressPreference = 'SilentlyContinue'\n")
	for _, v := range vars {
		switch x := v.value.(type) {
		case string:
			b.WriteString("$" + v.name + " = " + psQuote(x) + "\n")
		case int:
			b.WriteString("$" + v.name + " = " + strconv.Itoa(x) + "\n")
		default:
			panic(fmt.Sprintf("winrm: prelude variable %s of type %T", v.name, v.value))
		}
	}
	return b.String()
}

// helperPrelude is the prelude of the upload helpers, which stop at the
// first error.
func helperPrelude(vars ...psVar) string {
	return prelude(append([]psVar{{"ErrorActionPreference", "Stop"}}, vars...)...)
}

// loaderBody reads the program from stdin, where Run sends it as base64 of
// its UTF-8 text, and runs it in the current scope. Stdin rather than the
// command line carries it because cmd.exe limits a command line to 8191
// characters (about 3000 characters of script once encoded); base64 keeps the
// stream ASCII, out of reach of console code pages. Parsing the whole
// program before running any of it matches how -EncodedCommand and script
// files behave.
const loaderBody = `. ([ScriptBlock]::Create([Text.Encoding]::UTF8.GetString([Convert]::FromBase64String(((@($input) -join '') -replace '\s', '')))))`

// program returns the text Run executes: the environment as $env:
// assignments, then the script.
func program(env []vmexec.EnvVar, script string) (string, error) {
	var b strings.Builder
	b.Grow(len(script) + 64*len(env))
	for _, v := range env {
		if !utf8.ValidString(v.Value) {
			return "", fmt.Errorf("env %s: value is not valid UTF-8", v.Name)
		}
		b.WriteString("$env:" + v.Name + " = " + psQuote(v.Value) + "\n")
	}
	if !utf8.ValidString(script) {
		return "", fmt.Errorf("script is not valid UTF-8")
	}
	b.WriteString(script)
	if !strings.HasSuffix(script, "\n") {
		b.WriteByte('\n')
	}
	return b.String(), nil
}

// base64Lines encodes data as base64 in lines of at most 1000 characters.
func base64Lines(data []byte) []byte {
	const line = 1000
	enc := base64.StdEncoding.EncodeToString(data)
	out := make([]byte, 0, len(enc)+len(enc)/line+1)
	for len(enc) > line {
		out = append(out, enc[:line]...)
		out = append(out, '\n')
		enc = enc[line:]
	}
	out = append(out, enc...)
	return append(out, '\n')
}

// encodeCommand returns the command line that runs script with shell:
// -EncodedCommand takes base64 of the UTF-16LE text.
func encodeCommand(shell, script string) (string, error) {
	u := utf16.Encode([]rune(script))
	raw := make([]byte, 2*len(u))
	for i, c := range u {
		raw[2*i], raw[2*i+1] = byte(c), byte(c>>8)
	}
	exe := shell
	if strings.ContainsAny(exe, " ()") {
		exe = `"` + exe + `"`
	}
	line := exe + " -NoLogo -NoProfile -NonInteractive -ExecutionPolicy Bypass -EncodedCommand " +
		base64.StdEncoding.EncodeToString(raw)
	if len(line) > MaxCommandLine {
		return "", fmt.Errorf("encoded command line has %d characters, more than cmd.exe's %d", len(line), MaxCommandLine)
	}
	return line, nil
}

// checkShell validates Command.Shell.
func checkShell(shell string) (string, error) {
	if shell == "" {
		return DefaultShell, nil
	}
	if !shellName.MatchString(shell) || strings.TrimSpace(shell) != shell {
		return "", fmt.Errorf("Command.Shell %q: want a program name or path such as powershell or pwsh, without quotes or cmd.exe metacharacters", shell)
	}
	return shell, nil
}

var winAbs = regexp.MustCompile(`^[A-Za-z]:[\\/]`)

// validateUploadPath checks p is an absolute path naming a file: a Windows
// path with a drive letter (C:\dir\file or C:/dir/file), a UNC path
// (\\server\share\file), or a POSIX absolute path for pwsh on Linux or macOS.
func validateUploadPath(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("path is empty")
	case strings.ContainsAny(p, "\x00\r\n"):
		return fmt.Errorf("path %q contains NUL or newline", p)
	case !utf8.ValidString(p):
		return fmt.Errorf("path %q is not valid UTF-8", p)
	}
	var rest string
	switch {
	case winAbs.MatchString(p):
		rest = p[3:]
	case strings.HasPrefix(p, `\\`):
		rest = p[2:]
	case strings.HasPrefix(p, "/"):
		rest = p[1:]
	default:
		return fmt.Errorf("path %q is not absolute", p)
	}
	elems := strings.FieldsFunc(rest, func(r rune) bool { return r == '\\' || r == '/' })
	if len(elems) == 0 || strings.HasSuffix(p, `\`) || strings.HasSuffix(p, "/") {
		return fmt.Errorf("path %q does not name a file", p)
	}
	for _, e := range elems {
		if e == "." || e == ".." {
			return fmt.Errorf("path %q is not clean: it has a %q element", p, e)
		}
	}
	return nil
}

// newUUID returns a random (version 4) UUID.
func newUUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic("winrm: crypto/rand: " + err.Error())
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// newToken returns a random hex string for temporary names.
func newToken() string {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic("winrm: crypto/rand: " + err.Error())
	}
	return hex.EncodeToString(b[:])
}

// chunkBody writes one chunk of an upload, sent on stdin as base64, at byte
// offset $mayflyOffset of the temporary file $mayflyTemp, creating the file
// and its directory when needed. It writes at an offset and truncates after
// the chunk rather than appending, so a chunk retried after a lost reply is
// written once; a file shorter than the offset (a lost earlier chunk) is an
// error rather than a gap.
const chunkBody = `$mayflyData = [Convert]::FromBase64String(((@($input) -join '') -replace '\s', ''))
if ($mayflyData.Length -ne $mayflyLength) {
  [Console]::Error.WriteLine("chunk at offset ${mayflyOffset}: received $($mayflyData.Length) bytes, expected $mayflyLength")
  exit 2
}
[void][IO.Directory]::CreateDirectory([IO.Path]::GetDirectoryName($mayflyTemp))
$mayflyFile = [IO.File]::Open($mayflyTemp, [IO.FileMode]::OpenOrCreate, [IO.FileAccess]::Write, [IO.FileShare]::None)
try {
  if ($mayflyFile.Length -lt [long]$mayflyOffset) {
    [Console]::Error.WriteLine("temporary file ${mayflyTemp} has $($mayflyFile.Length) bytes, fewer than the offset $mayflyOffset")
    exit 3
  }
  [void]$mayflyFile.Seek([long]$mayflyOffset, [IO.SeekOrigin]::Begin)
  $mayflyFile.Write($mayflyData, 0, $mayflyData.Length)
  $mayflyFile.SetLength([long]$mayflyOffset + $mayflyData.Length)
} finally {
  $mayflyFile.Dispose()
}
exit 0`

// finalizeBody checks the size and SHA-256 of the temporary file and moves
// it over $mayflyPath. When the temporary file is gone but the destination
// already has the expected content (a retry after a lost reply), it succeeds.
const finalizeBody = `if (-not [IO.File]::Exists($mayflyTemp)) {
  if ([IO.File]::Exists($mayflyPath) -and (Get-FileHash -Algorithm SHA256 -LiteralPath $mayflyPath).Hash -eq $mayflySHA256) {
    exit 0
  }
  [Console]::Error.WriteLine("temporary file ${mayflyTemp} is missing")
  exit 2
}
$mayflySize = (Get-Item -LiteralPath $mayflyTemp).Length
if ($mayflySize -ne [long]$mayflyLength) {
  [Console]::Error.WriteLine("temporary file ${mayflyTemp} has $mayflySize bytes, expected $mayflyLength")
  exit 3
}
if ((Get-FileHash -Algorithm SHA256 -LiteralPath $mayflyTemp).Hash -ne $mayflySHA256) {
  [Console]::Error.WriteLine("temporary file ${mayflyTemp} does not have the expected SHA-256 $mayflySHA256")
  exit 4
}
if ([IO.File]::Exists($mayflyPath)) {
  [IO.File]::Replace($mayflyTemp, $mayflyPath, [NullString]::Value)
} else {
  [IO.File]::Move($mayflyTemp, $mayflyPath)
}
exit 0`

// cleanupBody removes the temporary file of a failed upload.
const cleanupBody = `Remove-Item -LiteralPath $mayflyTemp -Force -ErrorAction SilentlyContinue
exit 0`
