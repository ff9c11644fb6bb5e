package sshexec_test

import (
	"bytes"
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/vmexec"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

// The scripts print, in clock ticks since boot, the time now (nowTicks)
// or when their shell started (startTicks, also the variable X).
const (
	nowTicks   = `read -r up _ </proc/uptime; echo "$(( ${up%.*}${up#*.} ))"`
	startTicks = `read -r st </proc/$$/stat; set -- $st; shift 21; echo "$1"; echo "x=$X"`
)

func ticks(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil {
		t.Fatalf("%q: %v", s, err)
	}
	return n
}

// now returns the machine's clock in ticks, through a session of its own.
func now(t *testing.T, c vmexec.Executor) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var out bytes.Buffer
	if code, err := c.Run(ctx, vmexec.Command{Script: nowTicks, Stdout: &out}); err != nil || code != 0 {
		t.Fatalf("now: %d %v", code, err)
	}
	return ticks(t, out.String())
}

// streamStart runs startTicks with Stream and returns when its shell
// started.
func streamStart(t *testing.T, c vmexec.Streamer) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	code, err := c.Stream(ctx, vmexec.Command{Script: startTicks, Shell: "sh", Env: []string{"X=it's"}, Stdout: &out, Stderr: &errb})
	if err != nil || code != 0 {
		t.Fatalf("stream: %d %v: %s %s", code, err, out.String(), errb.String())
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 2 || lines[1] != "x=it's" {
		t.Fatalf("output %q, want the start and x=it's", out.String())
	}
	return ticks(t, lines[0])
}

// A prestarted shell runs the next Stream's script: its shell started
// before the Stream was asked for. One that died while it waited is not
// used: the Stream opens a session of its own.
func TestPrestartShell(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		c := dial(t, srv, nil)
		c.PrestartShell("sh")
		time.Sleep(300 * time.Millisecond) // a few ticks
		before := now(t, c)
		if start := streamStart(t, c); start >= before {
			t.Errorf("the script ran in a shell started at tick %d, after tick %d: not the prestarted one", start, before)
		}
		// Taken: the next Stream starts a shell of its own.
		before = now(t, c)
		if start := streamStart(t, c); start < before {
			t.Errorf("second stream: shell started at tick %d, before tick %d; want a new one", start, before)
		}

		c.PrestartShell("sh")
		if !c.EndSpareForTest() {
			t.Fatal("no spare shell after PrestartShell")
		}
		before = now(t, c)
		if start := streamStart(t, c); start < before {
			t.Errorf("after the spare died: shell started at tick %d, before tick %d; want a new one", start, before)
		}
	})
}
