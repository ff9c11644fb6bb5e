package providers_test

import (
	"bytes"
	"context"
	"encoding/json"
	"go/format"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// walkthroughFile marks a code block of README.md as (part of) a file of
// the walk-through: "// file: plugins/example/example.go" on its first
// line. Blocks of the same file are joined in order, a blank line apart.
var walkthroughFile = regexp.MustCompile("(?s)```go\n// file: (\\S+)\n(.*?)```")

// TestWalkthroughBuildsAPluginThatConforms builds the example plugin of
// README.md's walk-through from the page's own code blocks, laid over the
// repository with go's -overlay (nothing is written into the tree), and
// runs its conformance test: the plugin binary through the real plugin
// host against its fake cloud, with the kit's typed-error cases.
func TestWalkthroughBuildsAPluginThatConforms(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]*bytes.Buffer{}
	var order []string
	for _, m := range walkthroughFile.FindAllSubmatch(readme, -1) {
		path := string(m[1])
		if files[path] == nil {
			files[path] = &bytes.Buffer{}
			order = append(order, path)
		}
		if files[path].Len() > 0 {
			files[path].WriteString("\n") // a blank line between the parts of a file
		}
		files[path].Write(m[2])
	}
	want := []string{"plugins/example/examplefake/fake.go", "plugins/example/example.go",
		"plugins/example/cmd/mayfly-plugin-example/main.go", "plugins/example/conformance_test.go"}
	if strings.Join(order, " ") != strings.Join(want, " ") {
		t.Fatalf("the walk-through's files are %q, want %q", order, want)
	}
	dir := t.TempDir()
	overlay := map[string]string{}
	for _, path := range order {
		src := files[path].Bytes()
		if formatted, err := format.Source(src); err != nil {
			t.Errorf("%s does not parse: %v", path, err)
		} else if !bytes.Equal(formatted, src) {
			t.Errorf("%s is not gofmt-formatted in README.md", path)
		}
		if _, err := os.Stat(filepath.Join(root, path)); err == nil {
			t.Fatalf("%s exists in the tree: the walk-through must build from README.md alone", path)
		}
		tmp := filepath.Join(dir, filepath.Base(filepath.Dir(path))+"-"+filepath.Base(path))
		if err := os.WriteFile(tmp, src, 0o600); err != nil {
			t.Fatal(err)
		}
		overlay[filepath.Join(root, path)] = tmp
	}
	if t.Failed() {
		return
	}
	spec, err := json.Marshal(map[string]any{"Replace": overlay})
	if err != nil {
		t.Fatal(err)
	}
	overlayFile := filepath.Join(dir, "overlay.json")
	if err := os.WriteFile(overlayFile, spec, 0o600); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	// The commands run in the repository (the plugin's TestMain builds it
	// by import path), with GOFLAGS carrying the overlay to every go
	// command, the one TestMain runs included. The test binary is compiled
	// and then run, as go test would, but not in the package's directory,
	// which does not exist.
	run := func(name string, args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(ctx, name, args...)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "GOFLAGS=-overlay="+overlayFile)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	testBin := filepath.Join(dir, "example.test")
	run("go", "test", "-c", "-vet=off", "-o", testBin, "./plugins/example/")
	out := run(testBin, "-test.count=1", "-test.v", "-test.run", "^TestConformance$")
	for _, pass := range []string{"--- PASS: TestConformance ", "--- PASS: TestConformance/TypedErrors/Throttled",
		"--- PASS: TestConformance/TypedErrors/Quota", "--- PASS: TestConformance/TypedErrors/NoCapacityInAnyZone",
		"--- PASS: TestConformance/CreateListConnectDelete"} {
		if !strings.Contains(out, pass) {
			t.Errorf("the example's conformance run lacks %q:\n%s", pass, out)
		}
	}
}
