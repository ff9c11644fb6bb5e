package detach_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/internal/testenv"

	"github.com/mayfly-ci/mayfly/vmexec"
	"github.com/mayfly-ci/mayfly/vmexec/detach"
	"github.com/mayfly-ci/mayfly/vmexec/sshexec"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

// Each test runs against a real OpenSSH (dash as sh, coreutils) and a real
// dropbear with a busybox userland like the microVMs'.
func eachServer(t *testing.T, f func(t *testing.T, srv *sshtest.Server)) {
	for _, k := range []sshtest.Kind{sshtest.OpenSSH, sshtest.Dropbear} {
		t.Run(string(k), func(t *testing.T) { s := sshtest.Run(t, k); serverLog = s.Log; f(t, s) })
	}
}

var serverLog func() string

func dial(t *testing.T, srv *sshtest.Server) *sshexec.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := sshexec.Dial(ctx, srv.Target())
	if err != nil {
		t.Fatalf("dial %s: %v", srv.Kind, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// countingExec counts the sessions run on an executor.
type countingExec struct {
	vmexec.Executor
	runs atomic.Int64
}

func (c *countingExec) Run(ctx context.Context, cmd vmexec.Command) (int, error) {
	c.runs.Add(1)
	return c.Executor.Run(ctx, cmd)
}

func newRunner(t *testing.T, exec vmexec.Executor, dir string, mod func(*detach.Options)) *detach.Runner {
	t.Helper()
	o := detach.Options{Dir: dir, Exec: exec, DrainTimeout: time.Second, KillGrace: time.Second,
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	if mod != nil {
		mod(&o)
	}
	r, err := detach.New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func run(t *testing.T, r *detach.Runner, s detach.Stage) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out bytes.Buffer
	code, err := r.Run(ctx, s, &out)
	if err != nil {
		t.Fatalf("Run %s: %v\noutput: %q\n%s", s.ID, err, out.String(), serverLog())
	}
	return code, out.String()
}

// A chain runs in one session: the first Run writes the scripts and
// files, starts the chain and follows it; the chained Runs only read.
func TestChainInOneSession(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		exec := &countingExec{Executor: dial(t, srv)}
		dir := filepath.Join(t.TempDir(), "job")
		fileVar := filepath.Join(t.TempDir(), "tmp", "SECRET_FILE")
		r := newRunner(t, exec, dir, func(o *detach.Options) {
			o.Files = []detach.File{{Path: fileVar, Content: []byte("it's a 'file'\n$HOME\n")}}
		})
		a := detach.Stage{ID: "00-a-1", Script: "echo a=$CI_JOB_STATUS; printf 'no newline'", Env: []string{"CI_JOB_STATUS=running"}}
		b := detach.Stage{ID: "01-b-1", Script: "cat \"$F\"; echo b >&2", Env: []string{"CI_JOB_STATUS=running", "F=" + fileVar}}
		c := detach.Stage{ID: "02-c-1", Script: "echo c=$CI_JOB_STATUS; exit 3", Env: []string{"CI_JOB_STATUS=success"}}
		d := detach.Stage{ID: "03-d-1", Script: "echo never"}
		first := a
		first.Then = []detach.Stage{b, c, d}
		for _, tt := range []struct {
			s    detach.Stage
			code int
			out  string
		}{
			{first, 0, "a=running\nno newline"},
			{b, 0, "it's a 'file'\n$HOME\nb\n"},
			{c, 3, "c=success\n"},
		} {
			code, out := run(t, r, tt.s)
			if code != tt.code || out != tt.out {
				t.Errorf("%s: %d %q, want %d %q", tt.s.ID, code, out, tt.code, tt.out)
			}
		}
		if n := exec.runs.Load(); n != 1 {
			t.Errorf("%d sessions for a chain of three stages, want 1", n)
		}
		if _, err := os.Stat(filepath.Join(dir, "s", "03-d-1.sup")); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("the stage after a failed one was started: %v", err)
		}
		if fi, err := os.Stat(fileVar); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("file variable: %v, mode %v; want 0600", err, fi.Mode())
		}
		if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
			t.Errorf("job dir: %v; want mode 0700", err)
		}
		// A stage that ran is found again, from any offset, and not rerun.
		code, out := run(t, r, detach.Stage{ID: "00-a-1", Script: "echo a=$CI_JOB_STATUS; printf 'no newline'", From: 4})
		if code != 0 || out != "nning\nno newline" {
			t.Errorf("reread from 4: %d %q", code, out)
		}
	})
}

// A manager that dies mid-stage leaves the stage running; a new Runner,
// with no memory of the first, follows it from the offset reached and
// gets the rest of the output and the exit code.
func TestReattachAfterManagerDeath(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		dir := filepath.Join(t.TempDir(), "job")
		script := `i=0; while [ $i -lt 8 ]; do echo line$i; i=$((i+1)); sleep 0.2; done; exit 7`
		first := newRunner(t, dial(t, srv), dir, nil)
		ctx, cancel := context.WithCancel(context.Background())
		var seen bytes.Buffer
		w := &notifyWriter{w: &seen, at: "line2\n", hit: cancel}
		_, err := first.Run(ctx, detach.Stage{ID: "00-s-1", Script: script}, w)
		if err == nil || !errors.Is(err, context.Canceled) {
			t.Fatalf("Run: %v, want the cancel", err)
		}
		first.Close() // the first manager is gone

		second := newRunner(t, dial(t, srv), dir, nil)
		code, rest := run(t, second, detach.Stage{ID: "00-s-1", Script: script, From: int64(seen.Len())})
		all := seen.String() + rest
		var want strings.Builder
		for i := range 8 {
			fmt.Fprintf(&want, "line%d\n", i)
		}
		if code != 7 || all != want.String() {
			t.Errorf("after reattach: %d %q, want 7 %q", code, all, want.String())
		}
	})
}

// notifyWriter calls hit once the output contains at.
type notifyWriter struct {
	mu  sync.Mutex
	w   *bytes.Buffer
	at  string
	hit func()
	did bool
}

func (n *notifyWriter) Write(p []byte) (int, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.w.Write(p)
	if !n.did && strings.Contains(n.w.String(), n.at) {
		n.did = true
		n.hit()
	}
	return len(p), nil
}

// Stop ends a running stage and every process it started, and the chain
// after it; the output until then can still be read.
func TestStop(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		exec := dial(t, srv)
		dir := filepath.Join(t.TempDir(), "job")
		r := newRunner(t, exec, dir, nil)
		pidFile := filepath.Join(t.TempDir(), "child")
		s := detach.Stage{ID: "00-hang-1", Script: fmt.Sprintf("sleep 300 & echo $! >%s; echo started; sleep 300", pidFile),
			Then: []detach.Stage{{ID: "01-next-1", Script: "echo next"}}}
		ctx, cancel := context.WithCancel(context.Background())
		var out bytes.Buffer
		done := make(chan error, 1)
		go func() {
			_, err := r.Run(ctx, s, &notifyWriter{w: &out, at: "started\n", hit: cancel})
			done <- err
		}()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Fatalf("Run: %v", err)
		}
		b, err := os.ReadFile(pidFile)
		if err != nil {
			t.Fatal(err)
		}
		if !alive(t, exec, strings.TrimSpace(string(b))) {
			t.Fatalf("the stage's background process %s is not seen running before Stop", strings.TrimSpace(string(b)))
		}
		start := time.Now()
		sctx, scancel := context.WithTimeout(context.Background(), time.Minute)
		defer scancel()
		if err := r.Stop(sctx, s.ID); err != nil {
			t.Fatalf("Stop: %v", err)
		}
		t.Logf("Stop took %v", time.Since(start).Round(time.Millisecond))
		code, rest := run(t, r, detach.Stage{ID: s.ID, Script: s.Script, From: int64(out.Len())})
		if code != 143 && code != 137 || rest != "" {
			t.Errorf("after Stop: %d %q, want 143 or 137 and no more output", code, rest)
		}
		if alive(t, exec, strings.TrimSpace(string(b))) {
			t.Errorf("the stage's background process %s survived Stop", strings.TrimSpace(string(b)))
		}
		if _, err := os.Stat(filepath.Join(dir, "s", "01-next-1.sup")); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("the chain went on after Stop: %v", err)
		}
		// A stage stopped before it started never starts.
		if err := r.Stop(sctx, "02-later-1"); err != nil {
			t.Fatalf("Stop of a stage not started: %v", err)
		}
		code, out2 := run(t, r, detach.Stage{ID: "02-later-1", Script: "echo ran"})
		if code != 143 || out2 != "" {
			t.Errorf("a stage stopped before it started ran: %d %q", code, out2)
		}
	})
}

// alive reports whether the process with this pid in the server's PID
// namespace runs (and is not a zombie), asked over exec.
func alive(t *testing.T, exec vmexec.Executor, pid string) bool {
	t.Helper()
	if _, err := strconv.Atoi(pid); err != nil {
		t.Fatalf("pid %q", pid)
	}
	var out bytes.Buffer
	code, err := exec.Run(context.Background(), vmexec.Command{
		Script: `read -r _ _ s _ </proc/` + pid + `/stat && [ "$s" != Z ]`, Stdout: &out, Stderr: &out})
	if err != nil {
		t.Fatalf("check pid %s: %v", pid, err)
	}
	return code == 0
}

// A stage whose supervisor was killed without writing a result is lost.
func TestLostSupervisor(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		exec := dial(t, srv)
		dir := filepath.Join(t.TempDir(), "job")
		r := newRunner(t, exec, dir, nil)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		done := make(chan error, 1)
		go func() {
			_, err := r.Run(ctx, detach.Stage{ID: "00-s-1", Script: "echo up; sleep 300"}, io.Discard)
			done <- err
		}()
		supFile := filepath.Join(dir, "s", "00-s-1.sup")
		var sup []string
		for deadline := time.Now().Add(30 * time.Second); len(sup) == 0; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("the stage did not start")
			}
			b, _ := os.ReadFile(supFile)
			sup = strings.Fields(string(b))
		}
		// Kill the supervisor (not the stage) from inside the server's namespace.
		var out bytes.Buffer
		if code, err := exec.Run(ctx, vmexec.Command{Script: "kill -9 " + sup[0], Stdout: &out, Stderr: &out}); err != nil || code != 0 {
			t.Fatalf("kill the supervisor: %d %v %s", code, err, out.String())
		}
		err := <-done
		if !errors.Is(err, detach.ErrLost) || !strings.Contains(err.Error(), "supervisor") {
			t.Errorf("Run = %v, want ErrLost about the supervisor", err)
		}
	})
}

// A connection that drops mid-stage is replaced; the stage never noticed.
func TestConnectionDropMidStage(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		first := dial(t, srv)
		var redials atomic.Int64
		dir := filepath.Join(t.TempDir(), "job")
		r := newRunner(t, first, dir, func(o *detach.Options) {
			o.Redial = func(ctx context.Context) (vmexec.Executor, error) {
				redials.Add(1)
				return sshexec.Dial(ctx, srv.Target())
			}
		})
		script := `i=0; while [ $i -lt 6 ]; do echo line$i; i=$((i+1)); sleep 0.2; done`
		var out bytes.Buffer
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		code, err := r.Run(ctx, detach.Stage{ID: "00-s-1", Script: script}, &notifyWriter{w: &out, at: "line1\n", hit: func() { go first.Close() }})
		if err != nil || code != 0 {
			t.Fatalf("Run: %d %v", code, err)
		}
		if got := out.String(); got != "line0\nline1\nline2\nline3\nline4\nline5\n" {
			t.Errorf("output %q", got)
		}
		if redials.Load() != 1 {
			t.Errorf("%d redials, want 1", redials.Load())
		}
	})
}

// A machine that answers without an SSH server (here the server and its
// machine were killed: connections are refused) is given up after
// NoServerTimeout, not the whole ReconnectTimeout; one that does not answer
// at all (a listener that never speaks, as behind a network outage) gets
// the whole ReconnectTimeout.
func TestReconnectGivesUpOnMachineWithoutSSHServer(t *testing.T) {
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	go func() {
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			held = append(held, c) // accepted, never answered
		}
	}()
	for _, tt := range []struct {
		name   string
		target func(srv *sshtest.Server) sshexec.Target
		want   string
	}{
		{"refused", func(srv *sshtest.Server) sshexec.Target { return srv.Target() }, "no SSH server any more"},
		{"silent", func(srv *sshtest.Server) sshexec.Target {
			tg := srv.Target()
			tg.Addr = silent.Addr().String()
			return tg
		}, "no connection within 4s"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			srv := sshtest.Run(t, sshtest.Dropbear)
			serverLog = srv.Log
			first := dial(t, srv)
			r := newRunner(t, first, filepath.Join(t.TempDir(), "job"), func(o *detach.Options) {
				o.ReconnectTimeout = 4 * time.Second
				o.NoServerTimeout = time.Second
				o.Redial = func(ctx context.Context) (vmexec.Executor, error) {
					return sshexec.Dial(ctx, tt.target(srv))
				}
			})
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			var out bytes.Buffer
			_, err := r.Run(ctx, detach.Stage{ID: "00-s-1", Script: "echo up; sleep 60"},
				&notifyWriter{w: &out, at: "up\n", hit: func() { go srv.Kill() }})
			if !errors.Is(err, detach.ErrLost) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Run = %v, want ErrLost saying %q", err, tt.want)
			}
		})
	}
}

// Processes a stage leaves behind are given the drain time, then killed;
// the stage's exit code stands.
func TestLeftoversAreKilled(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		exec := dial(t, srv)
		r := newRunner(t, exec, filepath.Join(t.TempDir(), "job"), nil)
		pidFile := filepath.Join(t.TempDir(), "bg")
		start := time.Now()
		code, out := run(t, r, detach.Stage{ID: "00-s-1", Script: fmt.Sprintf("sleep 300 & echo $! >%s; echo done", pidFile)})
		if code != 0 || out != "done\n" {
			t.Errorf("%d %q", code, out)
		}
		if d := time.Since(start); d > 20*time.Second {
			t.Errorf("took %v; the drain is 1s", d)
		}
		b, _ := os.ReadFile(pidFile)
		if alive(t, exec, strings.TrimSpace(string(b))) {
			t.Errorf("the background process survived the stage")
		}
	})
}

// A stage that fills the disk the job directory is on still gets its
// exit status recorded (the supervisor keeps a page for it), so the job
// fails with the script's own code instead of a lost stage. The disk is
// a small tmpfs, which needs root.
func TestStageFillsTheDisk(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.Missing(t, "mounting a tmpfs needs root")
	}
	for _, k := range []sshtest.Kind{sshtest.OpenSSH, sshtest.Dropbear} {
		t.Run(string(k), func(t *testing.T) {
			// Mounted before the server starts, so that the server's
			// private mount namespace has it too.
			disk := t.TempDir()
			if err := syscall.Mount("tmpfs", disk, "tmpfs", 0, "size=512k"); err != nil {
				t.Fatalf("mount a tmpfs on %s: %v", disk, err)
			}
			t.Cleanup(func() { _ = syscall.Unmount(disk, syscall.MNT_DETACH) })
			srv := sshtest.Run(t, k)
			serverLog = srv.Log
			r := newRunner(t, dial(t, srv), filepath.Join(disk, "job"), nil)
			// At most 16 MiB, should the tmpfs not be the one written.
			code, out := run(t, r, detach.Stage{ID: "00-fill-1",
				Script: "echo filling; head -c 16777216 /dev/zero >" + filepath.Join(disk, "fill") + " 2>/dev/null || exit 7"})
			if code != 7 || !strings.HasPrefix(out, "filling\n") {
				t.Errorf("%d %q, want 7 and the output written before the disk was full", code, out)
			}
		})
	}
}

func TestOptionsValidation(t *testing.T) {
	tests := []struct {
		name string
		o    detach.Options
		want string
	}{
		{"no exec", detach.Options{Dir: "/x"}, "Exec is nil"},
		{"relative dir", detach.Options{Dir: "x", Exec: &countingExec{}}, "Dir"},
		{"bad shell", detach.Options{Dir: "/x", Exec: &countingExec{}, Shell: "sh -c"}, "Shell"},
		{"relative file", detach.Options{Dir: "/x", Exec: &countingExec{}, Files: []detach.File{{Path: "a"}}}, "Files[0]"},
	}
	for _, tt := range tests {
		if _, err := detach.New(tt.o); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v, want %q", tt.name, err, tt.want)
		}
	}
}

// testWriter logs through t.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// A session's wake-up FIFO and its ticker (shells without read -t) go
// with the session: after a chain was followed to its end, and after a
// follower was abandoned mid-stage, no process keeps a FIFO of the job
// open for long.
func TestWakeFIFOsDoNotOutliveTheirSessions(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		dir := filepath.Join(t.TempDir(), "job")
		r := newRunner(t, dial(t, srv), dir, nil)
		a := detach.Stage{ID: "00-a-1", Script: "echo a"}
		a.Then = []detach.Stage{{ID: "01-b-1", Script: "sleep 0.6; echo b"}}
		if code, out := run(t, r, a); code != 0 || out != "a\n" {
			t.Fatalf("a: %d %q", code, out)
		}
		if code, out := run(t, r, a.Then[0]); code != 0 || out != "b\n" {
			t.Fatalf("b: %d %q", code, out)
		}
		ctx, cancel := context.WithCancel(context.Background())
		var seen bytes.Buffer
		w := &notifyWriter{w: &seen, at: "started\n", hit: cancel}
		if _, err := r.Run(ctx, detach.Stage{ID: "02-c-1", Script: "echo started; sleep 60; echo done"}, w); !errors.Is(err, context.Canceled) {
			t.Fatalf("c: %v, want the cancel", err)
		}
		r.Close()
		t.Cleanup(func() {
			sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := newRunner(t, dial(t, srv), dir, nil).Stop(sctx, "02-c-1"); err != nil {
				t.Errorf("stop c: %v", err)
			}
		})
		// The abandoned follower dies at its next keep-alive write (every
		// 5s while the stage is silent), its ticker at its next tick. Under
		// dropbear the writes of a session whose channel was closed still
		// succeed: the follower (the only process with the stage's output
		// open) lives on until the stage ends, as it did before there were
		// FIFOs; nothing else may hold one.
		deadline := time.Now().Add(20 * time.Second)
		for {
			holders := fifoHolders(t, filepath.Join(dir, "w"))
			if srv.Kind == sshtest.Dropbear {
				holders = slices.DeleteFunc(holders, func(pid string) bool {
					return followsStage(pid, filepath.Join(dir, "s", "02-c-1.out"))
				})
			}
			if len(holders) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("processes still hold the job's wake-up FIFOs: %v", holders)
			}
			time.Sleep(200 * time.Millisecond)
		}
	})
}

// fifoHolders lists the processes (/proc/PID) with a file under dir open.
func fifoHolders(t *testing.T, dir string) []string {
	t.Helper()
	fds, _ := filepath.Glob("/proc/[0-9]*/fd/*")
	var out []string
	for _, fd := range fds {
		target, err := os.Readlink(fd)
		if p := filepath.Dir(filepath.Dir(fd)); err == nil && strings.HasPrefix(target, dir+"/") && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}

// followsStage reports whether process proc (/proc/PID) has the file
// out open on its fd 3, as a follower of that stage does.
func followsStage(proc, out string) bool {
	target, err := os.Readlink(filepath.Join(proc, "fd", "3"))
	return err == nil && target == out
}

// A stage's output reaches the follower byte for byte: large (more than
// one read of the follower's copy), binary (NUL bytes, no final newline),
// written while the follower reads it in timed wakes, and again from an
// offset in the middle of it.
func TestOutputIsByteExact(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		dir := filepath.Join(t.TempDir(), "job")
		r := newRunner(t, dial(t, srv), dir, nil)
		// 3 chunks of about 100 kB, each ending in NULs, 0.3 s apart, then
		// a tail without a newline.
		script := `s=x; for k in 1 2 3 4 5 6 7 8 9 10; do s=$s$s; done
i=0; while [ $i -lt 3 ]; do
	j=0; while [ $j -lt 100 ]; do printf '%s\n' "$s"; j=$((j+1)); done
	printf 'chunk\000%d\000\n' $i; i=$((i+1)); sleep 0.3
done; printf 'end'`
		s := detach.Stage{ID: "00-big-1", Script: script}
		code, out := run(t, r, s)
		file, err := os.ReadFile(filepath.Join(dir, "s", "00-big-1.out"))
		if err != nil {
			t.Fatal(err)
		}
		if code != 0 || out != string(file) || len(file) < 300000 || !strings.Contains(out, "chunk\x002\x00\n") || !strings.HasSuffix(out, "end") {
			t.Fatalf("code %d, %d bytes followed, %d in the file; want them equal, with NULs and the tail", code, len(out), len(file))
		}
		s.From = 150001
		if code, out := run(t, r, s); code != 0 || out != string(file[150001:]) {
			t.Errorf("from 150001: code %d, %d bytes, want %d", code, len(out), len(file)-150001)
		}
	})
}
