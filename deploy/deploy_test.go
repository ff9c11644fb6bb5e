package deploy

import (
	"context"
	"os/exec"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/internal/testenv"
)

// hostedJobCap is the hard cap on a job on hosted runners; every drain
// timeout must cover it.
const hostedJobCap = 3 * time.Hour

// requireTool returns the path of name, or skips the test when it is
// missing; with CI=true it fails instead. make setup installs every tool
// these tests use (promtool from Debian's prometheus package,
// systemd-analyze from systemd).
func requireTool(t *testing.T, name string) string {
	t.Helper()
	return testenv.LookPath(t, name, "make setup installs it")
}

// run runs a command in dir with a timeout and returns its combined output.
func run(t *testing.T, dir string, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	return string(out), err
}
