// Package registry is the coordinator's container registry, served as
// GitLab serves its own: the OCI distribution API under /v2/ with Docker's
// token authentication (a Bearer challenge naming the realm /jwt/auth, where
// a client trades HTTP basic credentials for a token scoped to
// repository:<name>:pull,push).
//
// Manifests, tags, the catalog and referrers are go-containerregistry's
// pkg/registry. Blobs are stored on disk under Dir/blobs (the layout of
// that package's disk handler) and uploaded by this package, streaming to
// disk, because the library keeps uploads in memory. Manifests are kept in
// memory and journaled to Dir/manifests.jsonl, so a restart keeps every
// image. Disk use is bounded by Config.MaxBytes (blobs and uploads in
// progress); nothing is garbage-collected.
package registry

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	ggcr "github.com/google/go-containerregistry/pkg/registry"
)

// Defaults and bounds.
const (
	// DefaultMaxBytes bounds the blobs on disk when Config.MaxBytes is 0.
	DefaultMaxBytes = 10 << 30
	// Service is the token service name, as GitLab names its registry's.
	Service = "container_registry"
	// TokenPath is the token realm's path, GitLab's.
	TokenPath = "/jwt/auth"

	maxManifestBytes = 4 << 20
	maxManifests     = 50_000
	maxUploads       = 64
	uploadIdle       = time.Hour
	tokenLifetime    = 5 * time.Minute
	maxTokens        = 100_000
)

// Actions on a repository.
const (
	ActionPull   = "pull"
	ActionPush   = "push"
	ActionDelete = "delete"
)

// Grant tells what a caller may do.
type Grant interface {
	// Can reports whether the caller may do action on repository name.
	Can(name, action string) bool
	// Admin reports whether the caller may list the catalog.
	Admin() bool
}

// Authenticator checks HTTP basic credentials and returns what they grant;
// ok is false when they are wrong. user and password are empty for an
// anonymous request (a nil Grant refuses it).
type Authenticator func(user, password string) (g Grant, ok bool)

// Config configures a Registry.
type Config struct {
	Dir string // storage; created if missing
	// MaxBytes bounds the bytes of blobs on disk, uploads included. 0: DefaultMaxBytes.
	MaxBytes int64
	// Realm returns the token realm URL for a request (the coordinator's
	// external URL + TokenPath).
	Realm func(r *http.Request) string
	Auth  Authenticator
	Log   *slog.Logger
	Now   func() time.Time
}

// Registry is an http.Handler serving /v2/ and the token realm.
type Registry struct {
	cfg     Config
	log     *slog.Logger
	blobDir string
	upDir   string
	inner   http.Handler // go-containerregistry: manifests, tags, catalog, referrers
	journal *manifestJournal

	mu      sync.Mutex
	used    int64 // bytes of blobs and uploads on disk
	uploads map[string]*upload
	tokens  map[string]*token
}

// New opens (or creates) a registry in cfg.Dir and replays its manifests.
func New(cfg Config) (*Registry, error) {
	if cfg.Dir == "" || cfg.Auth == nil || cfg.Realm == nil {
		return nil, errors.New("registry: Dir, Auth and Realm are required")
	}
	cfg.MaxBytes = cmp.Or(cfg.MaxBytes, DefaultMaxBytes)
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	r := &Registry{
		cfg: cfg, log: cfg.Log.With("component", "registry"),
		blobDir: filepath.Join(cfg.Dir, "blobs"), upDir: filepath.Join(cfg.Dir, "uploads"),
		uploads: map[string]*upload{}, tokens: map[string]*token{},
	}
	for _, d := range []string{r.blobDir, r.upDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("registry: %w", err)
		}
	}
	// Uploads do not survive a restart.
	if err := os.RemoveAll(r.upDir); err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	if err := os.MkdirAll(r.upDir, 0o755); err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	used, err := dirSize(r.blobDir)
	if err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	r.used = used
	r.inner = ggcr.New(ggcr.Logger(log.New(io.Discard, "", 0)), ggcr.WithBlobHandler(ggcr.NewDiskBlobHandler(r.blobDir)), ggcr.WithReferrersSupport(true))
	if r.journal, err = openJournal(filepath.Join(cfg.Dir, "manifests.jsonl"), r.inner); err != nil {
		return nil, err
	}
	return r, nil
}

// Close closes the manifest journal.
func (r *Registry) Close() error { return r.journal.close() }

// UsedBytes is the disk space blobs and uploads take now.
func (r *Registry) UsedBytes() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.used
}

func dirSize(dir string) (int64, error) {
	var n int64
	err := filepath.WalkDir(dir, func(_ string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		info, err := d.Info()
		if err == nil {
			n += info.Size()
		}
		return err
	})
	return n, err
}

// nameRE is the OCI distribution repository name grammar.
var nameRE = regexp.MustCompile(`^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$`)

// route is what a /v2/ request is about.
type route struct {
	name   string // repository; "" for /v2/ and the catalog
	kind   string // ping, catalog, manifests, blobs, uploads, tags, referrers
	ref    string // tag, digest or upload id
	action string
}

func parseRoute(r *http.Request) (route, bool) {
	p := strings.TrimPrefix(r.URL.Path, "/v2")
	if p == "" || p == "/" {
		return route{kind: "ping"}, true
	}
	if p == "/_catalog" {
		return route{kind: "catalog", action: ActionPull}, true
	}
	p = strings.TrimPrefix(p, "/")
	rt := route{action: ActionPull}
	switch r.Method {
	case http.MethodGet, http.MethodHead:
	case http.MethodDelete:
		rt.action = ActionDelete
	default:
		rt.action = ActionPush
	}
	for _, marker := range []string{"/blobs/uploads/", "/blobs/uploads", "/manifests/", "/blobs/", "/tags/list", "/referrers/"} {
		i := strings.LastIndex(p, marker)
		if i <= 0 {
			continue
		}
		rt.name, rt.ref = p[:i], p[i+len(marker):]
		rt.kind = strings.Trim(strings.Split(strings.TrimPrefix(marker, "/"), "/")[0], "/")
		if strings.HasPrefix(marker, "/blobs/uploads") {
			rt.kind = "uploads"
			if rt.action == ActionDelete {
				rt.action = ActionPush // canceling one's own upload
			}
		}
		if marker == "/tags/list" {
			rt.kind = "tags"
		}
		return rt, nameRE.MatchString(rt.name) && len(rt.name) <= 255
	}
	return route{}, false
}

// ServeHTTP serves /v2/… and the token realm.
func (r *Registry) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if req.URL.Path == TokenPath {
		r.serveToken(w, req)
		return
	}
	rt, ok := parseRoute(req)
	if !ok {
		writeError(w, http.StatusNotFound, "NAME_INVALID", "not a registry path or an invalid repository name")
		return
	}
	g := r.authenticate(req)
	if g == nil {
		r.challenge(w, req, rt, "")
		return
	}
	switch {
	case rt.kind == "ping":
	case rt.kind == "catalog":
		if !g.Admin() {
			r.challenge(w, req, rt, "registry:catalog:*")
			return
		}
	case !g.Can(rt.name, rt.action):
		r.challenge(w, req, rt, "repository:"+rt.name+":"+rt.action)
		return
	}
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	switch rt.kind {
	case "ping":
		w.WriteHeader(http.StatusOK)
	case "uploads":
		r.serveUpload(w, req, rt, g)
	case "blobs":
		r.serveBlob(w, req, rt)
	case "manifests":
		r.serveManifest(w, req, rt)
	default:
		r.inner.ServeHTTP(w, req)
	}
}

// writeError writes the distribution API's error body.
func writeError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"errors":[{"code":%q,"message":%q}]}`+"\n", code, msg)
}

// challenge answers 401 with the Bearer challenge Docker follows.
func (r *Registry) challenge(w http.ResponseWriter, req *http.Request, rt route, scope string) {
	c := fmt.Sprintf(`Bearer realm=%q,service=%q`, r.cfg.Realm(req), Service)
	if scope != "" {
		c += fmt.Sprintf(`,scope=%q,error="insufficient_scope"`, scope)
	}
	w.Header().Set("WWW-Authenticate", c)
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	if scope != "" {
		writeError(w, http.StatusUnauthorized, "DENIED", "access to "+scope+" is not granted")
		return
	}
	writeError(w, http.StatusUnauthorized, "UNAUTHORIZED", "authentication required")
}
