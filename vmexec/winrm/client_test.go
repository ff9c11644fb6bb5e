package winrm

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/vmexec"
	"github.com/mayfly-ci/mayfly/vmexec/winrm/wsmantest"
)

const (
	testUser = "mayfly"
	testPass = "pa'ss w0rd"
)

var quiet = slog.New(slog.DiscardHandler)

func serverConfig(t *testing.T) wsmantest.Config {
	return wsmantest.Config{
		Username: testUser, Password: testPass, Shims: shims(), Dir: t.TempDir(),
		MaxReceiveWait: 2 * time.Second,
	}
}

func target(ts *wsmantest.TestServer) Target {
	return Target{
		Addr: ts.Host, Port: ts.Port, Username: testUser, Password: testPass,
		ConnectTimeout: 5 * time.Second, AttemptTimeout: 5 * time.Second,
		RequestTimeout: 10 * time.Second, OperationTimeout: 5 * time.Second, KillTimeout: 10 * time.Second,
		Logger: quiet,
	}
}

func dial(t *testing.T, tg Target) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := Dial(ctx, tg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func setup(t *testing.T) (*wsmantest.TestServer, *Client) {
	ts := wsmantest.Start(t, serverConfig(t))
	return ts, dial(t, target(ts))
}

// script picks the variant for the interpreter the test server runs
// PowerShell with: real pwsh when installed, sh otherwise.
func script(ts *wsmantest.TestServer, sh, ps string) string {
	if ts.Interpreter() == wsmantest.Pwsh {
		return ps
	}
	return sh
}

func run(t *testing.T, c *Client, cmd vmexec.Command) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	code, err := c.Run(ctx, cmd)
	if err != nil {
		t.Fatalf("run: %v (stderr %q)", err, errb.String())
	}
	return out.String(), errb.String(), code
}

func TestRunExitCodesAndStderr(t *testing.T) {
	ts, c := setup(t)
	for _, code := range []int{0, 1, 3} {
		s := script(ts,
			fmt.Sprintf("echo out; echo err >&2; exit %d", code),
			fmt.Sprintf("Write-Output out; [Console]::Error.WriteLine('err'); exit %d", code))
		stdout, stderr, got := run(t, c, vmexec.Command{Script: s})
		if stdout != "out\n" || stderr != "err\n" || got != code {
			t.Errorf("exit %d: got (%q, %q, %d)", code, stdout, stderr, got)
		}
	}
	if n := ts.OpenShells(); n != 0 {
		t.Errorf("%d shells left open", n)
	}
	for _, ci := range ts.Commands() {
		if !strings.HasPrefix(ci.CommandLine, "powershell -NoLogo -NoProfile -NonInteractive -ExecutionPolicy Bypass -EncodedCommand ") {
			t.Errorf("command line %.80q", ci.CommandLine)
		}
		if len(ci.Signals) != 1 || ci.Signals[0] != wsmantest.SignalTerminate {
			t.Errorf("signals after completion %v, want the final terminate", ci.Signals)
		}
		if ci.Options["WINRS_CONSOLEMODE_STDIN"] != "FALSE" {
			t.Errorf("options %v: stdin must be a pipe, not console input", ci.Options)
		}
	}
}

func TestRunConcurrent(t *testing.T) {
	ts, c := setup(t)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var out bytes.Buffer
			code, err := c.Run(context.Background(), vmexec.Command{
				Script: script(ts, fmt.Sprintf("sleep 0.2; echo run %d; exit %d", i, i), fmt.Sprintf("Start-Sleep -Milliseconds 200; Write-Output 'run %d'; exit %d", i, i)),
				Stdout: &out,
			})
			if err != nil || code != i || out.String() != fmt.Sprintf("run %d\n", i) {
				errs <- fmt.Errorf("run %d: %d %q %v", i, code, out.String(), err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// firstWrite records whether the server's command had already exited when
// the first output reached the writer.
type firstWrite struct {
	ts   *wsmantest.TestServer
	mu   sync.Mutex
	buf  bytes.Buffer
	seen bool
	// exitedAtFirst is the command's state at the first write.
	exitedAtFirst bool
	at            time.Time
}

func (w *firstWrite) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.seen {
		w.seen, w.at = true, time.Now()
		cmds := w.ts.Commands()
		w.exitedAtFirst = cmds[len(cmds)-1].Exited
	}
	return w.buf.Write(p)
}

func TestRunStreamsOutput(t *testing.T) {
	cfg := serverConfig(t)
	cfg.MaxReceiveWait = 200 * time.Millisecond // Receives time out during the sleep
	ts := wsmantest.Start(t, cfg)
	c := dial(t, target(ts))
	w := &firstWrite{ts: ts}
	start := time.Now()
	code, err := c.Run(context.Background(), vmexec.Command{
		Script: script(ts, "echo first; sleep 1; echo second", "Write-Output first; Start-Sleep 1; Write-Output second"),
		Stdout: w,
	})
	total := time.Since(start)
	if err != nil || code != 0 {
		t.Fatal(code, err)
	}
	if w.buf.String() != "first\nsecond\n" {
		t.Errorf("output %q", w.buf.String())
	}
	if w.exitedAtFirst {
		t.Error("the first output arrived only after the command exited")
	}
	if early := total - w.at.Sub(start); early < 500*time.Millisecond {
		t.Errorf("first output %s before Run returned, want about 1s", early)
	}
	timedOut := 0
	for _, e := range ts.Events() {
		if e.Fault == "w:TimedOut" {
			timedOut++
		}
	}
	if timedOut == 0 {
		t.Error("no Receive timed out: the w:TimedOut path was not exercised")
	}
}

func TestRunEnvQuoting(t *testing.T) {
	ts, c := setup(t)
	values := []string{"plain", "it's", "‘curly’ ‚low‛'", "$HOME `backtick` \"dq\" $(id)", "multi\nline\n", "", "ünïcødé ✓", "a;b&c|d"}
	var env []string
	var names []string
	for i, v := range values {
		n := "MAYFLY_V" + strconv.Itoa(i)
		env = append(env, n+"="+v)
		names = append(names, n)
	}
	var sh, ps strings.Builder
	sh.WriteString("printf '%s\\0'")
	ps.WriteString("[Console]::Out.Write((@(")
	for i, n := range names {
		sh.WriteString(` "$` + n + `"`)
		if i > 0 {
			ps.WriteString(", ")
		}
		ps.WriteString("$env:" + n)
	}
	ps.WriteString(") -join [char]0) + [char]0); exit 0")
	stdout, stderr, code := run(t, c, vmexec.Command{Script: script(ts, sh.String(), ps.String()), Env: env})
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	got := strings.Split(strings.TrimSuffix(stdout, "\x00"), "\x00")
	if len(got) != len(values) {
		t.Fatalf("got %d values %q", len(got), got)
	}
	for i := range values {
		if got[i] != values[i] {
			t.Errorf("%s = %q, want %q", names[i], got[i], values[i])
		}
	}
	// Bad input fails before anything is sent.
	before := len(ts.Events())
	_, err := c.Run(context.Background(), vmexec.Command{Script: "exit 0", Env: []string{"1BAD=x"}})
	if !vmexec.IsSystemFailure(err) || !strings.Contains(err.Error(), "Command.Env") {
		t.Errorf("bad env name: %v", err)
	}
	_, err = c.Run(context.Background(), vmexec.Command{Script: "exit 0", Shell: "cmd & calc"})
	if !vmexec.IsSystemFailure(err) || !strings.Contains(err.Error(), "Command.Shell") {
		t.Errorf("bad shell: %v", err)
	}
	if after := len(ts.Events()); after != before {
		t.Errorf("invalid commands sent %d requests", after-before)
	}
}

func TestRunLargeScriptAndOutput(t *testing.T) {
	ts, c := setup(t)
	// A script far beyond cmd.exe's 8191-character command line.
	var b strings.Builder
	for i := 0; i < 3000; i++ {
		fmt.Fprintf(&b, script(ts, "echo line %d\n", "Write-Output 'line %d'\n"), i)
	}
	if b.Len() < 4*MaxCommandLine {
		t.Fatalf("script of %d bytes is too small for the test", b.Len())
	}
	stdout, _, code := run(t, c, vmexec.Command{Script: b.String() + "exit 0\n"})
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	if code != 0 || len(lines) != 3000 || lines[2999] != "line 2999" {
		t.Fatalf("exit %d, %d lines, last %q", code, len(lines), lines[len(lines)-1])
	}
	const n = 1 << 20
	stdout, _, code = run(t, c, vmexec.Command{Script: script(ts,
		fmt.Sprintf("head -c %d /dev/zero | tr '\\0' x; exit 0", n),
		fmt.Sprintf("[Console]::Out.Write('x' * %d); exit 0", n))})
	if code != 0 || len(stdout) != n || strings.Trim(stdout, "x") != "" {
		t.Fatalf("exit %d, %d bytes of output, want %d", code, len(stdout), n)
	}
}

// pidGone reports whether process pid is dead: gone or a zombie.
func pidGone(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return errors.Is(err, fs.ErrNotExist)
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	return len(f) > 0 && (f[0] == "Z" || f[0] == "X")
}

// pidWriter passes each line that is a number to pids.
type pidWriter struct {
	pids chan int
	buf  []byte
}

func (w *pidWriter) Write(p []byte) (int, error) {
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			return len(p), nil
		}
		if n, err := strconv.Atoi(string(w.buf[:i])); err == nil {
			w.pids <- n
		}
		w.buf = w.buf[i+1:]
	}
}

func TestRunCancelKillsRemoteProcesses(t *testing.T) {
	ts, c := setup(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w := &pidWriter{pids: make(chan int, 2)}
	type result struct {
		code int
		err  error
	}
	res := make(chan result, 1)
	go func() {
		code, err := c.Run(ctx, vmexec.Command{
			Script: script(ts, "echo $$; sleep 30 & echo $!; wait",
				"Write-Output $PID; $p = Start-Process -PassThru sleep 30; Write-Output $p.Id; Wait-Process -Id $p.Id"),
			Stdout: w,
		})
		res <- result{code, err}
	}()
	var pids []int
	for len(pids) < 2 {
		select {
		case p := <-w.pids:
			pids = append(pids, p)
		case r := <-res:
			t.Fatalf("Run ended early: %d %v", r.code, r.err)
		case <-time.After(10 * time.Second):
			t.Fatal("no pids printed")
		}
	}
	for _, p := range pids {
		if pidGone(p) {
			t.Fatalf("pid %d gone before the cancel", p)
		}
	}
	start := time.Now()
	cancel()
	r := <-res
	var ae *vmexec.AbortedError
	if !errors.As(r.err, &ae) || !errors.Is(r.err, context.Canceled) || !ae.Killed {
		t.Fatalf("Run after cancel: %d, %v; want AbortedError with Killed", r.code, r.err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("abort took %s", d)
	}
	for _, p := range pids {
		if !pidGone(p) {
			t.Errorf("remote process %d survived the cancel", p)
		}
	}
	ci := ts.Commands()[0]
	if len(ci.Signals) == 0 || ci.Signals[0] != wsmantest.SignalTerminate {
		t.Errorf("signals %v, want terminate", ci.Signals)
	}
	if ts.OpenShells() != 0 {
		t.Error("the aborted command's shell was not deleted")
	}
}

func TestRunTimeout(t *testing.T) {
	ts, c := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := c.Run(ctx, vmexec.Command{Script: script(ts, "sleep 30", "Start-Sleep 30")})
	if !vmexec.IsAborted(err) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Run past its deadline: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("took %s", d)
	}
	if ci := ts.Commands()[0]; !ci.Exited || !pidGone(ci.PID) {
		t.Errorf("remote process %d still running", ci.PID)
	}
	// A context that ended before Run sends nothing.
	before := len(ts.Events())
	if _, err := c.Run(ctx, vmexec.Command{Script: "exit 0"}); !vmexec.IsAborted(err) {
		t.Errorf("Run with an ended context: %v", err)
	}
	if len(ts.Events()) != before {
		t.Error("Run with an ended context sent requests")
	}
}

func TestCloseStopsRuns(t *testing.T) {
	ts, c := setup(t)
	res := make(chan error, 1)
	w := &pidWriter{pids: make(chan int, 1)}
	go func() {
		_, err := c.Run(context.Background(), vmexec.Command{Script: script(ts, "echo $$; sleep 30", "Write-Output $PID; Start-Sleep 30"), Stdout: w})
		res <- err
	}()
	var pid int
	select {
	case pid = <-w.pids:
	case <-time.After(10 * time.Second):
		t.Fatal("no pid printed")
	}
	c.Close()
	err := <-res
	if !vmexec.IsSystemFailure(err) || !errors.Is(err, ErrClosed) {
		t.Fatalf("Run during Close: %v", err)
	}
	if !pidGone(pid) {
		t.Errorf("remote process %d survived Close", pid)
	}
	if _, err := c.Run(context.Background(), vmexec.Command{Script: "exit 0"}); !errors.Is(err, ErrClosed) {
		t.Errorf("Run after Close: %v", err)
	}
	if err := c.Upload(context.Background(), "/tmp/x", nil, 0o644); !errors.Is(err, ErrClosed) {
		t.Errorf("Upload after Close: %v", err)
	}
}

func TestUploadMultiChunk(t *testing.T) {
	ts := wsmantest.Start(t, serverConfig(t))
	tg := target(ts)
	tg.UploadChunkSize = 64 << 10
	c := dial(t, tg)
	content := make([]byte, 300_000) // 5 chunks, the last one partial
	rand.Read(content)
	dst := filepath.Join(t.TempDir(), "new dir", "it's", "file.bin")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := c.Upload(ctx, dst, content, 0o755); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(dst)
	if err != nil || !bytes.Equal(got, content) {
		t.Fatalf("uploaded file differs (%d bytes, %v)", len(got), err)
	}
	if n := len(ts.Commands()); n != 6 {
		t.Errorf("%d commands, want 5 chunks + finalize", n)
	}
	// Replacing with smaller content, then an empty file.
	for _, data := range [][]byte{[]byte("short"), {}} {
		if err := c.Upload(ctx, dst, data, 0o644); err != nil {
			t.Fatal(err)
		}
		if got, _ := os.ReadFile(dst); !bytes.Equal(got, data) {
			t.Fatalf("after replace: %q, want %q", got, data)
		}
	}
	ents, _ := os.ReadDir(filepath.Dir(dst))
	if len(ents) != 1 {
		t.Errorf("directory holds %d entries, want only the file (temporary files left?)", len(ents))
	}
	if ts.OpenShells() != 0 {
		t.Error("upload left a shell open")
	}
	ended, cancelEnded := context.WithCancel(context.Background())
	cancelEnded()
	before := len(ts.Events())
	if err := c.Upload(ended, dst, content, 0o644); !vmexec.IsAborted(err) || !errors.Is(err, context.Canceled) {
		t.Errorf("Upload with an ended context: %v", err)
	}
	if len(ts.Events()) != before {
		t.Error("Upload with an ended context sent requests")
	}
	for _, bad := range []string{"relative/x", `C:\a\..\b`, ""} {
		if err := c.Upload(ctx, bad, content, 0o644); !vmexec.IsSystemFailure(err) || !strings.Contains(err.Error(), "path") {
			t.Errorf("Upload(%q): %v", bad, err)
		}
	}
}

// flaky breaks connections: it drops the nth request carrying stdin data
// before the server sees it, and the mth response reporting a command done
// after the server handled it.
type flaky struct {
	next             http.Handler
	sendN, doneM     int64
	sends, dones     atomic.Int64
	dropReq, dropRsp atomic.Int64
}

func hangUp(w http.ResponseWriter) {
	if conn, _, err := w.(http.Hijacker).Hijack(); err == nil {
		conn.Close()
	}
}

func (f *flaky) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	r.Body = io.NopCloser(bytes.NewReader(body))
	if bytes.Contains(body, []byte("windows/shell/Send<")) && f.sends.Add(1) == f.sendN {
		f.dropReq.Add(1)
		hangUp(w)
		return
	}
	rec := httptest.NewRecorder()
	f.next.ServeHTTP(rec, r)
	if bytes.Contains(rec.Body.Bytes(), []byte("CommandState/Done")) && f.dones.Add(1) == f.doneM {
		f.dropRsp.Add(1)
		hangUp(w)
		return
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	w.Write(rec.Body.Bytes())
}

func TestUploadRetriesTransportFailure(t *testing.T) {
	srv, err := wsmantest.New(serverConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	fl := &flaky{next: srv, sendN: 2, doneM: 4}
	hs := httptest.NewServer(fl)
	t.Cleanup(func() { srv.Close(); hs.Close() })
	ts := &wsmantest.TestServer{Server: srv, HTTP: hs, Host: "127.0.0.1"}
	ts.Port, _ = strconv.Atoi(hs.URL[strings.LastIndexByte(hs.URL, ':')+1:])
	tg := target(ts)
	tg.UploadChunkSize = 32 << 10
	c := dial(t, tg)
	content := bytes.Repeat([]byte("0123456789abcdef"), 8<<10) // 128 KiB, 4 chunks
	dst := filepath.Join(t.TempDir(), "f")
	if err := c.Upload(context.Background(), dst, content, 0o644); err != nil {
		t.Fatal(err)
	}
	if fl.dropReq.Load() != 1 || fl.dropRsp.Load() != 1 {
		t.Fatalf("dropped %d requests and %d responses, the test needs 1 each", fl.dropReq.Load(), fl.dropRsp.Load())
	}
	if got, _ := os.ReadFile(dst); !bytes.Equal(got, content) {
		t.Fatalf("file differs after retried chunks (%d bytes)", len(got))
	}
	// Chunk 2 lost its stdin and was sent again; chunk 4, the fourth command
	// reported done, was written but its reply lost, and was written again.
	if n := len(srv.Commands()); n != 7 {
		t.Errorf("%d commands, want 4 chunks + 2 retries + finalize", n)
	}
	if srv.OpenShells() != 0 {
		t.Error("shells left open")
	}
	// Remote failures are not retried.
	err = c.Upload(context.Background(), "/proc/mayfly-no-such-dir/f", content, 0o644)
	if !vmexec.IsSystemFailure(err) || !strings.Contains(err.Error(), "chunk at offset 0: remote exit status") {
		t.Errorf("upload into /proc: %v", err)
	}
}

func TestWrongPasswordRefused(t *testing.T) {
	ts := wsmantest.Start(t, serverConfig(t))
	tg := target(ts)
	tg.Password = "wrong"
	start := time.Now()
	_, err := Dial(context.Background(), tg)
	if !vmexec.IsSystemFailure(err) || !errors.Is(err, ErrAuth) || !strings.Contains(err.Error(), "401") {
		t.Fatalf("Dial with a wrong password: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("an authentication failure was retried for %s", d)
	}
	// With RetryAuth it keeps trying until ConnectTimeout.
	tg.RetryAuth, tg.ConnectTimeout = true, 1500*time.Millisecond
	if _, err := Dial(context.Background(), tg); !errors.Is(err, ErrAuth) || !strings.Contains(err.Error(), "attempts") {
		t.Errorf("Dial with RetryAuth: %v", err)
	}
	if ts.OpenShells() != 0 || len(ts.Commands()) != 0 {
		t.Error("rejected requests had effects")
	}
}

func TestNTLMFallsBackToBasic(t *testing.T) {
	ts := wsmantest.Start(t, serverConfig(t))
	tg := target(ts)
	tg.Auth = AuthNTLM
	c := dial(t, tg)
	stdout, _, code := run(t, c, vmexec.Command{Script: script(ts, "echo ntlm; exit 0", "Write-Output ntlm; exit 0")})
	if stdout != "ntlm\n" || code != 0 {
		t.Errorf("got %q %d", stdout, code)
	}
}

func TestTLSPinnedCertificate(t *testing.T) {
	ts := wsmantest.StartTLS(t, serverConfig(t))
	other := wsmantest.StartTLS(t, serverConfig(t))
	tg := target(ts)
	tg.HTTPS = true
	tg.ServerCertPEM = ts.CertPEM // names wsmantest.invalid, not 127.0.0.1
	c := dial(t, tg)
	stdout, _, code := run(t, c, vmexec.Command{Script: script(ts, "echo tls; exit 0", "Write-Output tls; exit 0")})
	if stdout != "tls\n" || code != 0 {
		t.Errorf("got %q %d", stdout, code)
	}

	tg.ServerCertPEM = other.CertPEM
	before := len(ts.Events())
	start := time.Now()
	_, err := Dial(context.Background(), tg)
	var ce *CertificateError
	if !vmexec.IsSystemFailure(err) || !errors.As(err, &ce) || !strings.Contains(err.Error(), "not the pinned one") {
		t.Fatalf("Dial with another pinned certificate: %v", err)
	}
	if ce.Want == ce.Got || ce.Got == "" || !strings.Contains(ce.Subject, wsmantest.CertName) {
		t.Errorf("certificate error %+v", ce)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("a certificate mismatch was retried for %s", d)
	}
	if got := len(ts.Events()); got != before {
		t.Errorf("the refused client reached the handler with %d requests", got-before)
	}

	// Without a pin the system roots do not know the self-signed certificate.
	tg.ServerCertPEM = nil
	start = time.Now()
	if _, err := Dial(context.Background(), tg); !vmexec.IsSystemFailure(err) || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("Dial without a pin: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("a certificate verification failure was retried for %s", d)
	}
}

func TestDialRetriesUntilServerUp(t *testing.T) {
	srv, err := wsmantest.New(serverConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewUnstartedServer(srv)
	t.Cleanup(func() { srv.Close(); hs.Close() })
	addr := hs.Listener.Addr().String()
	port, _ := strconv.Atoi(addr[strings.LastIndexByte(addr, ':')+1:])
	// Refuse connections at first: the listener exists but nothing accepts...
	// so answer 503 until the server is "up".
	var up atomic.Bool
	hs.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !up.Load() {
			http.Error(w, "booting", http.StatusServiceUnavailable)
			return
		}
		srv.ServeHTTP(w, r)
	})
	hs.Start()
	time.AfterFunc(600*time.Millisecond, func() { up.Store(true) })
	tg := Target{Addr: "127.0.0.1", Port: port, Username: testUser, Password: testPass, ConnectTimeout: 10 * time.Second, Logger: quiet}
	start := time.Now()
	c, err := Dial(context.Background(), tg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if d := time.Since(start); d < 500*time.Millisecond {
		t.Errorf("Dial returned after %s, before the server was up", d)
	}
	// An ended context stops the retries with its cause.
	up.Store(false)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, err := Dial(ctx, tg); !errors.Is(err, context.DeadlineExceeded) || vmexec.IsSystemFailure(err) {
		t.Errorf("Dial with an ending context: %v", err)
	}
}

// TestFaultSurfaces checks that a server fault reaches the caller as a
// SystemError naming it.
func TestFaultSurfaces(t *testing.T) {
	ts, c := setup(t)
	ctx := context.Background()
	err := c.deleteShell(ctx, "no-such-shell")
	if err != nil {
		t.Errorf("deleting an unknown shell counts as deleted: %v", err)
	}
	_, err = c.receive(ctx, "no-such-shell", "x", &outputs{})
	var fe *FaultError
	if !errors.As(err, &fe) || fe.Subcode != "w:InvalidSelectors" || fe.Status != 500 || !strings.Contains(fe.Message, "no-such-shell") {
		t.Errorf("receive on an unknown shell: %v", err)
	}
	if ts.OpenShells() != 0 {
		t.Error("shells left open")
	}
}
