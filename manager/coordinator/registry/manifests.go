package registry

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
)

// journalEntry is one line of the manifest journal.
type journalEntry struct {
	Op          string `json:"op"` // put or delete
	Repo        string `json:"repo"`
	Ref         string `json:"ref"`
	ContentType string `json:"content_type,omitempty"`
	Body        []byte `json:"body,omitempty"`
}

// manifestJournal keeps the manifests pushed, so a restart serves them again.
type manifestJournal struct {
	mu   sync.Mutex
	path string
	f    *os.File
	live map[string]bool // repo@ref of manifests present
}

// openJournal replays a journal into inner (compacting it) and opens it for appends.
func openJournal(path string, inner http.Handler) (*manifestJournal, error) {
	j := &manifestJournal{path: path, live: map[string]bool{}}
	latest := map[string]journalEntry{}
	var order []string
	if f, err := os.Open(path); err == nil {
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 64<<10), 2*maxManifestBytes)
		for sc.Scan() {
			var e journalEntry
			if json.Unmarshal(sc.Bytes(), &e) != nil {
				continue // a torn last line after a crash
			}
			k := e.Repo + "@" + e.Ref
			if _, seen := latest[k]; !seen {
				order = append(order, k)
			}
			latest[k] = e
		}
		f.Close()
		if err := sc.Err(); err != nil {
			return nil, fmt.Errorf("registry: read %s: %w", path, err)
		}
	} else if !os.IsNotExist(err) {
		return nil, fmt.Errorf("registry: %w", err)
	}
	var kept bytes.Buffer
	for _, k := range order {
		e := latest[k]
		if e.Op != "put" {
			continue
		}
		req, _ := http.NewRequest(http.MethodPut, "/v2/"+e.Repo+"/manifests/"+e.Ref, bytes.NewReader(e.Body))
		req.Header.Set("Content-Type", e.ContentType)
		rec := &statusRecorder{header: http.Header{}}
		inner.ServeHTTP(rec, req)
		if rec.status != http.StatusCreated {
			continue
		}
		j.live[k] = true
		b, _ := json.Marshal(e)
		kept.Write(append(b, '\n'))
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, kept.Bytes(), 0o644); err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	j.f = f
	return j, nil
}

func (j *manifestJournal) append(e journalEntry) error {
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if _, err := j.f.Write(append(b, '\n')); err != nil {
		return err
	}
	k := e.Repo + "@" + e.Ref
	if e.Op == "put" {
		j.live[k] = true
	} else {
		delete(j.live, k)
	}
	return nil
}

func (j *manifestJournal) count() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return len(j.live)
}

func (j *manifestJournal) close() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.f.Close()
}

// statusRecorder captures the status of an inner call.
type statusRecorder struct {
	header http.Header
	status int
	w      http.ResponseWriter // nil: discard the body
}

func (s *statusRecorder) Header() http.Header { return s.header }
func (s *statusRecorder) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
		if s.w != nil {
			s.w.WriteHeader(code)
		}
	}
}
func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.WriteHeader(http.StatusOK)
	}
	if s.w == nil {
		return len(b), nil
	}
	return s.w.Write(b)
}

// serveManifest passes manifest calls to go-containerregistry, bounding
// their size and journaling successful pushes and deletes.
func (r *Registry) serveManifest(w http.ResponseWriter, req *http.Request, rt route) {
	var body []byte
	if req.Method == http.MethodPut {
		if r.journal.count() >= maxManifests {
			writeError(w, http.StatusTooManyRequests, "TOOMANYREQUESTS", fmt.Sprintf("the registry holds %d manifests already", maxManifests))
			return
		}
		b, err := io.ReadAll(http.MaxBytesReader(w, req.Body, maxManifestBytes))
		if err != nil {
			writeError(w, http.StatusRequestEntityTooLarge, "MANIFEST_INVALID", fmt.Sprintf("manifest larger than %d bytes", maxManifestBytes))
			return
		}
		body = b
		req.Body = io.NopCloser(bytes.NewReader(b))
	}
	rec := &statusRecorder{header: w.Header(), w: w}
	r.inner.ServeHTTP(rec, req)
	var e journalEntry
	switch {
	case req.Method == http.MethodPut && rec.status == http.StatusCreated:
		e = journalEntry{Op: "put", Repo: rt.name, Ref: rt.ref, ContentType: req.Header.Get("Content-Type"), Body: body}
	case req.Method == http.MethodDelete && rec.status == http.StatusAccepted:
		e = journalEntry{Op: "delete", Repo: rt.name, Ref: rt.ref}
	default:
		return
	}
	if err := r.journal.append(e); err != nil {
		r.log.Error("registry: manifest journal", "err", err, "repository", rt.name, "ref", rt.ref)
	}
}
