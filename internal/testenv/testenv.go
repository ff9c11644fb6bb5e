// Package testenv holds what tests share about the machine they run on.
package testenv

import (
	"os"
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
