package sshexec_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/vmexec"
	"github.com/mayfly-ci/mayfly/vmexec/sshexec"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

var kinds = []sshtest.Kind{sshtest.OpenSSH, sshtest.Dropbear}

// eachServer runs f once against a fresh OpenSSH and once against a fresh dropbear.
func eachServer(t *testing.T, f func(t *testing.T, srv *sshtest.Server)) {
	for _, k := range kinds {
		t.Run(string(k), func(t *testing.T) { f(t, sshtest.Run(t, k)) })
	}
}

func dial(t *testing.T, srv *sshtest.Server, mod func(*sshexec.Target)) *sshexec.Client {
	t.Helper()
	tg := srv.Target()
	tg.Logger = testLogger(t, nil)
	if mod != nil {
		mod(&tg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := sshexec.Dial(ctx, tg)
	if err != nil {
		t.Fatalf("dial %s: %v\nserver log:\n%s", srv.Kind, err, srv.Log())
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// logBuf collects debug logs so tests can count retries.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.b.String(), s)
}

func testLogger(t *testing.T, buf *logBuf) *slog.Logger {
	var w io.Writer = io.Discard
	if buf != nil {
		w = buf
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// uniqueSleep returns an argument for sleep that no other process uses, so
// leftover processes can be found by their command line.
func uniqueSleep(t *testing.T) string {
	n, err := rand.Int(rand.Reader, big.NewInt(1_000_000))
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprint(10_000_000 + n.Int64())
}

// remoteProcs lists processes whose command line starts with "sleep arg",
// looked up through a new session with /proc (busybox has no pgrep).
func remoteProcs(t *testing.T, c *sshexec.Client, arg string) string {
	t.Helper()
	var out bytes.Buffer
	script := `for d in /proc/[0-9]*; do c=$(tr '\0' ' ' 2>/dev/null <"$d/cmdline") || continue; ` +
		`case "$c" in "sleep ` + arg + ` "*) echo "${d#/proc/} $c";; esac; done`
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	code, err := c.Run(ctx, vmexec.Command{Script: script, Stdout: &out, Stderr: &out})
	if err != nil || code != 0 {
		t.Fatalf("list processes: code %d, err %v: %s", code, err, out.String())
	}
	return strings.TrimSpace(out.String())
}

func run(t *testing.T, c *sshexec.Client, cmd vmexec.Command) (int, string, string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	code, err := c.Run(ctx, cmd)
	return code, out.String(), errb.String(), err
}

func TestRun(t *testing.T) {
	tests := []struct {
		name        string
		cmd         vmexec.Command
		code        int
		stdout      string
		stderr      string
		stderrHas   string // instead of stderr: the login shell's own wording varies
		opensshOnly bool
	}{
		{name: "echo", cmd: vmexec.Command{Script: "echo hello"}, stdout: "hello\n"},
		{name: "exit 0", cmd: vmexec.Command{Script: "true\nexit 0"}, code: 0},
		{name: "exit 1", cmd: vmexec.Command{Script: "false"}, code: 1},
		{name: "exit 3", cmd: vmexec.Command{Script: "echo before; exit 3; echo after"}, code: 3, stdout: "before\n"},
		{name: "command not found 127", cmd: vmexec.Command{Script: "no-such-command-mayfly 2>/dev/null"}, code: 127},
		{name: "killed by signal 137", cmd: vmexec.Command{Script: "kill -9 $$"}, code: 137, stderrHas: "Killed"},
		{name: "stderr", cmd: vmexec.Command{Script: "echo out; echo err >&2; echo err2 1>&2"}, stdout: "out\n", stderr: "err\nerr2\n"},
		{name: "unicode", cmd: vmexec.Command{Script: "printf 'héllo wörld ✓ 日本語 🚀\\n'; echo 'ошибка' >&2"},
			stdout: "héllo wörld ✓ 日本語 🚀\n", stderr: "ошибка\n"},
		{name: "no trailing newline", cmd: vmexec.Command{Script: "echo a; echo b"}, stdout: "a\nb\n"},
		{name: "multi-line heredoc and function", cmd: vmexec.Command{Script: "f() {\n  echo \"f:$1\"\n}\nf x\ncat <<'EOF'\n}\n$HOME\nEOF\nf y\n"},
			stdout: "f:x\n}\n$HOME\nf:y\n"},
		{name: "script cannot read its own text from stdin", cmd: vmexec.Command{Script: "cat\necho after-cat\nread x || echo eof"},
			stdout: "after-cat\neof\n"},
		{name: "set -e", cmd: vmexec.Command{Script: "set -e\nfalse\necho unreachable"}, code: 1},
		{name: "env", cmd: vmexec.Command{
			Env:    []string{"FOO=a b'c\"$HOME`x`", "EMPTY=", "UNI=ü✓", "MULTI=l1\nl2"},
			Script: `printf '%s|%s|%s|%s\n' "$FOO" "$EMPTY" "$UNI" "$MULTI"`},
			stdout: "a b'c\"$HOME`x`||ü✓|l1\nl2\n"},
		{name: "marker-like output passes", cmd: vmexec.Command{Script: "echo mayfly-pgid:0123:456 >&2"}, stderr: "mayfly-pgid:0123:456\n"},
		{name: "own process group", cmd: vmexec.Command{Script: `read -r _ _ _ _ g _ </proc/$$/stat; [ "$g" = "$$" ] && echo leader`}, stdout: "leader\n"},
		{name: "bash", cmd: vmexec.Command{Shell: "bash", Script: `[ -n "$BASH_VERSION" ] && echo bash`}, stdout: "bash\n", opensshOnly: true},
	}
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		c := dial(t, srv, nil)
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				if tt.opensshOnly && srv.Kind != sshtest.OpenSSH {
					t.Skipf("the %s test userland is busybox only", srv.Kind)
				}
				code, out, errOut, err := run(t, c, tt.cmd)
				if err != nil {
					t.Fatalf("Run: %v", err)
				}
				if tt.stderrHas != "" && strings.Contains(errOut, tt.stderrHas) {
					errOut = tt.stderr
				}
				if code != tt.code || out != tt.stdout || errOut != tt.stderr {
					t.Errorf("got code %d stdout %q stderr %q, want %d %q %q", code, out, errOut, tt.code, tt.stdout, tt.stderr)
				}
			})
		}
	})
}

// signalWriter closes ready when the output so far contains want.
type signalWriter struct {
	mu    sync.Mutex
	b     bytes.Buffer
	want  string
	ready chan struct{}
	once  sync.Once
}

func newSignalWriter(want string) *signalWriter {
	return &signalWriter{want: want, ready: make(chan struct{})}
}

func (w *signalWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.b.Write(p)
	if strings.Contains(w.b.String(), w.want) {
		w.once.Do(func() { close(w.ready) })
	}
	return len(p), nil
}

func (w *signalWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

func TestStreamsOutputWhileRunning(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		c := dial(t, srv, nil)
		gate := filepath.Join(t.TempDir(), "gate")
		// The script cannot finish before the test saw "first": it waits for
		// the gate file the test creates only then.
		out := newSignalWriter("first\n")
		type result struct {
			code int
			err  error
		}
		res := make(chan result, 1)
		go func() {
			code, err := c.Run(context.Background(), vmexec.Command{
				Script: fmt.Sprintf("echo first\necho first-err >&2\ni=0; while [ ! -e %s ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\necho second", gate),
				Stdout: out, Stderr: out,
			})
			res <- result{code, err}
		}()
		select {
		case <-out.ready:
		case r := <-res:
			t.Fatalf("Run returned before first output was streamed: %+v, output %q", r, out.String())
		case <-time.After(20 * time.Second):
			t.Fatal("no streamed output within 20s")
		}
		if err := os.WriteFile(gate, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		r := <-res
		if r.err != nil || r.code != 0 {
			t.Fatalf("Run: code %d err %v", r.code, r.err)
		}
		// stdout and stderr are separate streams: only the order within one is kept.
		got := out.String()
		if !strings.Contains(got, "first-err\n") || strings.Index(got, "first\n") > strings.Index(got, "second\n") {
			t.Errorf("output %q: want first before second, and first-err", got)
		}
	})
}

// countWriter counts bytes and writes and checks every byte is 'a'.
type countWriter struct {
	n, writes int
	bad       bool
}

func (w *countWriter) Write(p []byte) (int, error) {
	w.n += len(p)
	w.writes++
	if bytes.IndexFunc(p, func(r rune) bool { return r != 'a' }) >= 0 {
		w.bad = true
	}
	return len(p), nil
}

func TestLargeOutput(t *testing.T) {
	const size = 10 << 20
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		c := dial(t, srv, nil)
		var w countWriter
		var errb bytes.Buffer
		start := time.Now()
		code, err := c.Run(context.Background(), vmexec.Command{
			Script: fmt.Sprintf("head -c %d /dev/zero | tr '\\0' a", size),
			Stdout: &w, Stderr: &errb,
		})
		elapsed := time.Since(start)
		if err != nil || code != 0 {
			t.Fatalf("Run: code %d err %v stderr %q", code, err, errb.String())
		}
		if w.n != size || w.bad {
			t.Fatalf("got %d bytes (bad bytes: %v), want %d of 'a'", w.n, w.bad, size)
		}
		if w.writes < 10 {
			t.Errorf("10 MB arrived in %d writes; want it streamed in chunks", w.writes)
		}
		t.Logf("%s: 10 MB in %d writes, %v (%.1f MB/s)", srv.Kind, w.writes, elapsed, float64(size)/(1<<20)/elapsed.Seconds())
	})
}

func TestCancelKillsProcessGroup(t *testing.T) {
	tests := []struct {
		name   string
		script string // %[1]s is the unique sleep argument
		cancel func(context.CancelFunc, *signalWriter)
		want   error
	}{
		{
			name:   "cancel",
			script: "sleep %[1]s & sleep %[1]s & (sleep %[1]s; echo never) & echo started; wait",
			cancel: func(cancel context.CancelFunc, w *signalWriter) { <-w.ready; cancel() },
			want:   context.Canceled,
		},
		{
			name: "TERM ignored needs KILL",
			// trap '' is inherited: every process of the group ignores SIGTERM.
			script: "trap '' TERM; sleep %[1]s & sleep %[1]s & echo started; wait",
			cancel: func(cancel context.CancelFunc, w *signalWriter) { <-w.ready; cancel() },
			want:   context.Canceled,
		},
		{
			name:   "timeout",
			script: "echo started; sleep %[1]s; echo never",
			want:   context.DeadlineExceeded,
		},
	}
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		c := dial(t, srv, func(tg *sshexec.Target) { tg.KillGrace = time.Second })
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				arg := uniqueSleep(t)
				out := newSignalWriter("started\n")
				var ctx context.Context
				var cancel context.CancelFunc
				if tt.cancel == nil {
					ctx, cancel = context.WithTimeout(context.Background(), 700*time.Millisecond)
				} else {
					ctx, cancel = context.WithCancel(context.Background())
					go tt.cancel(cancel, out)
				}
				defer cancel()
				code, err := c.Run(ctx, vmexec.Command{Script: fmt.Sprintf(tt.script, arg), Stdout: out, Stderr: out})
				var ae *vmexec.AbortedError
				if !errors.As(err, &ae) {
					t.Fatalf("Run: code %d err %v (%T), want *vmexec.AbortedError", code, err, err)
				}
				if !errors.Is(err, tt.want) || vmexec.IsSystemFailure(err) || !ae.Killed || code != -1 {
					t.Errorf("err %v, Killed %v, KillErr %v, code %d: want %v, killed", err, ae.Killed, ae.KillErr, code, tt.want)
				}
				if strings.Contains(out.String(), "never") {
					t.Errorf("script went on after abort: %q", out.String())
				}
				if left := remoteProcs(t, c, arg); left != "" {
					t.Errorf("processes survived the abort:\n%s", left)
				}
			})
		}
	})
}

func TestLeftoverBackgroundProcessesDoNotHang(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		c := dial(t, srv, func(tg *sshexec.Target) { tg.DrainTimeout = 300 * time.Millisecond })
		arg := uniqueSleep(t)
		// The background sleep keeps stdout open after the shell exits. OpenSSH
		// then keeps the channel open (the classic "ssh hangs" case); dropbear
		// closes it at once. Either way Run must return the shell's status.
		code, out, _, err := run(t, c, vmexec.Command{Script: "sleep " + arg + " &\necho bg\nexit 4"})
		if err != nil || code != 4 || out != "bg\n" {
			t.Fatalf("Run: code %d out %q err %v; want 4, \"bg\\n\", nil", code, out, err)
		}
		left := remoteProcs(t, c, arg)
		t.Logf("%s: leftover after Run: %q", srv.Kind, left)
		if srv.Kind == sshtest.OpenSSH && left != "" {
			t.Errorf("the process holding the output open was not killed after DrainTimeout:\n%s", left)
		}
	})
}

func TestConcurrentSessions(t *testing.T) {
	const n = 8
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		c := dial(t, srv, nil)
		var wg sync.WaitGroup
		errs := make(chan error, n)
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var out bytes.Buffer
				code, err := c.Run(context.Background(), vmexec.Command{
					Script: fmt.Sprintf("echo start %d; sleep 0.3; exit %d", i, i),
					Stdout: &out,
				})
				if err != nil || code != i || out.String() != fmt.Sprintf("start %d\n", i) {
					errs <- fmt.Errorf("session %d: code %d out %q err %v", i, code, out.String(), err)
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})
}

func TestUpload(t *testing.T) {
	binary := make([]byte, 70_000)
	for i := range binary {
		binary[i] = byte(i * 7)
	}
	tests := []struct {
		name    string
		content []byte
		mode    os.FileMode
	}{
		{"script 0750", []byte("#!/bin/sh\necho uploaded ✓\n"), 0o750},
		{"binary with NUL 0600", binary, 0o600},
		{"empty 0644", nil, 0o644},
	}
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		c := dial(t, srv, nil)
		dir := t.TempDir() // the same /tmp is visible to both servers
		p := filepath.Join(dir, "a b", "sub", "file's")
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				if err := c.Upload(ctx, p, tt.content, tt.mode); err != nil {
					t.Fatalf("Upload: %v", err)
				}
				// Checked through the remote side...
				code, out, errOut, err := run(t, c, vmexec.Command{
					Env:    []string{"P=" + p},
					Script: `stat -c '%a %s' "$P"`,
				})
				want := fmt.Sprintf("%o %d\n", tt.mode, len(tt.content))
				if err != nil || code != 0 || out != want {
					t.Errorf("remote stat: code %d out %q stderr %q err %v, want %q", code, out, errOut, err, want)
				}
				// ...and on the disk they share with the test.
				got, err := os.ReadFile(p)
				if err != nil || !bytes.Equal(got, tt.content) {
					t.Errorf("content differs: %d bytes, err %v; want %d bytes", len(got), err, len(tt.content))
				}
			})
		}
		t.Run("runs uploaded script", func(t *testing.T) {
			if err := c.Upload(context.Background(), p, []byte("#!/bin/sh\necho uploaded ✓\n"), 0o755); err != nil {
				t.Fatal(err)
			}
			code, out, _, err := run(t, c, vmexec.Command{Env: []string{"P=" + p}, Script: `"$P"`})
			if err != nil || code != 0 || out != "uploaded ✓\n" {
				t.Errorf("code %d out %q err %v", code, out, err)
			}
		})
		t.Run("errors", func(t *testing.T) {
			blocker := filepath.Join(dir, "plainfile")
			if err := os.WriteFile(blocker, []byte("x"), 0o644); err != nil {
				t.Fatal(err)
			}
			for _, bad := range []string{"relative/path", "/tmp/../etc/x", "/", blocker + "/under-a-file"} {
				err := c.Upload(context.Background(), bad, []byte("x"), 0o644)
				if !vmexec.IsSystemFailure(err) {
					t.Errorf("Upload(%q): err %v, want a *vmexec.SystemError", bad, err)
				}
			}
			ents, _ := os.ReadDir(filepath.Dir(p))
			for _, e := range ents {
				if strings.Contains(e.Name(), ".mayfly-") {
					t.Errorf("temporary file left behind: %s", e.Name())
				}
			}
		})
	})
}

func TestBadCommand(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		c := dial(t, srv, nil)
		tests := []struct {
			name string
			cmd  vmexec.Command
			want string
		}{
			{"shell with spaces", vmexec.Command{Shell: "bash -e", Script: "true"}, "Command.Shell"},
			{"shell with quote", vmexec.Command{Shell: "sh'", Script: "true"}, "Command.Shell"},
			{"missing shell", vmexec.Command{Shell: "/nonexistent/shell", Script: "true"}, "did not start the script"},
			{"env without =", vmexec.Command{Env: []string{"FOO"}, Script: "true"}, "env[0]"},
			{"env bad name", vmexec.Command{Env: []string{"OK=1", "1BAD=x"}, Script: "true"}, `"1BAD"`},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				code, _, _, err := run(t, c, tt.cmd)
				if !vmexec.IsSystemFailure(err) || !strings.Contains(err.Error(), tt.want) || code != -1 {
					t.Errorf("code %d err %v, want SystemError mentioning %q", code, err, tt.want)
				}
			})
		}
	})
}

// failingWriter accepts n bytes, then fails every write.
type failingWriter struct{ n int }

func (w *failingWriter) Write(p []byte) (int, error) {
	if w.n -= len(p); w.n < 0 {
		return 0, errors.New("trace full")
	}
	return len(p), nil
}

func TestOutputWriterErrorDoesNotStall(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		c := dial(t, srv, nil)
		// 1 MB of output against a writer that fails after 10 bytes: the
		// channel must still be drained so the script can finish.
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		code, err := c.Run(ctx, vmexec.Command{
			Script: "head -c 1048576 /dev/zero; exit 5",
			Stdout: &failingWriter{n: 10},
		})
		if code != 5 || !vmexec.IsSystemFailure(err) || !strings.Contains(err.Error(), "trace full") {
			t.Errorf("code %d err %v: want 5 and a SystemError naming the writer's error", code, err)
		}
	})
}

// Sessions that start while another session of the connection ends all
// run: dropbear sometimes closes such a session before it answers the exec
// request, and the client tries again.
func TestSessionsStartingWhileOthersEnd(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		c := dial(t, srv, nil)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		for i := range 20 {
			done := make(chan error, 1)
			go func() {
				_, err := c.Run(ctx, vmexec.Command{Script: "echo a; sleep 0.05"})
				done <- err
			}()
			time.Sleep(time.Duration(40+i) * time.Millisecond)
			for j := range 3 {
				var out bytes.Buffer
				if code, err := c.Run(ctx, vmexec.Command{Script: "echo b", Stdout: &out}); err != nil || code != 0 || out.String() != "b\n" {
					t.Errorf("run %d/%d: %d %v %q", i, j, code, err, out.String())
				}
			}
			if err := <-done; err != nil {
				t.Errorf("run %d: %v", i, err)
			}
		}
	})
}
