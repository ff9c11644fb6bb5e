package stagerun

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/vmexec"
)

func TestStageID(t *testing.T) {
	tests := []struct {
		index   int
		name    string
		attempt int
		id      string
	}{
		{0, "prepare_script", 1, "00-prepare_script-1"},
		{3, "step_script", 2, "03-step_script-2"},
		{12, "step_my-step", 0, "12-step_my-step-0"},
	}
	for _, tt := range tests {
		if got := StageID(tt.index, tt.name, tt.attempt); got != tt.id {
			t.Errorf("StageID(%d, %q, %d) = %q, want %q", tt.index, tt.name, tt.attempt, got, tt.id)
		}
		i, n, a, ok := ParseStageID(tt.id)
		if !ok || i != tt.index || n != tt.name || a != tt.attempt {
			t.Errorf("ParseStageID(%q) = %d %q %d %v", tt.id, i, n, a, ok)
		}
	}
	for _, bad := range []string{"", "x", "1-", "-a-1", "01-a-", "a-b-1", "01--1", "01-a-x"} {
		if _, _, _, ok := ParseStageID(bad); ok {
			t.Errorf("ParseStageID(%q) ok, want an error", bad)
		}
	}
}

// fakeExec runs "scripts" that print their text and the env, and exit with
// the number after "exit " if any; a script "hang" blocks until ctx ends.
type fakeExec struct{ runs int }

func (f *fakeExec) Run(ctx context.Context, cmd vmexec.Command) (int, error) {
	f.runs++
	fmt.Fprintf(cmd.Stdout, "%s %s\n", strings.Join(cmd.Env, ","), cmd.Script)
	if cmd.Script == "hang" {
		<-ctx.Done()
		return -1, &vmexec.AbortedError{Cause: context.Cause(ctx), Killed: true}
	}
	var code int
	fmt.Sscanf(cmd.Script, "exit %d", &code)
	return code, nil
}

func (*fakeExec) Upload(context.Context, string, []byte, fs.FileMode) error { return nil }
func (*fakeExec) Close() error                                              { return nil }

func TestAttached(t *testing.T) {
	ctx := context.Background()
	e := &fakeExec{}
	a := &Attached{Exec: e}
	var out bytes.Buffer
	code, err := a.Run(ctx, Stage{ID: "00-a-1", Script: "exit 3", Env: []string{"CI_JOB_STATUS=running"}}, &out)
	if err != nil || code != 3 || out.String() != "CI_JOB_STATUS=running exit 3\n" {
		t.Fatalf("Run = %d, %v, output %q", code, err, out.String())
	}
	// A stage that ran cannot be followed again, nor one seen elsewhere.
	for _, s := range []Stage{{ID: "00-a-1", Script: "exit 3"}, {ID: "01-b-1", Script: "true", From: 10}} {
		if _, err := a.Run(ctx, s, io.Discard); !errors.Is(err, ErrLost) {
			t.Errorf("Run(%+v) error = %v, want ErrLost", s, err)
		}
	}
	if e.runs != 1 {
		t.Errorf("%d commands ran, want 1", e.runs)
	}

	// Stop ends a running stage, and its Run says so.
	done := make(chan error, 1)
	go func() {
		_, err := a.Run(ctx, Stage{ID: "02-c-1", Script: "hang"}, io.Discard)
		done <- err
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		a.mu.Lock()
		running := a.running["02-c-1"] != nil
		a.mu.Unlock()
		if running {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the stage never started")
		}
		time.Sleep(time.Millisecond)
	}
	if err := a.Stop(ctx, "02-c-1"); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if err := <-done; err == nil || !strings.Contains(err.Error(), "stopped") {
		t.Errorf("Run of a stopped stage = %v, want a stop error", err)
	}
	if err := a.Stop(ctx, "never-started"); err != nil {
		t.Errorf("Stop of an unknown stage: %v", err)
	}
}
