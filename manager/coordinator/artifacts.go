package coordinator

import (
	"bufio"
	"bytes"
	"cmp"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// Artifact defaults, as a self-managed GitLab has them unless noted.
const (
	// DefaultMaxArtifactBytes bounds one uploaded artifact (GitLab.com's
	// limit is 1 GB).
	DefaultMaxArtifactBytes = 1 << 30
	// DefaultArtifactsExpireIn applies when a job gives no expire_in.
	DefaultArtifactsExpireIn = 30 * 24 * time.Hour
	// Dotenv report limits: the file must be smaller than this many
	// bytes, and hold at most this many variables (GitLab's defaults).
	dotenvMaxBytes     = 5120
	dotenvMaxVariables = 150
)

// artifactFormats are the formats GitLab accepts in artifact_format.
var artifactFormats = []string{"zip", "gzip", "raw"}

// storedArtifact is one artifact file of a job, on disk.
type storedArtifact struct {
	typ, format, filename string
	path                  string
	size                  int64
	sha256                string
	createdAt, expireAt   time.Time // expireAt zero: never
}

// ArtifactRecord describes a stored artifact (admin API, JobRecord).
type ArtifactRecord struct {
	Type     string    `json:"file_type"`
	Format   string    `json:"file_format"`
	Filename string    `json:"filename"`
	Size     int64     `json:"size"`
	SHA256   string    `json:"file_sha256"`
	Created  time.Time `json:"created_at"`
	ExpireAt time.Time `json:"expire_at,omitzero"`
	// Path is the file on the coordinator's disk.
	Path string `json:"-"`
}

func (a *storedArtifact) record() ArtifactRecord {
	return ArtifactRecord{Type: a.typ, Format: a.format, Filename: a.filename, Size: a.size, SHA256: a.sha256, Created: a.createdAt, ExpireAt: a.expireAt, Path: a.path}
}

func (a *storedArtifact) expired(now time.Time) bool {
	return !a.expireAt.IsZero() && !now.Before(a.expireAt)
}

// artifactsDir is where artifacts are kept, or "" when the coordinator
// has no state directory (artifacts then answer 405, as a GitLab with
// artifacts disabled does).
func (s *Server) artifactsDir() string {
	if s.cfg.StateDir == "" {
		return ""
	}
	return filepath.Join(s.cfg.StateDir, "artifacts")
}

var knownArtifactType = func() map[string]bool {
	m := map[string]bool{"archive": true, "metadata": true, "trace": true}
	for k := range reportFormats {
		m[k] = true
	}
	return m
}()

// handleUploadArtifacts is POST /api/v4/jobs/:id/artifacts: a streamed
// multipart body whose "file" part is stored as it arrives.
func (s *Server) handleUploadArtifacts(w http.ResponseWriter, r *http.Request) {
	dir := s.artifactsDir()
	if dir == "" {
		writeMessage(w, http.StatusMethodNotAllowed, "405 Method Not Allowed: artifacts need the coordinator's state directory")
		return
	}
	id, ok := pathJobID(r)
	if !ok {
		writeMessage(w, http.StatusNotFound, "404 Job Not Found")
		return
	}
	token := cmp.Or(r.Header.Get(runnerapi.HeaderJobToken), r.URL.Query().Get("token"))
	q := r.URL.Query()
	typ := cmp.Or(q.Get("artifact_type"), "archive")
	format := cmp.Or(q.Get("artifact_format"), "zip")
	expireIn := q.Get("expire_in")
	switch {
	case !knownArtifactType[typ]:
		writeMessage(w, http.StatusBadRequest, "400 Bad request - artifact_type does not have a valid value")
		return
	case !slices.Contains(artifactFormats, format):
		writeMessage(w, http.StatusBadRequest, "400 Bad request - artifact_format does not have a valid value")
		return
	}
	s.mu.Lock()
	_, rp, ok := s.authJob(id, token)
	s.mu.Unlock()
	if !ok {
		rp.write(w)
		return
	}
	now := s.now()
	expireAt, err := parseExpireIn(expireIn, now)
	if err != nil {
		writeMessage(w, http.StatusBadRequest, "400 Bad request - expire_in: "+err.Error())
		return
	}
	if expireIn == "" {
		expireAt = now.Add(s.cfg.ArtifactsExpireIn)
	}
	mr, err := r.MultipartReader()
	if err != nil {
		writeMessage(w, http.StatusBadRequest, "400 Bad request - file is missing: "+err.Error())
		return
	}
	var part interface {
		io.Reader
		FileName() string
	}
	for {
		p, err := mr.NextPart()
		if err != nil {
			writeMessage(w, http.StatusBadRequest, "400 Bad request - file is missing")
			return
		}
		if p.FormName() == "file" {
			part = p
			break
		}
	}
	jobDir := filepath.Join(dir, strconv.FormatInt(id, 10))
	if err := os.MkdirAll(jobDir, 0o700); err != nil {
		writeMessage(w, http.StatusInternalServerError, "500 "+err.Error())
		return
	}
	tmp, err := os.CreateTemp(jobDir, "upload-*")
	if err != nil {
		writeMessage(w, http.StatusInternalServerError, "500 "+err.Error())
		return
	}
	defer os.Remove(tmp.Name()) // after the rename, a no-op
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(tmp, h), io.LimitReader(part, s.cfg.MaxArtifactBytes+1))
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	switch {
	case err != nil:
		writeMessage(w, http.StatusBadRequest, "400 Bad request - read file: "+err.Error())
		return
	case n > s.cfg.MaxArtifactBytes:
		writeMessage(w, http.StatusRequestEntityTooLarge, "413 Request Entity Too Large - file size has reached maximum size limit")
		return
	}
	a := &storedArtifact{
		typ: typ, format: format, filename: filepath.Base(cmp.Or(part.FileName(), typ)),
		size: n, sha256: hex.EncodeToString(h.Sum(nil)), createdAt: now, expireAt: expireAt,
		path: filepath.Join(jobDir, typ+"."+format),
	}
	var dotenv []runnerapi.Variable
	if typ == "dotenv" {
		if dotenv, err = parseDotenv(tmp.Name(), format, n); err != nil {
			writeMessage(w, http.StatusBadRequest, "400 Bad request - "+err.Error())
			return
		}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	j, rp, ok := s.authJob(id, token)
	if !ok {
		rp.write(w)
		return
	}
	if old := j.stored[typ]; old != nil {
		if old.sha256 == a.sha256 {
			// A retried upload of the same file is a success, as in GitLab.
			w.WriteHeader(http.StatusCreated)
			io.WriteString(w, "201")
			return
		}
		writeMessage(w, http.StatusBadRequest, "400 Bad request - another artifact of the same type already exists")
		return
	}
	if err := os.Rename(tmp.Name(), a.path); err != nil {
		writeMessage(w, http.StatusInternalServerError, "500 "+err.Error())
		return
	}
	if j.stored == nil {
		j.stored = map[string]*storedArtifact{}
	}
	j.stored[typ] = a
	if typ == "archive" {
		j.artifactsFile = runnerapi.ArtifactsFile{Filename: a.filename, Size: a.size}
	}
	if typ == "dotenv" {
		j.dotenv = dotenv
	}
	s.log.Info("artifact stored", "job_id", j.id, "type", typ, "format", format, "bytes", n, "expire_at", expireAt)
	s.pruneArtifacts(now)
	w.WriteHeader(http.StatusCreated)
	io.WriteString(w, "201")
}

// handleDownloadArtifacts is GET /api/v4/jobs/:id/artifacts: the job's
// archive, to the token of a running job that depends on it, or to the
// job's own token.
func (s *Server) handleDownloadArtifacts(w http.ResponseWriter, r *http.Request) {
	id, ok := pathJobID(r)
	if !ok {
		writeMessage(w, http.StatusNotFound, "404 Job Not Found")
		return
	}
	token := cmp.Or(r.Header.Get(runnerapi.HeaderJobToken), r.URL.Query().Get("token"))
	s.mu.Lock()
	j := s.jobs[id]
	allowed := false
	if j != nil && token != "" {
		if tokenEqual(j.token, token) {
			allowed = true
		} else if by := s.jobsByToken[token]; by != nil && by.processing() && by.pipeline == j.pipeline {
			allowed = slices.Contains(by.pipeline.dependencyJobs(by), j)
		}
	}
	var a *storedArtifact
	if allowed {
		a = j.stored["archive"]
		if a != nil && a.expired(s.now()) {
			s.dropArtifact(j, "archive")
			a = nil
		}
	}
	s.mu.Unlock()
	switch {
	case !allowed:
		writeMessage(w, http.StatusForbidden, "403 Forbidden")
		return
	case a == nil:
		writeMessage(w, http.StatusNotFound, "404 Not Found")
		return
	}
	serveArtifact(w, r, a)
}

func serveArtifact(w http.ResponseWriter, r *http.Request, a *storedArtifact) {
	f, err := os.Open(a.path)
	if err != nil {
		writeMessage(w, http.StatusNotFound, "404 Not Found")
		return
	}
	defer f.Close()
	w.Header().Set("Content-Disposition", mime.FormatMediaType("attachment", map[string]string{"filename": a.filename}))
	w.Header().Set("Content-Type", "application/octet-stream")
	http.ServeContent(w, r, "", a.createdAt, f)
}

// dropArtifact deletes an artifact of j under s.mu.
func (s *Server) dropArtifact(j *job, typ string) {
	a := j.stored[typ]
	if a == nil {
		return
	}
	if err := os.Remove(a.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		s.log.Warn("remove expired artifact", "job_id", j.id, "path", a.path, "err", err)
	}
	delete(j.stored, typ)
	if typ == "archive" {
		j.artifactsFile = runnerapi.ArtifactsFile{}
	}
	s.log.Info("artifact expired", "job_id", j.id, "type", typ)
}

// pruneArtifacts deletes expired artifacts under s.mu (on each upload: no
// goroutine of its own).
func (s *Server) pruneArtifacts(now time.Time) {
	for _, j := range s.jobOrder {
		for typ, a := range j.stored {
			if a.expired(now) {
				s.dropArtifact(j, typ)
			}
		}
	}
}

// JobArtifacts returns the stored artifacts of job id, by type.
func (s *Server) JobArtifacts(id int64) ([]ArtifactRecord, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	j := s.jobs[id]
	if j == nil {
		return nil, notFound("job", id)
	}
	return j.artifactRecords(), nil
}

func (j *job) artifactRecords() []ArtifactRecord {
	out := []ArtifactRecord{}
	for _, a := range j.stored {
		out = append(out, a.record())
	}
	slices.SortFunc(out, func(a, b ArtifactRecord) int { return strings.Compare(a.Type, b.Type) })
	return out
}

// adminArtifacts is GET /-/mayfly/jobs/{id}/artifacts.
func (s *Server) adminArtifacts(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	recs, err := s.JobArtifacts(id)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, recs)
}

// adminArtifactFile is GET /-/mayfly/jobs/{id}/artifacts/{type}.
func (s *Server) adminArtifactFile(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	s.mu.Lock()
	var a *storedArtifact
	if j := s.jobs[id]; j != nil {
		a = j.stored[r.PathValue("type")]
	}
	s.mu.Unlock()
	if a == nil {
		writeMessage(w, http.StatusNotFound, "404 Not Found")
		return
	}
	serveArtifact(w, r, a)
}

// expireUnits are the units GitLab's expire_in takes (ChronicDuration).
var expireUnits = map[string]time.Duration{
	"s": time.Second, "sec": time.Second, "secs": time.Second, "second": time.Second, "seconds": time.Second,
	"m": time.Minute, "min": time.Minute, "mins": time.Minute, "minute": time.Minute, "minutes": time.Minute,
	"h": time.Hour, "hr": time.Hour, "hrs": time.Hour, "hour": time.Hour, "hours": time.Hour,
	"d": 24 * time.Hour, "day": 24 * time.Hour, "days": 24 * time.Hour,
	"w": 7 * 24 * time.Hour, "wk": 7 * 24 * time.Hour, "week": 7 * 24 * time.Hour, "weeks": 7 * 24 * time.Hour,
	"mo": 30 * 24 * time.Hour, "mos": 30 * 24 * time.Hour, "month": 30 * 24 * time.Hour, "months": 30 * 24 * time.Hour,
	"y": 365 * 24 * time.Hour, "yr": 365 * 24 * time.Hour, "yrs": 365 * 24 * time.Hour, "year": 365 * 24 * time.Hour, "years": 365 * 24 * time.Hour,
}

var expireTokenRE = regexp.MustCompile(`(\d+(?:\.\d+)?)\s*([a-z]*)`)

// parseExpireIn reads expire_in ("never", "42", "3 mins 4 sec", "2 hrs
// 20 min", "1 week", "6 mos 1 day") into an expiry time; zero: never.
func parseExpireIn(s string, now time.Time) (time.Time, error) {
	s = strings.ToLower(strings.TrimSpace(s))
	if s == "" || s == "never" {
		return time.Time{}, nil
	}
	rest := strings.NewReplacer(",", " ", " and ", " ").Replace(s)
	if strings.TrimSpace(expireTokenRE.ReplaceAllString(rest, "")) != "" {
		return time.Time{}, fmt.Errorf("%q is not a duration such as \"1 week\" or \"3 hrs 20 min\"", s)
	}
	var total time.Duration
	for _, m := range expireTokenRE.FindAllStringSubmatch(rest, -1) {
		num, unit := m[1], m[2]
		f, err := strconv.ParseFloat(num, 64)
		if err != nil {
			return time.Time{}, fmt.Errorf("%q is not a duration", s)
		}
		d := time.Second
		if unit != "" {
			var ok bool
			if d, ok = expireUnits[unit]; !ok {
				return time.Time{}, fmt.Errorf("%q: unknown unit %q", s, unit)
			}
		}
		total += time.Duration(f * float64(d))
	}
	if total <= 0 {
		return time.Time{}, fmt.Errorf("%q is not a duration such as \"1 week\" or \"3 hrs 20 min\"", s)
	}
	return now.Add(total), nil
}

var dotenvKeyRE = regexp.MustCompile(`^[a-zA-Z0-9_]+$`)

// parseDotenv reads a dotenv report as GitLab does: smaller than 5 KB,
// every line KEY=VALUE (both trimmed), at most 150 variables; gzip holds
// one member per file.
func parseDotenv(path, format string, size int64) ([]runnerapi.Variable, error) {
	if size >= dotenvMaxBytes {
		return nil, fmt.Errorf("Dotenv Artifact Too Big. Maximum Allowable Size: %d", dotenvMaxBytes)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var text []byte
	switch format {
	case "gzip":
		zr, err := gzip.NewReader(bytes.NewReader(raw))
		if err != nil {
			return nil, fmt.Errorf("dotenv: not gzip: %v", err)
		}
		if text, err = io.ReadAll(io.LimitReader(zr, 1<<20)); err != nil {
			return nil, fmt.Errorf("dotenv: %v", err)
		}
	case "raw":
		text = raw
	default:
		return nil, fmt.Errorf("dotenv: artifact_format %s: want gzip", format)
	}
	text = bytes.TrimPrefix(text, []byte("\ufeff"))
	vals := map[string]string{}
	var order []string
	sc := bufio.NewScanner(bytes.NewReader(text))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if !ok {
			return nil, errors.New("Invalid Format")
		}
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if !dotenvKeyRE.MatchString(k) || len(k) > 255 {
			return nil, fmt.Errorf("Validation failed: Key can contain only letters, digits and '_' (%q)", k)
		}
		if _, seen := vals[k]; !seen {
			order = append(order, k)
		}
		vals[k] = v
	}
	if len(order) > dotenvMaxVariables {
		return nil, fmt.Errorf("Dotenv files cannot have more than %d variables", dotenvMaxVariables)
	}
	out := make([]runnerapi.Variable, 0, len(order))
	for _, k := range order {
		out = append(out, runnerapi.Variable{Key: k, Value: vals[k], Public: true})
	}
	return out, nil
}
