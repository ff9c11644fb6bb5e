// Package plugintest builds provider plugin binaries for tests, so that the
// plugin host, the conformance kit and end-to-end tests run real plugin
// processes.
package plugintest

import (
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"testing"
)

// Build compiles the plugin main package pkg into dir and returns the
// binary's path (named after the package's last element).
func Build(dir, pkg string) (string, error) {
	bin := filepath.Join(dir, path.Base(pkg))
	out, err := exec.Command("go", "build", "-o", bin, pkg).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("build plugin %s: %w\n%s", pkg, err, out)
	}
	return bin, nil
}

// BuildT is Build into a test's temporary directory; a failure ends the test.
func BuildT(t testing.TB, pkg string) string {
	t.Helper()
	bin, err := Build(t.TempDir(), pkg)
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// Main is a TestMain body: it builds pkg into a temporary directory, stores
// the binary's path in *bin, runs the package's tests, removes the directory
// and exits with the tests' code.
func Main(m *testing.M, pkg string, bin *string) {
	dir, err := os.MkdirTemp("", "mayfly-plugin-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if *bin, err = Build(dir, pkg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
