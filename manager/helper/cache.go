package helper

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"

	"github.com/mayfly-ci/mayfly/manager/helper/archive"
)

// Cache transfers are tried 3 times, as gitlab-runner's cache helpers do
// (one try and two retries); RESTORE_CACHE_ATTEMPTS repeats the stage.
const cacheTries = 3

// DefaultMaxCacheArchiveSize is the largest cache archive uploaded unless
// --max-uploaded-archive-size says otherwise: 5 GB, the hosted runners'
// cap (and S3's largest single PUT).
const DefaultMaxCacheArchiveSize = 5 << 30

func runCacheExtractor(ctx context.Context, c *cli, args []string) error {
	fs := newFlags(c, "cache-extractor")
	var keys, urls strList
	var file string
	var maxBytes int64
	fs.Var(&keys, "key", "cache key, in order of preference; repeatable, each with a --url")
	fs.Var(&urls, "url", "pre-signed GET URL of the cache of the --key before it")
	fs.StringVar(&file, "file", "", "local archive to use when no URL is given")
	fs.Int64Var(&maxBytes, "max-extract-bytes", archive.DefaultMaxBytes, "refuse an archive that would write more than this")
	if err := parse(fs, args); err != nil {
		return err
	}
	if len(keys) == 0 || len(urls) > len(keys) {
		fmt.Fprintln(c.stderr, "cache-extractor: give each --url after its --key")
		return errUsage
	}
	wd, err := absWD()
	if err != nil {
		return err
	}
	client := newHTTPClient()
	for i, key := range keys {
		c.logf("Checking cache for %s...", key)
		var u string
		if i < len(urls) {
			u = urls[i]
		}
		ok, err := extractCache(ctx, c, client, u, file, wd, maxBytes)
		if err != nil {
			c.logf("WARNING: %v", err)
		}
		if ok {
			c.logf("Successfully extracted cache")
			return nil
		}
		c.logf("WARNING: Failed to extract cache")
	}
	return nil
}

// extractCache fetches one cache and extracts it; ok false with no error
// means there is none.
func extractCache(ctx context.Context, c *cli, client *http.Client, rawURL, file, wd string, maxBytes int64) (bool, error) {
	var f *os.File
	if rawURL == "" {
		if file == "" {
			return false, errors.New("no cache store is configured and no local archive")
		}
		lf, err := os.Open(file)
		if err != nil {
			return false, fmt.Errorf("%s: file does not exist", file)
		}
		defer lf.Close()
		f = lf
	} else {
		err := retry(ctx, c, "Downloading cache", cacheTries, func(int) error {
			tmp, found, resp, err := download(ctx, client, rawURL, nil, tempDir(c.env))
			if err != nil {
				return err
			}
			if !found || resp == nil {
				return nil
			}
			c.logf("Downloading cache from %s  ETag=%s", cleanURL(rawURL), resp.Header.Get("ETag"))
			f = tmp
			return nil
		})
		if err != nil {
			return false, fmt.Errorf("download cache: %w", err)
		}
		if f == nil {
			c.logf("WARNING: %s: not found", cleanURL(rawURL))
			return false, nil
		}
		defer removeTemp(f)
	}
	fi, err := f.Stat()
	if err != nil {
		return false, err
	}
	if _, err := archive.ExtractZip(ctx, f, fi.Size(), wd, archive.Limits{MaxBytes: maxBytes}, c.logf); err != nil {
		return false, fmt.Errorf("extract cache: %w", err)
	}
	return true, nil
}

func runCacheArchiver(ctx context.Context, c *cli, args []string) error {
	fs := newFlags(c, "cache-archiver")
	var (
		key, file, rawURL string
		headers, paths    strList
		untracked         bool
		maxSize           int64 = DefaultMaxCacheArchiveSize
		level                   = int(archive.LevelDefault)
	)
	fs.StringVar(&key, "key", "", "cache key (for messages)")
	fs.StringVar(&file, "file", "", "where the archive is written before the upload")
	fs.StringVar(&rawURL, "url", "", "pre-signed PUT URL; empty keeps the archive only here")
	fs.Var(&headers, "header", `"Name: value" sent with the PUT (signed headers); repeatable`)
	fs.Var(&paths, "path", "glob of files to cache; repeatable")
	fs.BoolVar(&untracked, "untracked", false, "add the files git does not track")
	fs.Int64Var(&maxSize, "max-uploaded-archive-size", maxSize, "largest archive uploaded, in bytes (0: no limit)")
	fs.IntVar(&level, "compression-level", level, "flate level: -1 default, 1 fastest … 9 smallest")
	if err := parse(fs, args); err != nil {
		return err
	}
	if file == "" {
		fmt.Fprintln(c.stderr, "cache-archiver: --file is required")
		return errUsage
	}
	wd, err := absWD()
	if err != nil {
		return err
	}
	sel := archive.Selection{Dir: wd, Untracked: untracked}
	for _, p := range paths {
		sel.Paths = append(sel.Paths, expand(p, c.env))
	}
	entries, err := archive.Select(ctx, sel, c.logf)
	if err != nil {
		return err
	}
	if len(entries) == 0 {
		c.logf("WARNING: No files to cache.")
		return nil
	}
	size, err := writeArchiveFile(ctx, file, wd, entries, archive.CompressionLevel(level))
	if err != nil {
		return err
	}
	if rawURL == "" {
		c.logf("No URL provided, cache will not be uploaded to shared cache server. Cache will be stored only locally.")
		return nil
	}
	if maxSize > 0 && size > maxSize {
		c.logf("WARNING: Cache archive %s is %s (%d bytes), over the limit of %s (%d bytes): it is not uploaded.", key, humanBytes(size), size, humanBytes(maxSize), maxSize)
		return nil
	}
	client := newHTTPClient()
	c.logf("Uploading %s to %s", filepath.Base(file), cleanURL(rawURL))
	return retry(ctx, c, "Uploading cache", cacheTries, func(int) error {
		return putFile(ctx, client, rawURL, headers, file)
	})
}

// writeArchiveFile writes a zip of entries next to file, then renames it
// into place, and returns its size.
func writeArchiveFile(ctx context.Context, file, dir string, entries []archive.Entry, level archive.CompressionLevel) (int64, error) {
	if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
		return 0, err
	}
	tmp, err := os.CreateTemp(filepath.Dir(file), "archive_")
	if err != nil {
		return 0, err
	}
	defer os.Remove(tmp.Name())
	if _, err := archive.Write(ctx, tmp, archive.FormatZip, dir, entries, level); err != nil {
		tmp.Close()
		return 0, fmt.Errorf("create cache archive: %w", err)
	}
	fi, err := tmp.Stat()
	if err == nil {
		err = tmp.Close()
	}
	if err != nil {
		return 0, err
	}
	return fi.Size(), os.Rename(tmp.Name(), file)
}

// putFile PUTs file to a pre-signed URL with its length, as object stores
// want it (no chunked encoding).
func putFile(ctx context.Context, client *http.Client, rawURL string, headers []string, file string) error {
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, rawURL, f)
	if err != nil {
		return err
	}
	req.ContentLength = fi.Size()
	for _, h := range headers {
		k, v, ok := strings.Cut(h, ":")
		if ok {
			req.Header.Set(strings.TrimSpace(k), strings.TrimSpace(v))
		}
	}
	if req.Header.Get("Content-Type") == "" {
		req.Header.Set("Content-Type", "application/octet-stream")
	}
	req.Header.Set("Last-Modified", fi.ModTime().UTC().Format(http.TimeFormat))
	resp, err := client.Do(req)
	if err != nil {
		return retryable{err}
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 == 2 {
		return nil
	}
	serr := fmt.Errorf("upload cache: %w", statusError(resp))
	if isTransient(resp.StatusCode) {
		return retryable{serr}
	}
	return serr
}
