package archive

import (
	"archive/zip"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"
)

// Limits bound what an extraction may write.
type Limits struct {
	// MaxBytes bounds the total size of the files written; 0 means
	// DefaultMaxBytes.
	MaxBytes int64
	// MaxEntries bounds the entries of the archive; 0 means DefaultMaxEntries.
	MaxEntries int
}

// Default limits of an extraction.
const (
	DefaultMaxBytes   = 50 << 30 // 50 GiB: ten times the largest cache archive
	DefaultMaxEntries = 2_000_000
)

// ErrUnsafePath is wrapped by extraction errors for an entry whose name is
// not a local path, or whose file would land outside the directory.
var ErrUnsafePath = errors.New("unsafe path in archive")

// ErrTooLarge is wrapped by extraction errors when the archive would write
// more than Limits allow (a zip bomb, or a lie in its headers).
var ErrTooLarge = errors.New("archive exceeds the extraction limits")

// ExtractZip extracts the zip archive r (of size bytes) into dir, which
// must exist. It refuses the whole archive, before writing anything, when
// an entry's name is not a local path or the headers exceed lim; while
// writing, it stops at the first entry that would write outside dir
// (through a link) or beyond what its header declared.
func ExtractZip(ctx context.Context, r io.ReaderAt, size int64, dir string, lim Limits, logf Logf) (Stats, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	if lim.MaxBytes <= 0 {
		lim.MaxBytes = DefaultMaxBytes
	}
	if lim.MaxEntries <= 0 {
		lim.MaxEntries = DefaultMaxEntries
	}
	zr, err := zip.NewReader(r, size)
	if err != nil {
		return Stats{}, fmt.Errorf("read zip: %w", err)
	}
	if len(zr.File) > lim.MaxEntries {
		return Stats{}, fmt.Errorf("%w: %d entries, at most %d", ErrTooLarge, len(zr.File), lim.MaxEntries)
	}
	var declared uint64
	names := make([]string, len(zr.File))
	for i, f := range zr.File {
		name, err := localName(f.Name)
		if err != nil {
			return Stats{}, err
		}
		names[i] = name
		declared += f.UncompressedSize64
		if declared > uint64(lim.MaxBytes) || f.UncompressedSize64 > uint64(lim.MaxBytes) {
			return Stats{}, fmt.Errorf("%w: the entries declare more than %d bytes", ErrTooLarge, lim.MaxBytes)
		}
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return Stats{}, fmt.Errorf("open %s: %w", dir, err)
	}
	defer root.Close()

	x := &extractor{root: root, budget: lim.MaxBytes, logf: logf}
	gitWarned := false
	for i, f := range zr.File {
		if err := ctx.Err(); err != nil {
			return x.st, err
		}
		if isGitDir(names[i]) && !gitWarned {
			logf("WARNING: Part of .git directory is on the list of files to extract")
			gitWarned = true
		}
		if err := x.entry(f, names[i]); err != nil {
			return x.st, err
		}
	}
	// Modes and times last: a read-only directory must not stop its
	// children from being written, and writing a child changes its mtime.
	for i := len(x.done) - 1; i >= 0; i-- {
		d := x.done[i]
		if d.link {
			continue
		}
		if err := root.Chmod(d.name, d.mode); err != nil {
			logf("WARNING: %s: %v", d.name, err)
		}
		if !d.mtime.IsZero() {
			if err := root.Chtimes(d.name, d.mtime, d.mtime); err != nil {
				logf("WARNING: %s: %v", d.name, err)
			}
		}
	}
	return x.st, nil
}

// localName turns an entry name into a local slash-separated path, or
// fails with ErrUnsafePath.
func localName(name string) (string, error) {
	n := strings.TrimSuffix(name, "/")
	switch {
	case n == "" || strings.ContainsRune(n, 0):
		return "", fmt.Errorf("%w: entry %q", ErrUnsafePath, name)
	case strings.Contains(n, `\`):
		// zip names use "/"; a backslash is a Windows separator in disguise.
		return "", fmt.Errorf("%w: entry %q has a backslash", ErrUnsafePath, name)
	case path.IsAbs(n) || len(n) >= 2 && n[1] == ':':
		return "", fmt.Errorf("%w: entry %q is absolute", ErrUnsafePath, name)
	}
	for _, part := range strings.Split(n, "/") {
		if part == ".." {
			return "", fmt.Errorf("%w: entry %q leaves the directory", ErrUnsafePath, name)
		}
	}
	c := path.Clean(n)
	if c == "." || !filepath.IsLocal(filepath.FromSlash(c)) {
		return "", fmt.Errorf("%w: entry %q", ErrUnsafePath, name)
	}
	return c, nil
}

type extractor struct {
	root   *os.Root
	budget int64 // bytes still allowed
	st     Stats
	done   []written
	logf   Logf
}

type written struct {
	name  string
	mode  fs.FileMode
	mtime time.Time
	link  bool
}

func (x *extractor) entry(f *zip.File, name string) error {
	mode := f.Mode()
	parent := path.Dir(name)
	if parent != "." {
		if err := x.root.MkdirAll(parent, 0o755); err != nil {
			return x.pathErr(name, err)
		}
	}
	switch {
	case mode.IsDir():
		if err := x.root.Mkdir(name, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return x.pathErr(name, err)
		}
		if fi, err := x.root.Lstat(name); err != nil || !fi.IsDir() {
			return x.pathErr(name, fmt.Errorf("not a directory"))
		}
		x.st.Dirs++
		x.done = append(x.done, written{name: name, mode: mode.Perm()})
	case mode&fs.ModeSymlink != 0:
		if f.UncompressedSize64 > maxLinkTarget {
			return fmt.Errorf("%w: link %s has a target of %d bytes", ErrTooLarge, name, f.UncompressedSize64)
		}
		rc, err := f.Open()
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		target, err := io.ReadAll(io.LimitReader(rc, maxLinkTarget+1))
		rc.Close()
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		if len(target) > maxLinkTarget || len(target) == 0 || strings.ContainsRune(string(target), 0) {
			return fmt.Errorf("%w: link %s has a bad target", ErrUnsafePath, name)
		}
		if err := x.removeExisting(name); err != nil {
			return err
		}
		if err := x.root.Symlink(string(target), name); err != nil {
			return x.pathErr(name, err)
		}
		x.st.Links++
		x.done = append(x.done, written{name: name, link: true})
	case mode.IsRegular():
		if err := x.file(f, name); err != nil {
			return err
		}
		x.st.Files++
		x.done = append(x.done, written{name: name, mode: mode.Perm(), mtime: f.Modified})
	default:
		x.logf("WARNING: File ignored: %q", name)
	}
	return nil
}

// removeExisting removes a file or link (not a directory) at name, so
// that writing never goes through a link left there.
func (x *extractor) removeExisting(name string) error {
	fi, err := x.root.Lstat(name)
	if err != nil {
		return nil
	}
	if fi.IsDir() {
		return x.pathErr(name, fmt.Errorf("a directory is in the way"))
	}
	if err := x.root.Remove(name); err != nil {
		return x.pathErr(name, err)
	}
	return nil
}

func (x *extractor) file(f *zip.File, name string) error {
	if err := x.removeExisting(name); err != nil {
		return err
	}
	rc, err := f.Open()
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	defer rc.Close()
	out, err := x.root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return x.pathErr(name, err)
	}
	// Never trust the header: write at most what it declared, and at most
	// the budget left.
	allowed := min(int64(f.UncompressedSize64), x.budget)
	n, err := io.Copy(out, io.LimitReader(rc, allowed+1))
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	x.budget -= n
	x.st.Bytes += n
	switch {
	case n > allowed || errors.Is(err, zip.ErrFormat):
		// archive/zip stops reading past the declared size with ErrFormat.
		return fmt.Errorf("%w: %s holds more than its header declares or the limit allows", ErrTooLarge, name)
	case err != nil:
		return fmt.Errorf("%s: %w", name, err)
	case uint64(n) != f.UncompressedSize64:
		return fmt.Errorf("%s: %d bytes, header declares %d", name, n, f.UncompressedSize64)
	}
	return nil
}

func (x *extractor) pathErr(name string, err error) error {
	if strings.Contains(err.Error(), "escapes") {
		return fmt.Errorf("%w: %s: %v", ErrUnsafePath, name, err)
	}
	return fmt.Errorf("%s: %w", name, err)
}
