package archive

import (
	"archive/zip"
	"bytes"
	"compress/flate"
	"context"
	"errors"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"

	"github.com/mayfly-ci/mayfly/internal/testenv"
)

// tree writes files (name → content; a content starting with "->" makes a
// link to the rest) under a new directory.
func tree(t testing.TB, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		if strings.HasSuffix(name, "/") {
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if target, ok := strings.CutPrefix(content, "->"); ok {
			if err := os.Symlink(target, p); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func names(es []Entry) []string {
	var out []string
	for _, e := range es {
		out = append(out, e.Name)
	}
	return out
}

func TestSelect(t *testing.T) {
	dir := tree(t, map[string]string{
		"bin/app":            "app",
		"bin/app.debug":      "debug",
		"build/a/x.o":        "o",
		"build/a/b/y.o":      "o",
		"build/a/b/keep.txt": "k",
		"report.xml":         "<x/>",
		"link":               "->bin/app",
		"other/file":         "f",
	})
	for _, tc := range []struct {
		name      string
		sel       Selection
		want      []string
		wantLog   string
		untracked bool
	}{
		{name: "dir brings everything below", sel: Selection{Paths: []string{"bin"}}, want: []string{"bin", "bin/app", "bin/app.debug"}},
		{name: "double star", sel: Selection{Paths: []string{"build/**/*.o"}}, want: []string{"build/a/b/y.o", "build/a/x.o"}},
		{name: "exclude with double star", sel: Selection{Paths: []string{"build/"}, Exclude: []string{"build/**/*.o"}},
			want: []string{"build", "build/a", "build/a/b", "build/a/b/keep.txt"}, wantLog: "build/**/*.o: excluded 2 files"},
		{name: "exclude a file", sel: Selection{Paths: []string{"bin/*"}, Exclude: []string{"bin/*.debug"}}, want: []string{"bin/app"}},
		{name: "link kept as link", sel: Selection{Paths: []string{"link"}}, want: []string{"link"}},
		{name: "absolute path inside", sel: Selection{Paths: []string{"$DIR/report.xml"}}, want: []string{"report.xml"}},
		{name: "outside is refused", sel: Selection{Paths: []string{"../etc/passwd", "/etc/passwd"}}, wantLog: "not a subpath of the project directory"},
		{name: "no match warns", sel: Selection{Paths: []string{"nothing/*"}}, wantLog: "nothing/*: no matching files"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var log strings.Builder
			sel := tc.sel
			sel.Dir = dir
			for i, p := range sel.Paths {
				sel.Paths[i] = strings.ReplaceAll(p, "$DIR", dir)
			}
			got, err := Select(context.Background(), sel, func(f string, a ...any) { log.WriteString(strings.TrimSpace(sprintf(f, a...)) + "\n") })
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(names(got), tc.want) {
				t.Errorf("selected %q, want %q\nlog:\n%s", names(got), tc.want, log.String())
			}
			if tc.wantLog != "" && !strings.Contains(log.String(), tc.wantLog) {
				t.Errorf("log lacks %q:\n%s", tc.wantLog, log.String())
			}
		})
	}
}

func TestSelectUntracked(t *testing.T) {
	testenv.LookPath(t, "git", "make setup installs it")
	dir := tree(t, map[string]string{"tracked.txt": "t", ".gitignore": "ignored.log\n"})
	for _, args := range [][]string{{"init", "-q"}, {"add", "."}, {"-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x"}} {
		cmd := exec.Command("git", args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v\n%s", args, err, out)
		}
	}
	for name, content := range map[string]string{"new/file.txt": "n", "ignored.log": "i"} {
		p := filepath.Join(dir, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := Select(context.Background(), Selection{Dir: dir, Untracked: true, Exclude: []string{"**/*.txt"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Ignored files count as untracked (git ls-files -o); exclude applies.
	if want := []string{"ignored.log"}; !slices.Equal(names(got), want) {
		t.Errorf("untracked %q, want %q", names(got), want)
	}
}

// TestZipRoundTrip archives a tree with a link, modes and times and
// extracts it elsewhere.
func TestZipRoundTrip(t *testing.T) {
	src := tree(t, map[string]string{"bin/app": "#!/bin/sh\necho hi\n", "data/a.txt": "aaa", "link": "->bin/app", "empty/": ""})
	if err := os.Chmod(filepath.Join(src, "bin/app"), 0o755); err != nil {
		t.Fatal(err)
	}
	old := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	if err := os.Chtimes(filepath.Join(src, "data/a.txt"), old, old); err != nil {
		t.Fatal(err)
	}
	entries, err := Select(context.Background(), Selection{Dir: src, Paths: []string{"bin", "data", "link", "empty"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	st, err := Write(context.Background(), &buf, FormatZip, src, entries, LevelDefault)
	if err != nil {
		t.Fatal(err)
	}
	if st.Files != 2 || st.Links != 1 || st.Dirs != 3 {
		t.Errorf("stats %+v", st)
	}
	dst := t.TempDir()
	xst, err := ExtractZip(context.Background(), bytes.NewReader(buf.Bytes()), int64(buf.Len()), dst, Limits{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if xst != st {
		t.Errorf("extracted %+v, archived %+v", xst, st)
	}
	if target, err := os.Readlink(filepath.Join(dst, "link")); err != nil || target != "bin/app" {
		t.Errorf("link: %q %v", target, err)
	}
	fi, err := os.Stat(filepath.Join(dst, "bin/app"))
	if err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("bin/app mode %v %v", fi.Mode(), err)
	}
	fi, err = os.Stat(filepath.Join(dst, "data/a.txt"))
	if err != nil || !fi.ModTime().Equal(old) {
		t.Errorf("data/a.txt mtime %v, want %v (%v)", fi.ModTime(), old, err)
	}
	if fi, err := os.Stat(filepath.Join(dst, "empty")); err != nil || !fi.IsDir() {
		t.Errorf("empty dir: %v", err)
	}
}

func TestGzipAndRaw(t *testing.T) {
	src := tree(t, map[string]string{"a/junit.xml": "<testsuites/>", "b/junit.xml": "<testsuites name=\"b\"/>"})
	entries, _ := Select(context.Background(), Selection{Dir: src, Paths: []string{"*/junit.xml"}}, nil)
	var buf bytes.Buffer
	if _, err := Write(context.Background(), &buf, FormatGzip, src, entries, LevelDefault); err != nil {
		t.Fatal(err)
	}
	// One gzip member per file, each named by its path in the comment.
	zr, err := gzip.NewReader(&buf)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for {
		zr.Multistream(false)
		b, err := io.ReadAll(zr)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, zr.Comment+"="+string(b))
		if err := zr.Reset(&buf); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
	}
	want := []string{"a/junit.xml=<testsuites/>", `b/junit.xml=<testsuites name="b"/>`}
	if !slices.Equal(got, want) {
		t.Errorf("gzip members %q, want %q", got, want)
	}
	if _, err := Write(context.Background(), io.Discard, FormatRaw, src, entries, LevelDefault); !errors.Is(err, ErrTooManyRawFiles) {
		t.Errorf("raw with two files: %v", err)
	}
	buf.Reset()
	if _, err := Write(context.Background(), &buf, FormatRaw, src, entries[:1], LevelDefault); err != nil || buf.String() != "<testsuites/>" {
		t.Errorf("raw: %q %v", buf.String(), err)
	}
}

// zipOf builds a zip from raw entries.
type rawEntry struct {
	name    string
	mode    fs.FileMode
	content string
	// declared overrides the uncompressed size in the header (a lie).
	declared uint64
}

func zipOf(t testing.TB, entries ...rawEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, e := range entries {
		hdr := &zip.FileHeader{Name: e.name, Method: zip.Deflate}
		hdr.SetMode(e.mode)
		if e.declared != 0 {
			var comp bytes.Buffer
			fw, _ := flate.NewWriter(&comp, flate.BestCompression)
			fw.Write([]byte(e.content))
			fw.Close()
			hdr.CRC32 = crc32.ChecksumIEEE([]byte(e.content))
			hdr.CompressedSize64 = uint64(comp.Len())
			hdr.UncompressedSize64 = e.declared
			w, err := zw.CreateRaw(hdr)
			if err != nil {
				t.Fatal(err)
			}
			w.Write(comp.Bytes())
			continue
		}
		w, err := zw.CreateHeader(hdr)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(w, e.content)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestExtractRefuses: path escapes and zip bombs are refused, and nothing
// lands outside the directory.
func TestExtractRefuses(t *testing.T) {
	big := strings.Repeat("\x00", 1<<20)
	for _, tc := range []struct {
		name    string
		entries []rawEntry
		lim     Limits
		want    error
	}{
		{"dot-dot", []rawEntry{{name: "../escaped", mode: 0o644, content: "x"}}, Limits{}, ErrUnsafePath},
		{"dot-dot inside", []rawEntry{{name: "a/../../escaped", mode: 0o644, content: "x"}}, Limits{}, ErrUnsafePath},
		{"absolute", []rawEntry{{name: "/tmp/escaped", mode: 0o644, content: "x"}}, Limits{}, ErrUnsafePath},
		{"drive letter", []rawEntry{{name: "C:/escaped", mode: 0o644, content: "x"}}, Limits{}, ErrUnsafePath},
		{"backslash", []rawEntry{{name: `..\escaped`, mode: 0o644, content: "x"}}, Limits{}, ErrUnsafePath},
		{"through a link", []rawEntry{
			{name: "out", mode: fs.ModeSymlink | 0o777, content: "$OUTSIDE"},
			{name: "out/escaped", mode: 0o644, content: "x"},
		}, Limits{}, ErrUnsafePath},
		{"through a relative link", []rawEntry{
			{name: "up", mode: fs.ModeSymlink | 0o777, content: ".."},
			{name: "up/escaped", mode: 0o644, content: "x"},
		}, Limits{}, ErrUnsafePath},
		{"declared too big", []rawEntry{{name: "a", mode: 0o644, content: "x"}, {name: "b", mode: 0o644, content: big}}, Limits{MaxBytes: 1 << 19}, ErrTooLarge},
		{"header lies", []rawEntry{{name: "bomb", mode: 0o644, content: big, declared: 10}}, Limits{}, ErrTooLarge},
		{"too many entries", []rawEntry{{name: "a", mode: 0o644}, {name: "b", mode: 0o644}, {name: "c", mode: 0o644}}, Limits{MaxEntries: 2}, ErrTooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := t.TempDir()
			dir, outside := filepath.Join(base, "dir"), filepath.Join(base, "outside")
			os.Mkdir(dir, 0o755)
			os.Mkdir(outside, 0o755)
			for i := range tc.entries {
				tc.entries[i].content = strings.ReplaceAll(tc.entries[i].content, "$OUTSIDE", outside)
			}
			z := zipOf(t, tc.entries...)
			_, err := ExtractZip(context.Background(), bytes.NewReader(z), int64(len(z)), dir, tc.lim, nil)
			if !errors.Is(err, tc.want) {
				t.Errorf("error %v, want %v", err, tc.want)
			}
			for _, p := range []string{filepath.Join(base, "escaped"), filepath.Join(outside, "escaped"), "/tmp/escaped"} {
				if _, err := os.Lstat(p); err == nil {
					t.Errorf("%s was written", p)
				}
			}
		})
	}
}

// TestExtractReplacesLink: a file entry over an existing link replaces the
// link instead of writing through it.
func TestExtractReplacesLink(t *testing.T) {
	dir := t.TempDir()
	victim := filepath.Join(dir, "victim")
	os.WriteFile(victim, []byte("keep"), 0o644)
	os.Symlink("victim", filepath.Join(dir, "f"))
	z := zipOf(t, rawEntry{name: "f", mode: 0o644, content: "new"})
	if _, err := ExtractZip(context.Background(), bytes.NewReader(z), int64(len(z)), dir, Limits{}, nil); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(victim); string(b) != "keep" {
		t.Errorf("victim now %q", b)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "f")); string(b) != "new" {
		t.Errorf("f is %q", b)
	}
}
