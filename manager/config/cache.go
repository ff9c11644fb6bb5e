package config

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
)

// Cache is a runner's [runners.cache]: the distributed cache. The manager
// signs URLs with these settings; jobs get only the URLs.
type Cache struct {
	// Type is "gcs", "s3" or "local" (the store the manager serves itself).
	Type string
	// Path prefixes every object name; Shared drops the runner/<short
	// token>/ part, so runners share caches (gitlab-runner's names).
	Path   string
	Shared bool
	// MaxUploadedArchiveSize is the largest archive a job uploads, in bytes
	// (default DefaultMaxUploadedArchiveSize, the hosted runners' 5 GB).
	MaxUploadedArchiveSize int64
	GCS                    *CacheGCS
	S3                     *CacheS3
	Local                  *CacheLocal
}

// CacheGCS is [runners.cache.gcs].
type CacheGCS struct {
	BucketName string
	// CredentialsFile is a service account key (JSON) whose key signs the
	// URLs; or AccessID (the account's e-mail) and PrivateKey (PEM). With
	// neither, the manager's own service account signs through the IAM
	// Credentials API (it needs iam.serviceAccounts.signBlob on itself).
	CredentialsFile, AccessID, PrivateKey string
	// Endpoint replaces https://storage.googleapis.com (emulators, tests),
	// as the VMs reach it: the signed URLs name its host, and the host is
	// part of the signature.
	Endpoint string
}

// CacheS3 is [runners.cache.s3].
type CacheS3 struct {
	// ServerAddress is host[:port] of the store as the VMs reach it (the
	// presigned URLs name it, and SigV4 signs the host); empty is AWS.
	ServerAddress                      string
	BucketName, BucketLocation         string
	AccessKey, SecretKey, SessionToken string
	// AuthenticationType is "access-key" or "iam" (the manager's own role);
	// empty picks access-key when ServerAddress and both keys are set.
	AuthenticationType string
	Insecure           bool
	// PathStyle forces path-style URLs; nil: path style for a custom
	// ServerAddress, virtual-hosted style on AWS.
	PathStyle *bool
}

// CacheLocal is [runners.cache.local]: the store mayfly serves itself, for
// a single manager (no bucket needed).
type CacheLocal struct {
	// Dir holds the archives and the signing key.
	Dir string
	// ListenAddress is where the manager serves it (default 127.0.0.1:9253).
	ListenAddress string
	// URL is the store as jobs' VMs see it (default http://<ListenAddress>);
	// local qemu VMs see 127.0.0.1:PORT as http://10.0.2.2:PORT.
	URL string
	// MaxSizeMB bounds the store's disk use; the least recently used
	// archives go first (default 10240).
	MaxSizeMB int64
	// ExpiryDays removes archives not written for this long (default 14,
	// as the hosted runners' bucket).
	ExpiryDays int
}

// Defaults of [runners.cache].
const (
	DefaultMaxUploadedArchiveSize = 5 << 30
	DefaultLocalCacheListen       = "127.0.0.1:9253"
	DefaultLocalCacheMaxSizeMB    = 10240
	DefaultLocalCacheExpiryDays   = 14
)

type fileCache struct {
	Type                   string          `toml:"Type"`
	Path                   string          `toml:"Path"`
	Shared                 bool            `toml:"Shared"`
	MaxUploadedArchiveSize *int64          `toml:"MaxUploadedArchiveSize"`
	GCS                    *fileCacheGCS   `toml:"gcs"`
	S3                     *fileCacheS3    `toml:"s3"`
	Local                  *fileCacheLocal `toml:"local"`
}

type fileCacheGCS struct {
	BucketName      string `toml:"BucketName"`
	CredentialsFile string `toml:"CredentialsFile"`
	AccessID        string `toml:"AccessID"`
	PrivateKey      string `toml:"PrivateKey"`
	Endpoint        string `toml:"Endpoint"`
}

type fileCacheS3 struct {
	ServerAddress      string `toml:"ServerAddress"`
	AccessKey          string `toml:"AccessKey"`
	SecretKey          string `toml:"SecretKey"`
	SessionToken       string `toml:"SessionToken"`
	BucketName         string `toml:"BucketName"`
	BucketLocation     string `toml:"BucketLocation"`
	AuthenticationType string `toml:"AuthenticationType"`
	Insecure           bool   `toml:"Insecure"`
	PathStyle          *bool  `toml:"PathStyle"`
}

type fileCacheLocal struct {
	Dir           string `toml:"Dir"`
	ListenAddress string `toml:"ListenAddress"`
	URL           string `toml:"URL"`
	MaxSizeMB     *int64 `toml:"MaxSizeMB"`
	ExpiryDays    *int   `toml:"ExpiryDays"`
}

func init() {
	for _, k := range []string{"ServerSideEncryption", "ServerSideEncryptionKeyID", "DualStack", "Accelerate", "RoleARN", "UploadRoleARN", "AssumeRoleMaxConcurrency", "DisableAssumeRoleCredentialsCaching"} {
		ignoredKeys["runners.cache.s3."+k] = "not supported by mayfly's cache signing"
	}
	ignoredKeys["runners.cache.gcs.UniverseDomain"] = "only the default universe (googleapis.com) is supported"
	ignoredKeys["runners.cache.azure"] = "Azure Blob Storage is not supported; use gcs, s3 or local"
}

// cache validates [runners.cache]; nil when the runner has none (caches
// then live and die with the job's VM).
func (b *builder) cache(key string, c *fileCache) *Cache {
	if c == nil || c.Type == "" && c.GCS == nil && c.S3 == nil && c.Local == nil {
		return nil
	}
	k := func(s string) string { return key + "." + s }
	out := &Cache{Type: c.Type, Path: strings.Trim(c.Path, "/"), Shared: c.Shared, MaxUploadedArchiveSize: DefaultMaxUploadedArchiveSize}
	if c.MaxUploadedArchiveSize != nil {
		if *c.MaxUploadedArchiveSize < 0 {
			b.errorf(k("MaxUploadedArchiveSize"), "want a number of bytes (0: the default 5 GB), got %d", *c.MaxUploadedArchiveSize)
		} else if *c.MaxUploadedArchiveSize > 0 {
			out.MaxUploadedArchiveSize = *c.MaxUploadedArchiveSize
		}
	}
	if strings.Contains(out.Path, "..") {
		b.errorf(k("Path"), "must not contain '..', got %q", c.Path)
	}
	switch c.Type {
	case "gcs":
		g := c.GCS
		if g == nil {
			b.errorf(k("gcs"), "Type = \"gcs\" needs a [runners.cache.gcs] section with BucketName")
			return out
		}
		out.GCS = &CacheGCS{BucketName: g.BucketName, CredentialsFile: g.CredentialsFile, AccessID: g.AccessID, PrivateKey: g.PrivateKey, Endpoint: g.Endpoint}
		if g.BucketName == "" {
			b.errorf(k("gcs.BucketName"), "is required")
		}
		if (g.AccessID == "") != (g.PrivateKey == "") {
			b.errorf(k("gcs.AccessID"), "AccessID and PrivateKey go together")
		}
		if g.CredentialsFile != "" && g.AccessID != "" {
			b.errorf(k("gcs.CredentialsFile"), "set CredentialsFile or AccessID/PrivateKey, not both")
		}
		if g.CredentialsFile != "" {
			if _, err := os.Stat(g.CredentialsFile); err != nil {
				b.errorf(k("gcs.CredentialsFile"), "%v", err)
			}
		}
		b.httpURL(k("gcs.Endpoint"), g.Endpoint)
	case "s3":
		s := c.S3
		if s == nil {
			b.errorf(k("s3"), "Type = \"s3\" needs a [runners.cache.s3] section with BucketName")
			return out
		}
		out.S3 = &CacheS3{ServerAddress: s.ServerAddress, BucketName: s.BucketName, BucketLocation: s.BucketLocation, AccessKey: s.AccessKey,
			SecretKey: s.SecretKey, SessionToken: s.SessionToken, AuthenticationType: strings.ToLower(s.AuthenticationType), Insecure: s.Insecure, PathStyle: s.PathStyle}
		if s.BucketName == "" {
			b.errorf(k("s3.BucketName"), "is required")
		}
		switch out.S3.AuthenticationType {
		case "":
			out.S3.AuthenticationType = "iam"
			if s.ServerAddress != "" && s.AccessKey != "" && s.SecretKey != "" {
				out.S3.AuthenticationType = "access-key"
			}
		case "access-key":
			if s.AccessKey == "" || s.SecretKey == "" {
				b.errorf(k("s3.AccessKey"), "AuthenticationType = \"access-key\" needs AccessKey and SecretKey")
			}
		case "iam":
		default:
			b.errorf(k("s3.AuthenticationType"), "%q is not one of access-key, iam", s.AuthenticationType)
		}
		if s.ServerAddress != "" {
			if strings.Contains(s.ServerAddress, "://") {
				b.errorf(k("s3.ServerAddress"), "want host[:port] (Insecure = true for http), got %q", s.ServerAddress)
			}
		}
	case "local":
		l := c.Local
		if l == nil {
			l = &fileCacheLocal{}
		}
		out.Local = &CacheLocal{Dir: l.Dir, ListenAddress: l.ListenAddress, URL: strings.TrimRight(l.URL, "/"), MaxSizeMB: DefaultLocalCacheMaxSizeMB, ExpiryDays: DefaultLocalCacheExpiryDays}
		if out.Local.Dir == "" {
			b.errorf(k("local.Dir"), "is required: the directory that holds the archives")
		}
		if out.Local.ListenAddress == "" {
			out.Local.ListenAddress = DefaultLocalCacheListen
		} else if _, _, err := net.SplitHostPort(out.Local.ListenAddress); err != nil {
			b.errorf(k("local.ListenAddress"), "want host:port, got %q", l.ListenAddress)
		}
		if out.Local.URL == "" {
			out.Local.URL = "http://" + out.Local.ListenAddress
		} else {
			b.httpURL(k("local.URL"), out.Local.URL)
		}
		if l.MaxSizeMB != nil {
			if *l.MaxSizeMB <= 0 {
				b.errorf(k("local.MaxSizeMB"), "must be positive, got %d", *l.MaxSizeMB)
			} else {
				out.Local.MaxSizeMB = *l.MaxSizeMB
			}
		}
		if l.ExpiryDays != nil {
			if *l.ExpiryDays <= 0 {
				b.errorf(k("local.ExpiryDays"), "must be a positive number of days, got %d", *l.ExpiryDays)
			} else {
				out.Local.ExpiryDays = *l.ExpiryDays
			}
		}
	case "":
		b.errorf(k("Type"), "is required: gcs, s3 or local")
	default:
		b.errorf(k("Type"), "%q is not supported: use gcs, s3 or local", c.Type)
	}
	return out
}

// httpURL checks an optional http(s) URL setting.
func (b *builder) httpURL(key, v string) {
	if v == "" {
		return
	}
	if u, err := url.Parse(v); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		b.errorf(key, "want an http:// or https:// URL, got %q", v)
	}
}

// String describes the cache for logs, without secrets.
func (c *Cache) String() string {
	if c == nil {
		return "none"
	}
	switch {
	case c.GCS != nil:
		return fmt.Sprintf("gcs://%s/%s", c.GCS.BucketName, c.Path)
	case c.S3 != nil:
		return fmt.Sprintf("s3://%s/%s", c.S3.BucketName, c.Path)
	case c.Local != nil:
		return fmt.Sprintf("local %s (%s)", c.Local.Dir, c.Local.URL)
	}
	return c.Type
}
