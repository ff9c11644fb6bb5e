package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/fsouza/fake-gcs-server/fakestorage"
	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"

	"github.com/mayfly-ci/mayfly/manager/gitlab"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

const cloudCachePipeline = `
projects:
  - name: app
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: empty}]
        jobs:
          - name: save
            stage: build
            script: ["mkdir -p vendor", "echo cached-by-$CI_JOB_ID > vendor/dep.txt", "env > env-dump.txt"]
            cache: [{key: deps, paths: [vendor/]}]
          - name: restore
            stage: test
            script: ["cat vendor/dep.txt", "env > env-dump.txt"]
            cache: [{key: deps, paths: [vendor/], policy: pull}]
`

// verifier counts signed requests that passed and refuses the others.
type verifier struct {
	ok, refused atomic.Int64
	check       func(r *http.Request) error
	next        http.Handler
}

func (v *verifier) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if err := v.check(r); err != nil {
		v.refused.Add(1)
		w.WriteHeader(http.StatusForbidden)
		fmt.Fprintf(w, "<Error><Code>SignatureDoesNotMatch</Code><Message>%v</Message></Error>", err)
		return
	}
	v.ok.Add(1)
	v.next.ServeHTTP(w, r)
}

// checkGCSV4 verifies a GCS V4 signed URL (GOOG4-RSA-SHA256) against the
// service account's public key, its method and headers, and its expiry.
func checkGCSV4(pub *rsa.PublicKey, r *http.Request) error {
	q := r.URL.Query()
	sig, err := hex.DecodeString(q.Get("X-Goog-Signature"))
	if err != nil || len(sig) == 0 {
		return fmt.Errorf("no signature")
	}
	date, err := time.Parse("20060102T150405Z", q.Get("X-Goog-Date"))
	if err != nil {
		return fmt.Errorf("X-Goog-Date: %v", err)
	}
	exp, err := strconv.Atoi(q.Get("X-Goog-Expires"))
	if err != nil || time.Now().After(date.Add(time.Duration(exp)*time.Second)) {
		return fmt.Errorf("expired")
	}
	q.Del("X-Goog-Signature")
	var hdrs []string
	for _, name := range strings.Split(q.Get("X-Goog-SignedHeaders"), ";") {
		v := r.Header.Get(name)
		if name == "host" {
			v, _, _ = net.SplitHostPort(r.Host)
		}
		hdrs = append(hdrs, name+":"+strings.Join(strings.Fields(v), " "))
	}
	sort.Strings(hdrs)
	creq := fmt.Sprintf("%s\n%s\n%s\n%s\n\n%s\nUNSIGNED-PAYLOAD", r.Method, r.URL.EscapedPath(),
		strings.ReplaceAll(q.Encode(), "+", "%20"), strings.Join(hdrs, "\n"), q.Get("X-Goog-SignedHeaders"))
	sum := sha256.Sum256([]byte(creq))
	scope := strings.SplitN(q.Get("X-Goog-Credential"), "/", 2)[1]
	sts := fmt.Sprintf("GOOG4-RSA-SHA256\n%s\n%s\n%s", q.Get("X-Goog-Date"), scope, hex.EncodeToString(sum[:]))
	digest := sha256.Sum256([]byte(sts))
	return rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig)
}

// checkS3Presigned re-signs the request with the SDK's own SigV4 signer
// (same time, expiry and signed headers) and compares signatures.
func checkS3Presigned(creds aws.Credentials, region string, r *http.Request) error {
	q := r.URL.Query()
	got := q.Get("X-Amz-Signature")
	date, err := time.Parse("20060102T150405Z", q.Get("X-Amz-Date"))
	if err != nil || got == "" {
		return fmt.Errorf("not a presigned request")
	}
	exp, _ := strconv.Atoi(q.Get("X-Amz-Expires"))
	if time.Now().After(date.Add(time.Duration(exp) * time.Second)) {
		return fmt.Errorf("expired")
	}
	q.Del("X-Amz-Signature")
	u := *r.URL
	u.Scheme, u.Host, u.RawQuery = "http", r.Host, q.Encode()
	req, _ := http.NewRequest(r.Method, u.String(), nil)
	for _, h := range strings.Split(q.Get("X-Amz-SignedHeaders"), ";") {
		if h != "host" {
			req.Header.Set(h, r.Header.Get(h))
		}
	}
	signed, _, err := v4.NewSigner().PresignHTTP(context.Background(), creds, req, "UNSIGNED-PAYLOAD", "s3", region, date)
	if err != nil {
		return err
	}
	su, _ := url.Parse(signed)
	if su.Query().Get("X-Amz-Signature") != got {
		return fmt.Errorf("signature mismatch")
	}
	return nil
}

// TestCloudCacheEndToEnd: the cache through GCS and S3 fakes with URLs the
// manager pre-signs with the real SDKs; the fakes check every signature,
// and no credential reaches the VM.
func TestCloudCacheEndToEnd(t *testing.T) {
	t.Parallel() // beside issue 18's other end-to-end runs (see TestQEMUArtifactsAndCache)
	ssh := sshtest.Run(t, sshtest.OpenSSH)
	dir := t.TempDir()
	pluginDir := filepath.Join(dir, "plugins")
	buildPlugin(t, pluginDir, "github.com/mayfly-ci/mayfly/providers/fake/cmd/mayfly-plugin-fake")
	helperDir := filepath.Join(dir, "helpers")
	buildHelper(t, helperDir)

	t.Run("gcs", func(t *testing.T) {
		g := startFakeGCS(t, func(addr string) string { return addr })
		extra := "  [runners.cache]\n" + g.cacheTOML()
		runCloudCache(t, dir, pluginDir, helperDir, ssh, extra, g.v, func(object string) bool {
			_, err := g.srv.GetObject("ci-cache", object)
			return err == nil
		}, g.pemKey[40:120])
	})

	t.Run("s3", func(t *testing.T) {
		const keyID, secret, region = "AKIAMAYFLYCACHE0001", "s3-secret-key/mayfly+cache+0123456789", "eu-west-1"
		s3 := startFakeS3(t, keyID, secret, region)
		extra := "  [runners.cache]\n" + s3.cacheTOML(s3.addr)
		runCloudCache(t, dir, pluginDir, helperDir, ssh, extra, s3.v, func(object string) bool {
			_, err := s3.backend.HeadObject("ci-cache", object)
			return err == nil
		}, secret)
	})
}

// fakeGCS is fake-gcs-server behind a verifier of V4 signed URLs made with
// a service account's RSA key, with one bucket "ci-cache".
type fakeGCS struct {
	srv    *fakestorage.Server
	v      *verifier
	addr   string // where it listens
	public string // the address its URLs name
	pemKey string // the service account's private key, PEM
}

// cacheTOML is the [runners.cache] body (after the table header) of a
// runner whose cache is g, signing URLs for g's public address.
func (g *fakeGCS) cacheTOML() string {
	return fmt.Sprintf(`    Type = "gcs"
    Path = "ci"
    [runners.cache.gcs]
      BucketName = "ci-cache"
      AccessID = "manager@mayfly-test.iam.gserviceaccount.com"
      PrivateKey = '''%s'''
      Endpoint = "http://%s"
`, g.pemKey, g.public)
}

// startFakeGCS starts a fakeGCS on 127.0.0.1 until the test ends;
// publicHost maps its address to the host its URLs name (the address the
// jobs use, which fake-gcs-server routes by).
func startFakeGCS(t *testing.T, publicHost func(addr string) string) *fakeGCS {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := &fakeGCS{addr: ln.Addr().String(),
		pemKey: string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}))}
	g.public = publicHost(g.addr)
	g.srv, err = fakestorage.NewServerWithOptions(fakestorage.Options{NoListener: true, PublicHost: g.public, Scheme: "http"})
	if err != nil {
		ln.Close()
		t.Fatal(err)
	}
	g.srv.CreateBucketWithOpts(fakestorage.CreateBucketOpts{Name: "ci-cache"})
	g.v = &verifier{check: func(r *http.Request) error { return checkGCSV4(&key.PublicKey, r) }, next: g.srv.HTTPHandler()}
	hs := &httptest.Server{Listener: ln, Config: &http.Server{Handler: g.v}}
	hs.Start()
	t.Cleanup(hs.Close)
	return g
}

// fakeS3 is gofakes3 behind a verifier of SigV4 presigned URLs, with one
// bucket "ci-cache".
type fakeS3 struct {
	backend *s3mem.Backend
	v       *verifier
	addr    string // where it listens

	keyID, secret, region string
}

// cacheTOML is the [runners.cache] body (after the table header) of a
// runner whose cache is f, signing URLs for serverAddress.
func (f *fakeS3) cacheTOML(serverAddress string) string {
	return fmt.Sprintf(`    Type = "s3"
    [runners.cache.s3]
      ServerAddress = %q
      BucketName = "ci-cache"
      BucketLocation = %q
      AccessKey = %q
      SecretKey = %q
      Insecure = true
`, serverAddress, f.region, f.keyID, f.secret)
}

// startFakeS3 starts a fakeS3 on 127.0.0.1 until the test ends, accepting
// URLs presigned with the access key keyID/secret for region.
func startFakeS3(t *testing.T, keyID, secret, region string) *fakeS3 {
	t.Helper()
	f := &fakeS3{backend: s3mem.New(), keyID: keyID, secret: secret, region: region}
	if err := f.backend.CreateBucket("ci-cache"); err != nil {
		t.Fatal(err)
	}
	creds := aws.Credentials{AccessKeyID: keyID, SecretAccessKey: secret}
	f.v = &verifier{check: func(r *http.Request) error { return checkS3Presigned(creds, region, r) }, next: gofakes3.New(f.backend).Server()}
	hs := httptest.NewServer(f.v)
	t.Cleanup(hs.Close)
	f.addr = hs.Listener.Addr().String()
	return f
}

func runCloudCache(t *testing.T, dir, pluginDir, helperDir string, ssh *sshtest.Server, extra string, v *verifier, stored func(string) bool, secret string) {
	const token = "cloud-cache-token"
	srv, url := startArtifactsCoordinator(t, token, cloudCachePipeline)
	sub := t.TempDir()
	runWithHelper(t, srv, sub, pluginDir, helperDir, fakeFleetConfig(url, token, sub, ssh, extra))
	save, restore := jobByName(t, srv, "save"), jobByName(t, srv, "restore")
	if !strings.Contains(string(save.Trace), "Created cache") || save.Status != "success" {
		t.Errorf("save: %s\n%s", save.Status, save.Trace)
	}
	if !strings.Contains(string(restore.Trace), fmt.Sprintf("cached-by-%d", save.ID)) || !strings.Contains(string(restore.Trace), "Successfully extracted cache") {
		t.Errorf("restore did not get the cache:\n%s", restore.Trace)
	}
	prefix := ""
	if strings.Contains(extra, `Path = "ci"`) {
		prefix = "ci/"
	}
	object := prefix + fmt.Sprintf("runner/%s/project/%d/deps-non_protected", gitlab.ShortToken(token), save.ProjectID)
	if !stored(object) {
		t.Errorf("no object %s in the bucket", object)
	}
	if v.ok.Load() < 2 || v.refused.Load() != 0 {
		t.Errorf("signed requests: %d verified, %d refused", v.ok.Load(), v.refused.Load())
	}
	// An unsigned request is refused: the check is real.
	if err := v.check(httptest.NewRequest(http.MethodGet, "http://127.0.0.1:1/ci-cache/"+object, nil)); err == nil {
		t.Error("the fake's signature check accepts an unsigned request")
	}
	assertNowhere(t, filepath.Join(sub, "builds"), srv, secret)
	if !bytes.Contains(save.Trace, []byte("Uploading cache.zip to http://")) {
		t.Errorf("save's trace does not show the (cleaned) upload URL:\n%s", save.Trace)
	}
	if bytes.Contains(save.Trace, []byte("Signature=")) {
		t.Errorf("a signature is in the trace")
	}
}
