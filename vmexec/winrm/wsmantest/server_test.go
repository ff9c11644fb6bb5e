package wsmantest

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"io"
	"io/fs"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode/utf16"

	"github.com/masterzen/winrm"
)

const (
	user = "Administrator"
	pass = "s3cret p@ss"
)

// client returns an unmodified masterzen/winrm client for ts.
// execute starts a test server with cfg and runs script in a new shell on
// it over plain HTTP; the shell is closed when the test ends.
func execute(t *testing.T, cfg Config, script string) (*TestServer, *winrm.Command) {
	t.Helper()
	ts := Start(t, cfg)
	shell, err := client(t, ts, pass, false, nil).CreateShell()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { shell.Close() })
	cmd, err := shell.Execute(script)
	if err != nil {
		t.Fatal(err)
	}
	return ts, cmd
}

func client(t *testing.T, ts *TestServer, password string, https bool, caPEM []byte) *winrm.Client {
	t.Helper()
	ep := winrm.NewEndpoint(ts.Host, ts.Port, https, false, caPEM, nil, nil, 30*time.Second)
	if https {
		ep.TLSServerName = CertName
	}
	c, err := winrm.NewClient(ep, user, password)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestMasterzenRunExitCodesAndStreams(t *testing.T) {
	ts := Start(t, Config{Username: user, Password: pass, Dir: t.TempDir()})
	c := client(t, ts, pass, false, nil)
	for _, tc := range []struct {
		cmd            string
		stdout, stderr string
		code           int
	}{
		{"echo hello", "hello\n", "", 0},
		{"echo out; echo err >&2; exit 1", "out\n", "err\n", 1},
		{"printf 'a&b<c>'; exit 3", "a&b<c>", "", 3},
	} {
		stdout, stderr, code, err := c.RunWithString(tc.cmd, "")
		if err != nil {
			t.Fatalf("%q: %v", tc.cmd, err)
		}
		if stdout != tc.stdout || stderr != tc.stderr || code != tc.code {
			t.Errorf("%q: got (%q, %q, %d), want (%q, %q, %d)", tc.cmd, stdout, stderr, code, tc.stdout, tc.stderr, tc.code)
		}
	}
	if n := ts.OpenShells(); n != 0 {
		t.Errorf("%d shells left open after the client deleted them", n)
	}
	// Each command got the final terminate signal masterzen sends.
	for _, ci := range ts.Commands() {
		if len(ci.Signals) != 1 || ci.Signals[0] != SignalTerminate {
			t.Errorf("command %s: signals %v, want one terminate", ci.CommandLine, ci.Signals)
		}
	}
}

func TestMasterzenPowerShellEncodedCommand(t *testing.T) {
	ts := Start(t, Config{Username: user, Password: pass, Interpreter: Sh})
	c := client(t, ts, pass, false, nil)
	// winrm.Powershell prepends an assignment to $ProgressPreference, which the
	// sh translation turns into an sh assignment.
	stdout, stderr, code, err := c.RunPSWithString(`echo "progress=$ProgressPreference"; exit 4`, "")
	if err != nil {
		t.Fatal(err)
	}
	if stdout != "progress=SilentlyContinue\n" || stderr != "" || code != 4 {
		t.Errorf("got (%q, %q, %d)", stdout, stderr, code)
	}
	argv := ts.Commands()[0].Argv
	if len(argv) != 3 || argv[0] != "/bin/sh" || argv[1] != "-c" {
		t.Errorf("argv %q, want /bin/sh -c", argv)
	}
}

func TestMasterzenStdin(t *testing.T) {
	ts := Start(t, Config{Username: user, Password: pass})
	c := client(t, ts, pass, false, nil)
	in := strings.Repeat("line of stdin\n", 20000) // several Send requests
	var out, errb bytes.Buffer
	code, err := c.RunWithInput("wc -c", &out, &errb, strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(out.String()); got != strconv.Itoa(len(in)) || code != 0 {
		t.Errorf("wc -c printed %q (code %d), want %d", got, code, len(in))
	}
}

func TestMasterzenTLS(t *testing.T) {
	ts := StartTLS(t, Config{Username: user, Password: pass})
	c := client(t, ts, pass, true, ts.CertPEM)
	stdout, _, code, err := c.RunWithString("echo tls", "")
	if err != nil || stdout != "tls\n" || code != 0 {
		t.Fatalf("got (%q, %d, %v)", stdout, code, err)
	}
	other := StartTLS(t, Config{Username: user, Password: pass})
	c = client(t, ts, pass, true, other.CertPEM)
	if _, _, _, err := c.RunWithString("echo tls", ""); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("a client trusting another certificate connected: %v", err)
	}
}

// TestServeTLSWithGivenCertificate serves one Server on a second HTTPS
// endpoint with a certificate made elsewhere: clients trusting that
// certificate reach it, clients trusting the first endpoint's do not, and
// both endpoints share the commands.
func TestServeTLSWithGivenCertificate(t *testing.T) {
	ts := StartTLS(t, Config{Username: user, Password: pass})
	cert, certPEM, err := SelfSignedCert(CertName)
	if err != nil {
		t.Fatal(err)
	}
	addr, err := ts.ServeTLS(cert)
	if err != nil {
		t.Fatal(err)
	}
	host, portStr, _ := strings.Cut(addr, ":")
	port, _ := strconv.Atoi(portStr)
	dial := func(caPEM []byte) *winrm.Client {
		ep := winrm.NewEndpoint(host, port, true, false, caPEM, nil, nil, 30*time.Second)
		ep.TLSServerName = CertName
		c, err := winrm.NewClient(ep, user, pass)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	stdout, _, code, err := dial(certPEM).RunWithString("echo second", "")
	if err != nil || stdout != "second\n" || code != 0 {
		t.Fatalf("on the second endpoint: (%q, %d, %v)", stdout, code, err)
	}
	if _, _, _, err := dial(ts.CertPEM).RunWithString("echo second", ""); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("a client trusting the first endpoint's certificate reached the second: %v", err)
	}
	if _, _, _, err := client(t, ts, pass, true, ts.CertPEM).RunWithString("echo first", ""); err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, c := range ts.Commands() {
		lines = append(lines, c.CommandLine)
	}
	if len(lines) != 2 || lines[0] != "echo second" || lines[1] != "echo first" {
		t.Errorf("commands %q, want both endpoints' in order", lines)
	}
	if _, err := ts.ServeTLS(tls.Certificate{}); err == nil {
		t.Error("ServeTLS accepted an empty certificate")
	}
}

func TestWrongPasswordIs401(t *testing.T) {
	ts := Start(t, Config{Username: user, Password: pass})
	c := client(t, ts, "wrong", false, nil)
	_, _, _, err := c.RunWithString("echo hi", "")
	if err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("wrong password: %v, want a 401 error", err)
	}
	if ts.OpenShells() != 0 || len(ts.Commands()) != 0 {
		t.Error("an unauthenticated request created something")
	}
	resp := post(t, ts, user, "", "text/xml", "<x/>")
	if resp.StatusCode != http.StatusUnauthorized || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Basic") {
		t.Errorf("empty password: status %d, WWW-Authenticate %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}
}

// TestStdinAfterExit sends stdin to a command that already exited: the
// data is dropped, not a fault, and the exit code still comes back.
func TestStdinAfterExit(t *testing.T) {
	ts, cmd := execute(t, Config{Username: user, Password: pass}, "exit 3")
	deadline := time.Now().Add(10 * time.Second)
	for !ts.Commands()[0].Exited {
		if time.Now().After(deadline) {
			t.Fatal("exit 3 did not exit")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// masterzen's Write drops Send errors: check the server's answer.
	_, _ = cmd.Stdin.Write([]byte("too late\n"))
	sends := 0
	for _, e := range ts.Events() {
		if e.Action == ActionSend {
			sends++
			if e.Status != http.StatusOK || e.Fault != "" {
				t.Errorf("Send to an exited command answered %d %s, want 200", e.Status, e.Fault)
			}
		}
	}
	if sends != 1 {
		t.Errorf("%d Send requests, want 1", sends)
	}
	go func() { _, _ = io.Copy(io.Discard, cmd.Stdout) }()
	go func() { _, _ = io.Copy(io.Discard, cmd.Stderr) }()
	cmd.Wait()
	if cmd.ExitCode() != 3 {
		t.Errorf("exit code %d, want 3", cmd.ExitCode())
	}
	cmd.Close()
}

func TestStreamingAndTimedOutReceive(t *testing.T) {
	ts, cmd := execute(t, Config{Username: user, Password: pass, MaxReceiveWait: 100 * time.Millisecond}, "echo first; sleep 1; echo second")
	errc := make(chan error, 1)
	go func() { _, err := io.Copy(io.Discard, cmd.Stderr); errc <- err }()
	r := bufio.NewReader(cmd.Stdout)
	line, err := r.ReadString('\n')
	if err != nil || line != "first\n" {
		t.Fatalf("first line %q, %v", line, err)
	}
	if ci := ts.Commands()[0]; ci.Exited {
		t.Fatal("the command had exited before its first line arrived: output is not streamed")
	}
	rest, err := io.ReadAll(r)
	if err != nil || string(rest) != "second\n" {
		t.Fatalf("rest %q, %v", rest, err)
	}
	cmd.Wait()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if cmd.ExitCode() != 0 {
		t.Errorf("exit code %d", cmd.ExitCode())
	}
	cmd.Close()
	timedOut := 0
	for _, e := range ts.Events() {
		if e.Fault == "w:TimedOut" {
			timedOut++
		}
	}
	if timedOut == 0 {
		t.Error("no Receive timed out during the 1 s sleep with a 100 ms wait cap")
	}
}

func TestLargeOutput(t *testing.T) {
	ts := Start(t, Config{Username: user, Password: pass})
	c := client(t, ts, pass, false, nil)
	const n = 1 << 20
	var out bytes.Buffer
	code, err := c.Run("head -c "+strconv.Itoa(n)+" /dev/zero | tr '\\0' x", &out, io.Discard)
	if err != nil || code != 0 {
		t.Fatal(code, err)
	}
	if out.Len() != n || strings.Trim(out.String(), "x") != "" {
		t.Fatalf("got %d bytes, want %d x", out.Len(), n)
	}
	receives := 0
	for _, e := range ts.Events() {
		if e.Action == ActionReceive && e.Status == http.StatusOK {
			receives++
		}
	}
	t.Logf("%d bytes in %d Receives", n, receives)
	if min := n / (150 * 1024); receives < min {
		t.Errorf("%d Receives for %d bytes: responses exceed the client's MaxEnvelopeSize", receives, n)
	}
}

// pidGone reports whether process pid is dead: gone or a zombie (orphans
// may wait for a reaper that is slow or missing in containers).
func pidGone(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return errors.Is(err, fs.ErrNotExist)
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	return len(f) > 0 && (f[0] == "Z" || f[0] == "X")
}

// groupGone reports whether no live process is in process group pgid.
func groupGone(pgid int) bool {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		panic(err)
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if len(f) > 3 && f[2] == strconv.Itoa(pgid) && !pidGone(pid) {
			return false
		}
	}
	return true
}

func TestTerminateKillsProcessGroup(t *testing.T) {
	ts, cmd := execute(t, Config{Username: user, Password: pass}, "sleep 30 & echo $!; wait")
	go io.Copy(io.Discard, cmd.Stderr)
	line, err := bufio.NewReader(cmd.Stdout).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	child, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatal(err)
	}
	shellPID := ts.Commands()[0].PID
	if pidGone(child) || pidGone(shellPID) {
		t.Fatal("processes gone before the signal")
	}
	start := time.Now()
	if err := cmd.Close(); err != nil { // sends Signal terminate
		t.Fatal(err)
	}
	cmd.Wait()
	if !pidGone(child) || !pidGone(shellPID) {
		t.Errorf("after terminate: sh %d gone %v, sleep %d gone %v", shellPID, pidGone(shellPID), child, pidGone(child))
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("terminate took %s", d)
	}
	ci := ts.Commands()[0]
	if !ci.Exited || ci.ExitCode != 128+int(syscall.SIGKILL) {
		t.Errorf("command info %+v, want exited by SIGKILL", ci)
	}
}

func TestCtrlCAndDeleteKillsLeftovers(t *testing.T) {
	ts := Start(t, Config{Username: user, Password: pass})
	c := client(t, ts, pass, false, nil)
	shell, err := c.CreateShell()
	if err != nil {
		t.Fatal(err)
	}
	cmd, err := shell.Execute(`trap 'echo got-int; exit 7' INT; sleep 60 >/dev/null 2>&1 & echo ready; while :; do sleep 0.05; done`)
	if err != nil {
		t.Fatal(err)
	}
	go io.Copy(io.Discard, cmd.Stderr)
	r := bufio.NewReader(cmd.Stdout)
	if line, err := r.ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("%q %v", line, err)
	}
	ci := ts.Commands()[0]
	// Signal ctrl_c: masterzen only sends terminate, so rewrite its request.
	req := winrm.NewSignalRequest(ts.URL, ci.ShellID, ci.CommandID, winrm.DefaultParameters).String()
	req = strings.Replace(req, SignalTerminate, SignalCtrlC, 1)
	if resp := post(t, ts, user, pass, "application/soap+xml;charset=UTF-8", req); resp.StatusCode != http.StatusOK {
		t.Fatalf("ctrl_c: status %d", resp.StatusCode)
	}
	rest, _ := io.ReadAll(r)
	cmd.Wait()
	if string(rest) != "got-int\n" || cmd.ExitCode() != 7 {
		t.Errorf("after ctrl_c: output %q, exit code %d", rest, cmd.ExitCode())
	}
	if !pidGone(ci.PID) {
		t.Errorf("pid %d still there after its exit was reported", ci.PID)
	}
	// The background sleep ignores SIGINT (as background jobs of a
	// non-interactive sh do) and survived; deleting the shell kills it.
	if groupGone(ci.PID) {
		t.Fatal("the background sleep is not running")
	}
	if err := shell.Close(); err != nil {
		t.Fatal(err)
	}
	if !groupGone(ci.PID) {
		t.Errorf("process group %d survived the shell's deletion", ci.PID)
	}
}

func post(t *testing.T, ts *TestServer, u, p, contentType, body string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, ts.URL, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", contentType)
	req.SetBasicAuth(u, p)
	resp, err := ts.HTTP.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(b))
	return resp
}

func TestFaults(t *testing.T) {
	ts := Start(t, Config{Username: user, Password: pass})
	create := winrm.NewOpenShellRequest(ts.URL, nil).String()
	for _, tc := range []struct {
		name, contentType, body string
		status                  int
		want                    string
	}{
		{"not xml", "application/soap+xml", "not xml", 500, "w:SchemaValidationError"},
		{"unknown action", "application/soap+xml", strings.Replace(create, ActionCreate, NSTransfer+"/Get", 1), 500, "a:ActionNotSupported"},
		{"unknown resource", "application/soap+xml", strings.Replace(create, ResourceCmd, NSShell+"/nope", 1), 500, "w:DestinationUnreachable"},
		{"unknown shell", "application/soap+xml", winrm.NewDeleteShellRequest(ts.URL, "NOPE", nil).String(), 500, "w:InvalidSelectors"},
		{"receive unknown command", "application/soap+xml", winrm.NewGetOutputRequest(ts.URL, "NOPE", "X", "stdout", nil).String(), 500, "w:InvalidSelectors"},
		{"wrong content type", "text/plain", create, 415, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := post(t, ts, user, pass, tc.contentType, tc.body)
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.status || !strings.Contains(string(b), tc.want) {
				t.Fatalf("status %d body %s; want %d with %s", resp.StatusCode, b, tc.status, tc.want)
			}
			if tc.status == 500 && (!strings.Contains(string(b), ActionFault) || !strings.Contains(string(b), "f:WSManFault")) {
				t.Errorf("fault without the fault action or WSManFault detail: %s", b)
			}
		})
	}
	if ts.OpenShells() != 0 {
		t.Error("a faulted request created a shell")
	}
	// Oversized request.
	small := Start(t, Config{Username: user, Password: pass, MaxEnvelopeSize: 10000})
	resp := post(t, small, user, pass, "application/soap+xml", create+strings.Repeat(" ", 20000))
	if b, _ := io.ReadAll(resp.Body); resp.StatusCode != 500 || !strings.Contains(string(b), "w:EncodingLimit") {
		t.Errorf("oversized request: %d %s", resp.StatusCode, b)
	}
}

func TestShimsAndStdinProgram(t *testing.T) {
	const loader = "$p = [Console]::In.ReadToEnd()\nInvoke-Expression $p"
	const helper = "Write-Output \"helper $mayflyName\""
	ts := Start(t, Config{Username: user, Password: pass, Interpreter: Sh, Shims: map[string]Shim{
		loader: {StdinProgram: true},
		helper: {Sh: `echo "helper $mayflyName"`},
	}})
	c := client(t, ts, pass, false, nil)
	// A shim body with its prelude.
	stdout, stderr, code, err := c.RunWithString(psCommand("$mayflyName = 'it''s'\r\n"+helper+"\r\n"), "")
	if err != nil || stdout != "helper it's\n" || code != 0 {
		t.Fatalf("helper: (%q, %q, %d, %v)", stdout, stderr, code, err)
	}
	// A stdin program: env prelude plus an sh body, fed after the process started.
	prog := "$env:GREETING = 'hi ‘‘there’’s'\necho \"$GREETING\"; cat; exit 5\n"
	stdin := base64.StdEncoding.EncodeToString([]byte(prog))
	var out, errb bytes.Buffer
	code, err = c.RunWithInput(psCommand("$ProgressPreference = 'SilentlyContinue'\n"+loader), &out, &errb,
		strings.NewReader(stdin[:10]+"\n"+stdin[10:]))
	if err != nil || out.String() != "hi ‘there’s\n" || code != 5 {
		t.Fatalf("stdin program: (%q, %q, %d, %v)", out.String(), errb.String(), code, err)
	}
	if argv := ts.Commands()[1].Argv; strings.Join(argv, " ") != "/bin/sh -s" {
		t.Errorf("stdin program argv %q", argv)
	}
}

// psCommand encodes script like winrm.Powershell does, without its prefix.
func psCommand(script string) string {
	u := utf16.Encode([]rune(script))
	b := make([]byte, 2*len(u))
	for i, c := range u {
		b[2*i], b[2*i+1] = byte(c), byte(c>>8)
	}
	return "powershell.exe -NoProfile -EncodedCommand " + base64.StdEncoding.EncodeToString(b)
}
