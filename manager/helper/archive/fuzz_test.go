package archive

import (
	"bytes"
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzExtractZip feeds arbitrary bytes to the extractor: it must never
// panic, never write outside its directory, and never write more than its
// limit.
func FuzzExtractZip(f *testing.F) {
	f.Add(zipOf(f, rawEntry{name: "a/b.txt", mode: 0o644, content: "hello"}))
	f.Add(zipOf(f, rawEntry{name: "l", mode: fs.ModeSymlink | 0o777, content: ".."}, rawEntry{name: "l/x", mode: 0o644, content: "x"}))
	f.Add(zipOf(f, rawEntry{name: "../x", mode: 0o644, content: "x"}))
	f.Add(zipOf(f, rawEntry{name: "d/", mode: fs.ModeDir | 0o755}, rawEntry{name: "d/f", mode: 0o600, content: strings.Repeat("z", 5000)}))
	f.Add(zipOf(f, rawEntry{name: "bomb", mode: 0o644, content: strings.Repeat("\x00", 1<<16), declared: 3}))
	const limit = 1 << 20
	scratch := fuzzScratch(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		base, err := os.MkdirTemp(scratch, "x")
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(base)
		dir := filepath.Join(base, "dir")
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		st, _ := ExtractZip(context.Background(), bytes.NewReader(data), int64(len(data)), dir, Limits{MaxBytes: limit, MaxEntries: 1000}, nil)
		if st.Bytes > limit {
			t.Fatalf("wrote %d bytes, limit %d", st.Bytes, limit)
		}
		ents, err := os.ReadDir(base)
		if err != nil {
			t.Fatal(err)
		}
		if len(ents) != 1 {
			t.Fatalf("extraction wrote next to its directory: %v", ents)
		}
		var total int64
		filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				if fi, err := d.Info(); err == nil {
					total += fi.Size()
				}
			}
			return nil
		})
		if total > limit {
			t.Fatalf("%d bytes on disk, limit %d", total, limit)
		}
		// Make everything removable for TempDir's cleanup.
		filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				os.Chmod(p, 0o755)
			}
			return nil
		})
	})
}

// FuzzArchive builds a tree from the input, selects it with a pattern and
// an exclude pattern from the input, archives and extracts it: every file
// archived comes back with the same content, and nothing excluded does.
func FuzzArchive(f *testing.F) {
	f.Add("a/b.txt\nc/d/e.log\nf", "**", "**/*.log", []byte("data"))
	f.Add("x\ny/z", "y", "", []byte{})
	f.Add("deep/er/still/file.go", "deep/**/*.go", "deep/er/*", []byte("package x"))
	scratch := fuzzScratch(f)
	f.Fuzz(func(t *testing.T, files, pattern, exclude string, content []byte) {
		src, err := os.MkdirTemp(scratch, "src")
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(src)
		var made []string
		var entries []Entry
		for i, name := range strings.Split(files, "\n") {
			if i >= 8 || name == "" || !filepath.IsLocal(name) || strings.ContainsAny(name, "\x00\\") || len(name) > 100 {
				continue
			}
			p := filepath.Join(src, name)
			if os.MkdirAll(filepath.Dir(p), 0o755) != nil || os.WriteFile(p, append([]byte(name), content...), 0o644) != nil {
				continue
			}
			made = append(made, filepath.ToSlash(filepath.Clean(name)))
		}
		sel := Selection{Dir: src, Paths: []string{pattern}}
		if exclude != "" {
			sel.Exclude = []string{exclude}
		}
		entries, err = Select(context.Background(), sel, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			if !filepath.IsLocal(filepath.FromSlash(e.Name)) {
				t.Fatalf("selected %q outside the directory", e.Name)
			}
		}
		var buf bytes.Buffer
		if _, err := Write(context.Background(), &buf, FormatZip, src, entries, LevelFastest); err != nil {
			t.Fatalf("write: %v", err)
		}
		dst, err := os.MkdirTemp(scratch, "dst")
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(dst)
		if _, err := ExtractZip(context.Background(), bytes.NewReader(buf.Bytes()), int64(buf.Len()), dst, Limits{}, nil); err != nil {
			t.Fatalf("extract what we archived: %v", err)
		}
		for _, e := range entries {
			if !e.Info.Mode().IsRegular() {
				continue
			}
			want, _ := os.ReadFile(filepath.Join(src, e.Name))
			got, err := os.ReadFile(filepath.Join(dst, e.Name))
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("%s: got %q (%v), want %q", e.Name, got, err, want)
			}
		}
		_ = made
	})
}

// fuzzScratch is a directory for the fuzz inputs' files: in memory
// (/dev/shm) when the machine has it, as each input writes a few files
// and a disk makes that the bottleneck.
func fuzzScratch(f *testing.F) string {
	parent := ""
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		parent = "/dev/shm"
	}
	dir, err := os.MkdirTemp(parent, "mayfly-fuzz-")
	if err != nil {
		dir = f.TempDir()
	}
	f.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}
