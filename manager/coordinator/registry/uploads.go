package registry

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// blobTransferTimeout bounds one blob upload or download request.
const blobTransferTimeout = 30 * time.Minute

var digestRE = regexp.MustCompile(`^sha256:[a-f0-9]{64}$`)

// errFull is returned when the registry's disk bound is reached.
var errFull = errors.New("the registry's storage limit is reached")

// upload is one blob upload session, streamed to a file.
type upload struct {
	mu      sync.Mutex // one request at a time per session
	id      string
	name    string
	path    string
	hash    hash.Hash
	size    int64
	touched atomic.Int64 // unix nanoseconds of the last request
	done    bool
}

func (r *Registry) blobPath(digest string) string {
	return filepath.Join(r.blobDir, "sha256", strings.TrimPrefix(digest, "sha256:"))
}

func (r *Registry) blobExists(digest string) bool {
	_, err := os.Stat(r.blobPath(digest))
	return err == nil
}

// reserve counts n more bytes on disk, or refuses when that passes MaxBytes.
func (r *Registry) reserve(n int64) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.used+n > r.cfg.MaxBytes {
		return false
	}
	r.used += n
	return true
}

func (r *Registry) release(n int64) {
	r.mu.Lock()
	r.used -= n
	r.mu.Unlock()
}

// quotaWriter writes to f, counting every byte against the disk bound.
type quotaWriter struct {
	r *Registry
	w io.Writer
	n int64
}

func (q *quotaWriter) Write(p []byte) (int, error) {
	if !q.r.reserve(int64(len(p))) {
		return 0, errFull
	}
	n, err := q.w.Write(p)
	q.n += int64(n)
	if n < len(p) {
		q.r.release(int64(len(p) - n))
	}
	return n, err
}

func setDeadlines(w http.ResponseWriter) {
	rc := http.NewResponseController(w)
	d := time.Now().Add(blobTransferTimeout)
	_ = rc.SetReadDeadline(d)
	_ = rc.SetWriteDeadline(d)
}

func (r *Registry) serveUpload(w http.ResponseWriter, req *http.Request, rt route, g Grant) {
	setDeadlines(w)
	q := req.URL.Query()
	if rt.ref == "" {
		if req.Method != http.MethodPost {
			writeError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "POST to start an upload")
			return
		}
		if d, from := q.Get("mount"), q.Get("from"); d != "" && from != "" && digestRE.MatchString(d) && g.Can(from, ActionPull) && r.blobExists(d) {
			r.created(w, rt.name, d)
			return
		}
		u, err := r.newUpload(rt.name)
		if err != nil {
			writeError(w, http.StatusTooManyRequests, "TOOMANYREQUESTS", err.Error())
			return
		}
		if d := q.Get("digest"); d != "" { // monolithic upload
			u.mu.Lock()
			defer u.mu.Unlock()
			r.finishUpload(w, req, u, d)
			return
		}
		r.accepted(w, u)
		return
	}
	r.mu.Lock()
	u := r.uploads[rt.ref]
	r.mu.Unlock()
	if u == nil || u.name != rt.name {
		writeError(w, http.StatusNotFound, "BLOB_UPLOAD_UNKNOWN", "no such upload")
		return
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.done {
		writeError(w, http.StatusNotFound, "BLOB_UPLOAD_UNKNOWN", "upload already finished")
		return
	}
	u.touched.Store(time.Now().UnixNano())
	switch req.Method {
	case http.MethodGet:
		r.progress(w, u, http.StatusNoContent)
	case http.MethodPatch:
		if cr := req.Header.Get("Content-Range"); cr != "" {
			start, _, _ := strings.Cut(strings.TrimPrefix(cr, "bytes="), "-")
			if n, err := strconv.ParseInt(start, 10, 64); err != nil || n != u.size {
				w.Header().Set("Range", fmt.Sprintf("0-%d", u.size-1))
				writeError(w, http.StatusRequestedRangeNotSatisfiable, "BLOB_UPLOAD_INVALID", "Content-Range does not continue the upload")
				return
			}
		}
		if err := r.appendBody(u, req.Body); err != nil {
			r.failUpload(w, u, err)
			return
		}
		r.progress(w, u, http.StatusAccepted)
	case http.MethodPut:
		r.finishUpload(w, req, u, q.Get("digest"))
	case http.MethodDelete:
		r.dropUpload(u)
		w.WriteHeader(http.StatusNoContent)
	default:
		writeError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "GET, PATCH, PUT or DELETE on an upload")
	}
}

func (r *Registry) newUpload(name string) (*upload, error) {
	now := time.Now()
	var stale []*upload
	r.mu.Lock()
	for _, u := range r.uploads {
		if now.Sub(time.Unix(0, u.touched.Load())) > uploadIdle {
			stale = append(stale, u)
		}
	}
	r.mu.Unlock()
	for _, u := range stale {
		u.mu.Lock()
		r.dropUpload(u)
		u.mu.Unlock()
	}
	id := strings.ToLower(rand.Text())
	u := &upload{id: id, name: name, path: filepath.Join(r.upDir, id), hash: sha256.New()}
	u.touched.Store(now.UnixNano())
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.uploads) >= maxUploads {
		return nil, fmt.Errorf("%d uploads are in progress; retry later", maxUploads)
	}
	r.uploads[id] = u
	return u, nil
}

// appendBody adds a request body to an upload (u.mu held).
func (r *Registry) appendBody(u *upload, body io.Reader) error {
	f, err := os.OpenFile(u.path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	qw := &quotaWriter{r: r, w: io.MultiWriter(f, u.hash)}
	_, err = io.Copy(qw, body)
	u.size += qw.n
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// finishUpload appends the last body, checks the digest and stores the blob (u.mu held).
func (r *Registry) finishUpload(w http.ResponseWriter, req *http.Request, u *upload, digest string) {
	if !digestRE.MatchString(digest) {
		r.dropUpload(u)
		writeError(w, http.StatusBadRequest, "DIGEST_INVALID", "digest must be sha256:<64 hex digits>")
		return
	}
	if err := r.appendBody(u, req.Body); err != nil {
		r.failUpload(w, u, err)
		return
	}
	if got := "sha256:" + hex.EncodeToString(u.hash.Sum(nil)); got != digest {
		r.dropUpload(u)
		writeError(w, http.StatusBadRequest, "DIGEST_INVALID", fmt.Sprintf("content has digest %s, not %s", got, digest))
		return
	}
	dest := r.blobPath(digest)
	if err := os.MkdirAll(filepath.Dir(dest), 0o755); err != nil {
		r.failUpload(w, u, err)
		return
	}
	if _, err := os.Stat(u.path); os.IsNotExist(err) { // an empty blob
		if err := os.WriteFile(u.path, nil, 0o644); err != nil {
			r.failUpload(w, u, err)
			return
		}
	}
	if r.blobExists(digest) {
		r.dropUpload(u) // the same content is there already
	} else {
		if err := os.Rename(u.path, dest); err != nil {
			r.failUpload(w, u, err)
			return
		}
		u.done = true
		r.mu.Lock()
		delete(r.uploads, u.id)
		r.mu.Unlock()
	}
	r.created(w, u.name, digest)
}

func (r *Registry) failUpload(w http.ResponseWriter, u *upload, err error) {
	r.dropUpload(u)
	if errors.Is(err, errFull) {
		r.log.Warn("registry upload refused: storage limit", "repository", u.name, "max_bytes", r.cfg.MaxBytes)
		writeError(w, http.StatusRequestEntityTooLarge, "SIZE_INVALID", fmt.Sprintf("%v (%d bytes)", errFull, r.cfg.MaxBytes))
		return
	}
	writeError(w, http.StatusInternalServerError, "UNKNOWN", "upload: "+err.Error())
}

// dropUpload removes an upload and gives its bytes back (u.mu held).
func (r *Registry) dropUpload(u *upload) {
	if u.done {
		return
	}
	u.done = true
	if err := os.Remove(u.path); err == nil || os.IsNotExist(err) {
		r.release(u.size)
	}
	r.mu.Lock()
	delete(r.uploads, u.id)
	r.mu.Unlock()
}

func (r *Registry) accepted(w http.ResponseWriter, u *upload) {
	r.progress(w, u, http.StatusAccepted)
}

func (r *Registry) progress(w http.ResponseWriter, u *upload, status int) {
	w.Header().Set("Location", "/v2/"+u.name+"/blobs/uploads/"+u.id)
	w.Header().Set("Docker-Upload-UUID", u.id)
	end := u.size - 1
	if end < 0 {
		end = 0
	}
	w.Header().Set("Range", fmt.Sprintf("0-%d", end))
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(status)
}

func (r *Registry) created(w http.ResponseWriter, name, digest string) {
	w.Header().Set("Location", "/v2/"+name+"/blobs/"+digest)
	w.Header().Set("Docker-Content-Digest", digest)
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(http.StatusCreated)
}

// serveBlob serves GET and HEAD of a blob (with ranges) and DELETE.
func (r *Registry) serveBlob(w http.ResponseWriter, req *http.Request, rt route) {
	if !digestRE.MatchString(rt.ref) {
		writeError(w, http.StatusBadRequest, "DIGEST_INVALID", "digest must be sha256:<64 hex digits>")
		return
	}
	p := r.blobPath(rt.ref)
	switch req.Method {
	case http.MethodGet, http.MethodHead:
		setDeadlines(w)
		f, err := os.Open(p)
		if err != nil {
			writeError(w, http.StatusNotFound, "BLOB_UNKNOWN", "blob unknown to registry")
			return
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			writeError(w, http.StatusInternalServerError, "UNKNOWN", err.Error())
			return
		}
		w.Header().Set("Docker-Content-Digest", rt.ref)
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Etag", `"`+rt.ref+`"`)
		http.ServeContent(w, req, "", st.ModTime(), f)
	case http.MethodDelete:
		st, err := os.Stat(p)
		if err != nil {
			writeError(w, http.StatusNotFound, "BLOB_UNKNOWN", "blob unknown to registry")
			return
		}
		if err := os.Remove(p); err != nil {
			writeError(w, http.StatusInternalServerError, "UNKNOWN", err.Error())
			return
		}
		r.release(st.Size())
		w.WriteHeader(http.StatusAccepted)
	default:
		writeError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "GET, HEAD or DELETE on a blob")
	}
}
