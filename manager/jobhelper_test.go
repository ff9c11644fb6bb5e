package manager

import (
	"context"
	"io/fs"
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
