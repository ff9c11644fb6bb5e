package config

import (
	"errors"
	"strings"
	"testing"
)

const cacheDoc = autoscalerDoc + `  [runners.cache]
    Type = "gcs"
    Path = "ci/"
    Shared = true
    [runners.cache.gcs]
      BucketName = "hosted-cache"
      AccessID = "manager@project.iam.gserviceaccount.com"
      PrivateKey = "-----BEGIN PRIVATE KEY-----"
    [runners.cache.s3]
      BucketName = "b"
    [runners.cache.local]
      Dir = "/var/lib/mayfly/cache"
`

func TestCacheConfig(t *testing.T) {
	cfg, err := Parse("c.toml", []byte(cacheDoc))
	if err != nil {
		t.Fatal(err)
	}
	c := cfg.Runners[0].Cache
	if c == nil || c.Type != "gcs" || c.Path != "ci" || !c.Shared || c.GCS.BucketName != "hosted-cache" || c.MaxUploadedArchiveSize != 5<<30 {
		t.Fatalf("cache %+v", c)
	}
	local := strings.Replace(cacheDoc, `Type = "gcs"`, `Type = "local"`, 1)
	cfg, err = Parse("c.toml", []byte(local))
	if err != nil {
		t.Fatal(err)
	}
	if l := cfg.Runners[0].Cache.Local; l == nil || l.URL != "http://127.0.0.1:9253" || l.ExpiryDays != 14 {
		t.Errorf("local %+v", l)
	}
}

func TestCacheErrors(t *testing.T) {
	for _, tt := range []struct{ name, from, to, key, msg string }{
		{"type", `Type = "gcs"`, `Type = "azure"`, "runners[0].cache.Type", `"azure" is not supported`},
		{"bucket", `BucketName = "hosted-cache"`, `BucketName = ""`, "runners[0].cache.gcs.BucketName", "is required"},
		{"access id alone", `PrivateKey = "-----BEGIN PRIVATE KEY-----"`, `PrivateKey = ""`, "runners[0].cache.gcs.AccessID", "go together"},
		{"unknown key", `Shared = true`, `Shraed = true`, "runners.cache.Shraed", `unknown key (did you mean "Shared"?)`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			doc := strings.Replace(cacheDoc, tt.from, tt.to, 1)
			_, err := Parse("c.toml", []byte(doc))
			var list ErrorList
			if !errors.As(err, &list) || len(list) != 1 {
				t.Fatalf("got %v, want one error", err)
			}
			e := list[0]
			wantLine := strings.Count(doc[:strings.Index(doc, tt.to)], "\n") + 1
			if e.Key != tt.key || !strings.Contains(e.Message, tt.msg) || e.Line != wantLine && tt.name != "bucket" && tt.name != "access id alone" {
				t.Errorf("got %v (line %d), want line %d key %s message %q", e, e.Line, wantLine, tt.key, tt.msg)
			}
		})
	}
}
