package cachestore

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
)

// Local is the cache store the manager serves itself, for users with no
// bucket and for the local demo: archives on the manager's disk, reached
// by jobs through HMAC-signed URLs that name the object, the method and an
// expiry. It serves one manager only: the signing key and the files are
// its own.
type Local struct {
	dir      string // objects live in dir/objects
	url      string // the store as VMs see it
	key      []byte
	maxBytes int64
	expiry   time.Duration
	maxPut   int64
	log      *slog.Logger
	now      func() time.Time

	mu sync.Mutex // serializes sweeps with writes
}

// LocalOptions configure a Local store.
type LocalOptions struct {
	// Dir holds the archives and the signing key (created 0700).
	Dir string
	// URL is the store's base URL as jobs see it.
	URL string
	// MaxBytes bounds the disk use; the least recently used objects go first.
	MaxBytes int64
	// Expiry removes objects not written for this long.
	Expiry time.Duration
	// MaxObjectBytes bounds one upload (default 5 GiB).
	MaxObjectBytes int64
	Logger         *slog.Logger
	Now            func() time.Time
}

// Query parameters of a signed URL.
const (
	paramExpires   = "X-Mayfly-Expires"
	paramSignature = "X-Mayfly-Signature"
	localPrefix    = "/cache/"
)

// NewLocal opens (or creates) a local store in opts.Dir.
func NewLocal(opts LocalOptions) (*Local, error) {
	if opts.Dir == "" || opts.URL == "" {
		return nil, errors.New("local cache: Dir and URL are required")
	}
	if err := os.MkdirAll(filepath.Join(opts.Dir, "objects"), 0o700); err != nil {
		return nil, fmt.Errorf("local cache: %w", err)
	}
	keyFile := filepath.Join(opts.Dir, "signing-key")
	key, err := os.ReadFile(keyFile)
	if errors.Is(err, fs.ErrNotExist) || err == nil && len(key) < 32 {
		key = make([]byte, 32)
		if _, err := rand.Read(key); err != nil {
			return nil, err
		}
		if err := os.WriteFile(keyFile, key, 0o600); err != nil {
			return nil, fmt.Errorf("local cache: %w", err)
		}
	} else if err != nil {
		return nil, fmt.Errorf("local cache: %w", err)
	}
	l := &Local{dir: opts.Dir, url: strings.TrimRight(opts.URL, "/"), key: key, maxBytes: opts.MaxBytes, expiry: opts.Expiry,
		maxPut: opts.MaxObjectBytes, log: opts.Logger, now: opts.Now}
	if l.maxPut <= 0 {
		l.maxPut = 5 << 30
	}
	if l.log == nil {
		l.log = slog.Default()
	}
	if l.now == nil {
		l.now = time.Now
	}
	return l, nil
}

func (l *Local) sign(method, object string, expires int64) string {
	m := hmac.New(sha256.New, l.key)
	fmt.Fprintf(m, "%s\n%s\n%d", method, object, expires)
	return hex.EncodeToString(m.Sum(nil))
}

func (l *Local) signedURL(method, object string, ttl time.Duration) string {
	exp := l.now().Add(ttl).Unix()
	q := url.Values{paramExpires: {strconv.FormatInt(exp, 10)}, paramSignature: {l.sign(method, object, exp)}}
	return l.url + localPrefix + (&url.URL{Path: object}).EscapedPath() + "?" + q.Encode()
}

func (l *Local) presign(_ context.Context, object, _ string, ttl time.Duration) (buildscript.CacheURLs, error) {
	return buildscript.CacheURLs{Get: l.signedURL(http.MethodGet, object, ttl), Put: l.signedURL(http.MethodPut, object, ttl)}, nil
}

// storeError answers as S3 and GCS do, which the helper reports.
func storeError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/xml")
	w.WriteHeader(status)
	fmt.Fprintf(w, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>%s</Code><Message>%s</Message></Error>\n", code, msg)
}

// ServeHTTP serves GET, HEAD and PUT of signed URLs.
func (l *Local) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	object, ok := strings.CutPrefix(r.URL.Path, localPrefix)
	if !ok || !filepath.IsLocal(filepath.FromSlash(object)) || strings.Contains(object, `\`) {
		storeError(w, http.StatusNotFound, "NoSuchKey", "no such object")
		return
	}
	method := r.Method
	if method == http.MethodHead {
		method = http.MethodGet
	}
	q := r.URL.Query()
	exp, err := strconv.ParseInt(q.Get(paramExpires), 10, 64)
	sig, _ := hex.DecodeString(q.Get(paramSignature))
	switch {
	case method != http.MethodGet && method != http.MethodPut:
		storeError(w, http.StatusMethodNotAllowed, "MethodNotAllowed", "GET, HEAD or PUT")
		return
	case err != nil || !hmac.Equal(sig, mustHex(l.sign(method, object, exp))):
		storeError(w, http.StatusForbidden, "SignatureDoesNotMatch", "the signature does not match this object and method")
		return
	case l.now().Unix() > exp:
		storeError(w, http.StatusForbidden, "AccessDenied", "Request has expired")
		return
	}
	if method == http.MethodGet {
		l.get(w, r, object)
		return
	}
	l.put(w, r, object)
}

func mustHex(s string) []byte { b, _ := hex.DecodeString(s); return b }

func (l *Local) objects() (*os.Root, error) { return os.OpenRoot(filepath.Join(l.dir, "objects")) }

func (l *Local) get(w http.ResponseWriter, r *http.Request, object string) {
	root, err := l.objects()
	if err != nil {
		storeError(w, http.StatusInternalServerError, "InternalError", err.Error())
		return
	}
	defer root.Close()
	f, err := root.Open(filepath.FromSlash(object))
	if err != nil {
		storeError(w, http.StatusNotFound, "NoSuchKey", "The specified key does not exist.")
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		storeError(w, http.StatusNotFound, "NoSuchKey", "The specified key does not exist.")
		return
	}
	// Reading counts as use for the size cap (least recently used go first).
	now := l.now()
	_ = root.Chtimes(filepath.FromSlash(object), now, fi.ModTime())
	w.Header().Set("ETag", fmt.Sprintf("%q", strconv.FormatInt(fi.ModTime().UnixNano(), 16)))
	w.Header().Set("Content-Type", contentType)
	http.ServeContent(w, r, "", fi.ModTime(), f)
}

func (l *Local) put(w http.ResponseWriter, r *http.Request, object string) {
	if r.ContentLength < 0 {
		storeError(w, http.StatusLengthRequired, "MissingContentLength", "send Content-Length")
		return
	}
	if r.ContentLength > l.maxPut {
		storeError(w, http.StatusRequestEntityTooLarge, "EntityTooLarge", fmt.Sprintf("Your proposed upload exceeds the maximum allowed size of %d bytes", l.maxPut))
		return
	}
	root, err := l.objects()
	if err != nil {
		storeError(w, http.StatusInternalServerError, "InternalError", err.Error())
		return
	}
	defer root.Close()
	name := filepath.FromSlash(object)
	if err := root.MkdirAll(filepath.Dir(name), 0o700); err != nil {
		storeError(w, http.StatusBadRequest, "InvalidArgument", err.Error())
		return
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	tmp := name + ".upload-" + hex.EncodeToString(b[:])
	f, err := root.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		storeError(w, http.StatusInternalServerError, "InternalError", err.Error())
		return
	}
	n, err := io.Copy(f, io.LimitReader(r.Body, r.ContentLength))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil || n != r.ContentLength {
		_ = root.Remove(tmp)
		storeError(w, http.StatusBadRequest, "IncompleteBody", fmt.Sprintf("got %d of %d bytes: %v", n, r.ContentLength, err))
		return
	}
	l.mu.Lock()
	err = root.Rename(tmp, name)
	l.mu.Unlock()
	if err != nil {
		_ = root.Remove(tmp)
		storeError(w, http.StatusInternalServerError, "InternalError", err.Error())
		return
	}
	l.log.Info("cache stored", "object", object, "bytes", n)
	w.WriteHeader(http.StatusOK)
	l.Sweep()
}

// Sweep removes objects not written for longer than the expiry, then the
// least recently used ones while the store is over its size cap.
func (l *Local) Sweep() {
	l.mu.Lock()
	defer l.mu.Unlock()
	type obj struct {
		path  string
		size  int64
		used  time.Time
		wrote time.Time
	}
	var objs []obj
	var total int64
	base := filepath.Join(l.dir, "objects")
	_ = filepath.WalkDir(base, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() || strings.Contains(d.Name(), ".upload-") {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return nil
		}
		used := atime(fi)
		if used.Before(fi.ModTime()) {
			used = fi.ModTime()
		}
		objs = append(objs, obj{p, fi.Size(), used, fi.ModTime()})
		total += fi.Size()
		return nil
	})
	now := l.now()
	sort.Slice(objs, func(i, j int) bool { return objs[i].used.Before(objs[j].used) })
	for _, o := range objs {
		expired := l.expiry > 0 && now.Sub(o.wrote) > l.expiry
		over := l.maxBytes > 0 && total > l.maxBytes
		if !expired && !over {
			continue
		}
		if err := os.Remove(o.path); err == nil {
			total -= o.size
			l.log.Info("cache removed", "object", strings.TrimPrefix(filepath.ToSlash(o.path), filepath.ToSlash(base)+"/"), "expired", expired, "over_size_cap", over && !expired)
		}
	}
}

// sweepInterval is how often Serve sweeps.
const sweepInterval = time.Hour

// Serve serves the store on ln until ctx ends, sweeping every hour.
func (l *Local) Serve(ctx context.Context, ln net.Listener) error {
	hs := &http.Server{Handler: l, ReadHeaderTimeout: 30 * time.Second, IdleTimeout: 2 * time.Minute}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	t := time.NewTicker(sweepInterval)
	defer t.Stop()
	l.Sweep()
	for {
		select {
		case err := <-errc:
			return fmt.Errorf("local cache on %s: %w", ln.Addr(), err)
		case <-t.C:
			l.Sweep()
		case <-ctx.Done():
			sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			err := hs.Shutdown(sctx)
			cancel()
			<-errc
			return err
		}
	}
}
