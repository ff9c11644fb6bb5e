package archive

import (
	"archive/zip"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strings"
	"unicode"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/gzip"
)

// Formats of an archive, as GitLab names them (artifact_format).
const (
	FormatZip  = "zip"
	FormatGzip = "gzip"
	FormatRaw  = "raw"
)

// Stats count what an archive holds or an extraction wrote.
type Stats struct {
	Files, Dirs, Links int
	// Bytes is the size of the files' contents.
	Bytes int64
}

// maxLinkTarget bounds a symbolic link's target, in archives and out.
const maxLinkTarget = 4096

// CompressionLevel is a flate level: -1 default, 1 fastest … 9 smallest.
type CompressionLevel int

// Compression levels.
const (
	LevelDefault CompressionLevel = -1
	LevelFastest CompressionLevel = 1
	LevelBest    CompressionLevel = 9
)

// Write writes the entries found under dir to w in format, as a stream.
// A zip holds files, directories and links; gzip (GitLab's report format)
// holds one gzip member per regular file, named by its path; raw is the
// content of exactly one regular file.
func Write(ctx context.Context, w io.Writer, format, dir string, entries []Entry, level CompressionLevel) (Stats, error) {
	switch format {
	case FormatZip, "":
		return writeZip(ctx, w, dir, entries, level)
	case FormatGzip:
		return writeGzip(ctx, w, dir, entries, level)
	case FormatRaw:
		return writeRaw(ctx, w, dir, entries)
	}
	return Stats{}, fmt.Errorf("archive format %q: want zip, gzip or raw", format)
}

func writeZip(ctx context.Context, w io.Writer, dir string, entries []Entry, level CompressionLevel) (Stats, error) {
	var st Stats
	zw := zip.NewWriter(w)
	// One compressor for every entry (zip writes one at a time and closes
	// it before the next): a new one per file costs more than a small file.
	var fw *flate.Writer
	zw.RegisterCompressor(zip.Deflate, func(out io.Writer) (io.WriteCloser, error) {
		if fw == nil {
			var err error
			fw, err = flate.NewWriter(out, int(level))
			return fw, err
		}
		fw.Reset(out)
		return fw, nil
	})
	for _, e := range entries {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		if err := addZipEntry(zw, dir, e, &st); err != nil {
			return st, err
		}
	}
	if err := zw.Close(); err != nil {
		return st, fmt.Errorf("finish zip: %w", err)
	}
	return st, nil
}

func addZipEntry(zw *zip.Writer, dir string, e Entry, st *Stats) error {
	full := filepath.Join(dir, filepath.FromSlash(e.Name))
	hdr, err := zip.FileInfoHeader(e.Info)
	if err != nil {
		return fmt.Errorf("%s: %w", e.Name, err)
	}
	hdr.Name = e.Name
	hdr.Modified = e.Info.ModTime()
	mode := e.Info.Mode()
	switch {
	case mode.IsDir():
		hdr.Name += "/"
		hdr.Method = zip.Store
		if _, err := zw.CreateHeader(hdr); err != nil {
			return fmt.Errorf("%s: %w", e.Name, err)
		}
		st.Dirs++
	case mode&fs.ModeSymlink != 0:
		target, err := os.Readlink(full)
		if err != nil {
			return fmt.Errorf("%s: %w", e.Name, err)
		}
		hdr.Method = zip.Store
		hdr.UncompressedSize64 = uint64(len(target))
		fw, err := zw.CreateHeader(hdr)
		if err == nil {
			_, err = io.WriteString(fw, target)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", e.Name, err)
		}
		st.Links++
	case mode.IsRegular():
		f, err := os.Open(full)
		if err != nil {
			return fmt.Errorf("%s: %w", e.Name, err)
		}
		defer f.Close()
		hdr.Method = zip.Deflate
		fw, err := zw.CreateHeader(hdr)
		if err != nil {
			return fmt.Errorf("%s: %w", e.Name, err)
		}
		n, err := io.Copy(fw, f)
		st.Bytes += n
		if err != nil {
			return fmt.Errorf("%s: %w", e.Name, err)
		}
		st.Files++
	default:
		// Sockets, pipes and devices are not archived, as in gitlab-runner.
	}
	return nil
}

// gzipName is how gitlab-runner names a member: printable ASCII as is,
// anything else escaped with an "e:" prefix.
func gzipName(s string) string {
	if !strings.ContainsFunc(s, func(r rune) bool { return r > unicode.MaxASCII || r == '%' }) {
		return s
	}
	return "e:" + url.PathEscape(s)
}

func writeGzip(ctx context.Context, w io.Writer, dir string, entries []Entry, level CompressionLevel) (Stats, error) {
	var st Stats
	for _, e := range entries {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		if !e.Info.Mode().IsRegular() {
			continue
		}
		f, err := os.Open(filepath.Join(dir, filepath.FromSlash(e.Name)))
		if err != nil {
			return st, fmt.Errorf("%s: %w", e.Name, err)
		}
		gz, err := gzip.NewWriterLevel(w, int(level))
		if err != nil {
			f.Close()
			return st, err
		}
		gz.Name = gzipName(path.Base(e.Name))
		gz.Comment = gzipName(e.Name)
		gz.ModTime = e.Info.ModTime()
		n, err := io.Copy(gz, f)
		f.Close()
		if cerr := gz.Close(); err == nil {
			err = cerr
		}
		st.Bytes += n
		if err != nil {
			return st, fmt.Errorf("%s: %w", e.Name, err)
		}
		st.Files++
	}
	return st, nil
}

// ErrTooManyRawFiles is returned when a raw archive would hold more than one file.
var ErrTooManyRawFiles = errors.New("only one file can be sent as raw")

func writeRaw(ctx context.Context, w io.Writer, dir string, entries []Entry) (Stats, error) {
	var files []Entry
	for _, e := range entries {
		if e.Info.Mode().IsRegular() {
			files = append(files, e)
		}
	}
	if len(files) > 1 {
		return Stats{}, fmt.Errorf("%w, got %d", ErrTooManyRawFiles, len(files))
	}
	var st Stats
	for _, e := range files {
		f, err := os.Open(filepath.Join(dir, filepath.FromSlash(e.Name)))
		if err != nil {
			return st, fmt.Errorf("%s: %w", e.Name, err)
		}
		defer f.Close()
		n, err := io.Copy(w, &ctxReader{ctx: ctx, r: f})
		st.Bytes += n
		if err != nil {
			return st, fmt.Errorf("%s: %w", e.Name, err)
		}
		st.Files++
	}
	return st, nil
}

// ctxReader stops reading once ctx ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
