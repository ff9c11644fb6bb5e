// Package testenv holds what tests share about the machine they run on.
package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
)

// InCI reports whether the tests run in CI (the environment variable CI is
// "true"), where every tool and privilege they need must be present.
func InCI() bool { return os.Getenv("CI") == "true" }

// Missing ends a test that cannot run here because the machine lacks
// what msg names: under CI it fails, since CI must have it; elsewhere it
// skips.
func Missing(t testing.TB, msg string) {
	t.Helper()
	if InCI() {
		t.Fatal(msg + "; failing because CI=true")
	}
	t.Skip(msg + " (skipped here; under CI=true this fails)")
}

// LookPath returns the path of the program name, or ends the test with
// Missing when it is not installed; install says what installs it (for
// example "make setup installs it").
func LookPath(t testing.TB, name, install string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Missing(t, fmt.Sprintf("%s is not installed (%s): %v", name, install, err))
	}
	return p
}
