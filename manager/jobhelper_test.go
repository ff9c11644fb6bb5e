package manager

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/vmexec"
)

// shExec runs scripts with this machine's sh.
type shExec struct{ uploads int }

func (e *shExec) Run(ctx context.Context, c vmexec.Command) (int, error) {
	cmd := exec.CommandContext(ctx, "sh", "-c", c.Script)
	cmd.Stdout, cmd.Stderr = c.Stdout, c.Stderr
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), nil
	}
	return 0, err
}

func (e *shExec) Upload(ctx context.Context, p string, b []byte, m fs.FileMode) error {
	e.uploads++
	os.MkdirAll(filepath.Dir(p), 0o755)
	return os.WriteFile(p, b, m)
}

func (e *shExec) Close() error { return nil }

// TestBakedHelper: an image's helper with the manager's checksum is linked
// instead of uploaded; another binary there is not used.
func TestBakedHelper(t *testing.T) {
	dir := t.TempDir()
	bin := []byte("#!/bin/sh\necho helper v1\n")
	h := &Helpers{}
	plan := &buildscript.Plan{Shell: buildscript.ShellSh, HelperPath: filepath.Join(dir, "builds/.mayfly/mayfly-helper")}
	bakedHelperPath = filepath.Join(dir, "usr-local-bin-mayfly-helper")
	defer func() { bakedHelperPath = BakedHelperPath }()
	ex := &shExec{}
	if baked(context.Background(), plan, ex, h.sum(bin)) {
		t.Fatal("linked a helper the image does not have")
	}
	os.WriteFile(bakedHelperPath, []byte("#!/bin/sh\necho other\n"), 0o755)
	if baked(context.Background(), plan, ex, h.sum(bin)) {
		t.Fatal("linked a different binary")
	}
	os.WriteFile(bakedHelperPath, bin, 0o755)
	if !baked(context.Background(), plan, ex, h.sum(bin)) {
		t.Fatal("did not link the image's helper")
	}
	if target, err := os.Readlink(plan.HelperPath); err != nil || target != bakedHelperPath {
		t.Errorf("%s links to %q (%v)", plan.HelperPath, target, err)
	}
}

// flakyExec fails its uploads with a system failure (a dropped
// connection) while drops lasts, or with another error when broken.
type flakyExec struct {
	shExec
	name   string
	drops  *int
	broken bool
}

func (e *flakyExec) Upload(ctx context.Context, p string, b []byte, m fs.FileMode) error {
	e.uploads++
	switch {
	case e.broken:
		return errors.New("permission denied")
	case *e.drops > 0:
		*e.drops--
		return &vmexec.SystemError{Op: "upload", Err: errors.New("ssh connection lost: EOF")}
	}
	return nil
}

// TestRetryOnNewConnection: a step that fails with a dropped connection is
// tried again on a new connection, up to the bound; other errors and the
// bound end it.
func TestRetryOnNewConnection(t *testing.T) {
	for _, tt := range []struct {
		name              string
		drops             int
		broken, redialErr bool
		wantErr           bool
		wantOn            string
		wantRedials       int
	}{
		{name: "no drop", wantOn: "first"},
		{name: "two drops", drops: 2, wantOn: "redial-2", wantRedials: 2},
		{name: "drops past the bound", drops: 9, wantErr: true, wantRedials: 3},
		{name: "not a connection failure", broken: true, wantErr: true},
		{name: "no new connection", drops: 1, redialErr: true, wantErr: true, wantRedials: 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			drops := tt.drops
			first := &flakyExec{name: "first", drops: &drops, broken: tt.broken}
			redials := 0
			redial := func(ctx context.Context) (vmexec.Executor, error) {
				redials++
				if tt.redialErr {
					return nil, errors.New("connection refused")
				}
				return &flakyExec{name: fmt.Sprintf("redial-%d", redials), drops: &drops}, nil
			}
			on, err := retryOnNewConnection(context.Background(), first, redial, 4, func(e vmexec.Executor) error {
				return e.Upload(context.Background(), "/x", nil, 0o755)
			}, slog.New(slog.DiscardHandler))
			if (err != nil) != tt.wantErr || redials != tt.wantRedials {
				t.Fatalf("err %v after %d redials, want error %v after %d", err, redials, tt.wantErr, tt.wantRedials)
			}
			if err == nil && on.(*flakyExec).name != tt.wantOn {
				t.Errorf("succeeded on %s, want %s", on.(*flakyExec).name, tt.wantOn)
			}
		})
	}
}
