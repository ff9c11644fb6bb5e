package cachestore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"time"

	"cloud.google.com/go/storage"
	"github.com/aws/aws-sdk-go-v2/aws"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/config"
)

// gcsSigner signs V4 URLs with a service account's key, or through the
// IAM Credentials API with the manager's own account when no key is set.
type gcsSigner struct {
	bucket  string
	opts    storage.SignedURLOptions // GoogleAccessID, PrivateKey, host settings
	handle  *storage.BucketHandle    // signs with the default credentials; nil with a key
	maxSize int64
}

func newGCS(ctx context.Context, c *config.CacheGCS, maxSize int64) (*gcsSigner, error) {
	g := &gcsSigner{bucket: c.BucketName, maxSize: maxSize}
	g.opts.Scheme = storage.SigningSchemeV4
	if c.Endpoint != "" {
		u, err := url.Parse(c.Endpoint)
		if err != nil {
			return nil, fmt.Errorf("Endpoint %q: %w", c.Endpoint, err)
		}
		g.opts.Hostname, g.opts.Insecure, g.opts.Style = u.Host, u.Scheme == "http", storage.PathStyle()
	}
	switch {
	case c.CredentialsFile != "":
		b, err := os.ReadFile(c.CredentialsFile)
		if err != nil {
			return nil, err
		}
		var key struct {
			ClientEmail string `json:"client_email"`
			PrivateKey  string `json:"private_key"`
		}
		if err := json.Unmarshal(b, &key); err != nil || key.ClientEmail == "" || key.PrivateKey == "" {
			return nil, fmt.Errorf("CredentialsFile %s: want a service account key with client_email and private_key", c.CredentialsFile)
		}
		g.opts.GoogleAccessID, g.opts.PrivateKey = key.ClientEmail, []byte(key.PrivateKey)
	case c.AccessID != "":
		g.opts.GoogleAccessID, g.opts.PrivateKey = c.AccessID, []byte(c.PrivateKey)
	default:
		client, err := storage.NewClient(ctx)
		if err != nil {
			return nil, fmt.Errorf("GCS client with the default credentials: %w", err)
		}
		g.handle = client.Bucket(c.BucketName)
	}
	return g, nil
}

func (g *gcsSigner) sign(method, object, contentType string, headers []string, ttl time.Duration) (string, error) {
	o := g.opts
	o.Method, o.Expires, o.ContentType, o.Headers = method, time.Now().Add(ttl), contentType, headers
	if g.handle != nil {
		return g.handle.SignedURL(object, &o)
	}
	return storage.SignedURL(g.bucket, object, &o)
}

func (g *gcsSigner) presign(ctx context.Context, object, key string, ttl time.Duration) (buildscript.CacheURLs, error) {
	var out buildscript.CacheURLs
	var err error
	if out.Get, err = g.sign(http.MethodGet, object, "", nil, ttl); err != nil {
		return out, err
	}
	// The bucket refuses an archive larger than the limit, and keeps the
	// key readable, as gitlab-runner's uploads do.
	// GCS canonicalizes headers as name:value; the helper sends them as is.
	signed := []string{"x-goog-meta-cachekey:" + key}
	if g.maxSize > 0 {
		signed = append(signed, fmt.Sprintf("x-goog-content-length-range:0,%d", g.maxSize))
	}
	out.PutHeaders = signed
	out.Put, err = g.sign(http.MethodPut, object, contentType, signed, ttl)
	return out, err
}

// s3Signer presigns with aws-sdk-go-v2.
type s3Signer struct {
	bucket string
	client *s3.PresignClient
}

func newS3(ctx context.Context, c *config.CacheS3) (*s3Signer, error) {
	region := c.BucketLocation
	if region == "" {
		region = "us-east-1"
	}
	opts := []func(*awsconfig.LoadOptions) error{awsconfig.WithRegion(region)}
	if c.AuthenticationType == "access-key" {
		opts = append(opts, awsconfig.WithCredentialsProvider(credentials.NewStaticCredentialsProvider(c.AccessKey, c.SecretKey, c.SessionToken)))
	}
	lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cfg, err := awsconfig.LoadDefaultConfig(lctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("AWS config: %w", err)
	}
	endpoint := ""
	if c.ServerAddress != "" {
		scheme := "https"
		if c.Insecure {
			scheme = "http"
		}
		endpoint = scheme + "://" + c.ServerAddress
	}
	pathStyle := endpoint != ""
	if c.PathStyle != nil {
		pathStyle = *c.PathStyle
	}
	client := s3.NewFromConfig(cfg, func(o *s3.Options) {
		if endpoint != "" {
			o.BaseEndpoint = aws.String(endpoint)
		}
		o.UsePathStyle = pathStyle
	})
	if c.BucketName == "" {
		return nil, errors.New("BucketName is empty")
	}
	return &s3Signer{bucket: c.BucketName, client: s3.NewPresignClient(client)}, nil
}

func (s *s3Signer) presign(ctx context.Context, object, key string, ttl time.Duration) (buildscript.CacheURLs, error) {
	var out buildscript.CacheURLs
	get, err := s.client.PresignGetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(object)}, s3.WithPresignExpires(ttl))
	if err != nil {
		return out, err
	}
	put, err := s.client.PresignPutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(object), Metadata: map[string]string{"cachekey": key}}, s3.WithPresignExpires(ttl))
	if err != nil {
		return out, err
	}
	out.Get, out.Put = get.URL, put.URL
	for k, vs := range put.SignedHeader {
		if k == "Host" {
			continue
		}
		for _, v := range vs {
			out.PutHeaders = append(out.PutHeaders, k+": "+v)
		}
	}
	return out, nil
}
