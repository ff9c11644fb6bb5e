// Package cachestore signs the URLs of the distributed cache on the
// manager's side, as gitlab-runner does: GCS (cloud.google.com/go/storage
// SignedURL, V4), S3 (aws-sdk-go-v2's presign client) or the local store
// the manager serves itself (HMAC-signed URLs, see Local). The job's VM
// gets only the URLs; no credential of the store ever enters it.
//
// Objects are named as gitlab-runner names them, so an existing bucket's
// caches stay valid: <Path>/runner/<short token>/project/<id>/<key>, or
// <Path>/project/<id>/<key> when the cache is Shared.
package cachestore

import (
	"context"
	"fmt"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/config"
)

// contentType is what the helper sends with a PUT (and the URL is signed for).
const contentType = "application/octet-stream"

// presigner signs one object's GET and PUT.
type presigner interface {
	presign(ctx context.Context, object, key string, ttl time.Duration) (buildscript.CacheURLs, error)
}

// Signer is a runner's cache: it names objects and has them signed. It
// implements buildscript.CacheSigner.
type Signer struct {
	path       string
	shared     bool
	shortToken string
	p          presigner
	// timeout bounds one signing (a GCS signing without a key calls the
	// IAM Credentials API).
	timeout time.Duration
}

var _ buildscript.CacheSigner = (*Signer)(nil)

// ObjectName is the object of a project's cache key, as gitlab-runner
// forms it; ok is false when the key would leave the project's prefix.
func ObjectName(prefix string, shared bool, shortToken string, projectID int64, key string) (string, bool) {
	ns := ""
	if !shared {
		ns = path.Join("runner", shortToken)
	}
	base := path.Join(prefix, ns, "project", strconv.FormatInt(projectID, 10))
	full := path.Join(base, key)
	return full, key != "" && strings.HasPrefix(full, base+"/")
}

// CacheURLs implements buildscript.CacheSigner.
func (s *Signer) CacheURLs(projectID int64, key string, ttl time.Duration) (buildscript.CacheURLs, error) {
	obj, ok := ObjectName(s.path, s.shared, s.shortToken, projectID, key)
	if !ok {
		return buildscript.CacheURLs{}, fmt.Errorf("cache key %q: computed cache path outside of project bucket", key)
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	urls, err := s.p.presign(ctx, obj, key, ttl)
	if err != nil {
		return buildscript.CacheURLs{}, fmt.Errorf("sign %s: %w", obj, err)
	}
	return urls, nil
}

// New returns the signer of a runner's [runners.cache]. A local cache is
// served by local, which the caller runs (Local.Serve); nil for other
// types.
func New(ctx context.Context, c *config.Cache, shortToken string, local *Local) (*Signer, error) {
	s := &Signer{path: c.Path, shared: c.Shared, shortToken: shortToken, timeout: 30 * time.Second}
	var err error
	switch {
	case c.GCS != nil:
		s.p, err = newGCS(ctx, c.GCS, c.MaxUploadedArchiveSize)
	case c.S3 != nil:
		s.p, err = newS3(ctx, c.S3)
	case c.Local != nil:
		if local == nil {
			return nil, fmt.Errorf("cache type local: no local store")
		}
		s.p = local
	default:
		return nil, fmt.Errorf("cache type %q: not supported", c.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("cache %s: %w", c, err)
	}
	return s, nil
}
