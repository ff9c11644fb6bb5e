package registry

import (
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// testGrant: "admin" may do anything; "job:<project>" pulls everything and
// pushes under <project>.
type testGrant struct {
	admin   bool
	project string
}

func (g testGrant) Can(repo, action string) bool {
	return g.admin || action == ActionPull || (action == ActionPush && (repo == g.project || strings.HasPrefix(repo, g.project+"/")))
}
func (g testGrant) Admin() bool { return g.admin }

func testAuth(user, pass string) (Grant, bool) {
	switch {
	case user == "" && pass == "":
		return nil, true // anonymous: no access
	case pass == "admin-secret":
		return testGrant{admin: true}, true
	case user == "gitlab-ci-token" && pass == "job-token-1":
		return testGrant{project: "root/app"}, true
	}
	return nil, false
}

func serve(t *testing.T, dir string, maxBytes int64) (*Registry, string) {
	t.Helper()
	return serveTB(t, dir, maxBytes)
}

func serveB(b *testing.B, dir string) (*Registry, string) { return serveTB(b, dir, 0) }

func serveTB(t testing.TB, dir string, maxBytes int64) (*Registry, string) {
	t.Helper()
	r, err := New(Config{Dir: dir, MaxBytes: maxBytes, Auth: testAuth, Log: slog.New(slog.DiscardHandler),
		Realm: func(req *http.Request) string { return "http://" + req.Host + TokenPath }})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(r)
	t.Cleanup(func() { ts.Close(); r.Close() })
	return r, strings.TrimPrefix(ts.URL, "http://")
}

func ref(t *testing.T, host, repo string) name.Reference { return refB(t, host, repo) }

func refB(t testing.TB, host, repo string) name.Reference {
	t.Helper()
	r, err := name.ParseReference(host+"/"+repo, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

var (
	admin = remote.WithAuth(&authn.Basic{Username: "root", Password: "admin-secret"})
	job   = remote.WithAuth(&authn.Basic{Username: "gitlab-ci-token", Password: "job-token-1"})
	wrong = remote.WithAuth(&authn.Basic{Username: "gitlab-ci-token", Password: "nope"})
)

func statusOf(err error) int {
	var te *transport.Error
	if errors.As(err, &te) {
		return te.StatusCode
	}
	return 0
}

func TestPushPullWithTokenAuth(t *testing.T) {
	dir := t.TempDir()
	reg, host := serve(t, dir, 0)
	img, err := random.Image(300_000, 3)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	base := ref(t, host, "mayfly/debian:bookworm")
	if err := remote.Write(base, img, admin); err != nil {
		t.Fatalf("admin push: %v", err)
	}
	got, err := remote.Image(base, job)
	if err != nil {
		t.Fatalf("job pull: %v", err)
	}
	if d, _ := got.Digest(); d != want {
		t.Errorf("pulled %s, pushed %s", d, want)
	}
	if err := checkLayers(got); err != nil {
		t.Errorf("pulled layers: %v", err)
	}
	// Wrong credentials and anonymous callers get nothing.
	if _, err := remote.Image(base, wrong); statusOf(err) != http.StatusUnauthorized {
		t.Errorf("wrong token pull: %v", err)
	}
	if _, err := remote.Image(base); statusOf(err) != http.StatusUnauthorized {
		t.Errorf("anonymous pull: %v", err)
	}
	// A job token pushes to its own project only.
	own := ref(t, host, "root/app/tool:1")
	if err := remote.Write(own, img, job); err != nil {
		t.Errorf("job push to its project: %v", err)
	}
	if err := remote.Write(ref(t, host, "root/other:1"), img, job); err == nil {
		t.Error("job push to another project succeeded")
	}
	// Copying within the registry mounts the layers (cross-repository mount).
	if err := crane.Copy(host+"/mayfly/debian:bookworm", host+"/root/app/copy:1", crane.Insecure, crane.WithAuth(&authn.Basic{Username: "gitlab-ci-token", Password: "job-token-1"})); err != nil {
		t.Errorf("copy: %v", err)
	}
	// The catalog is for the administrator.
	c, err := crane.Catalog(host, crane.Insecure, crane.WithAuth(&authn.Basic{Username: "root", Password: "admin-secret"}))
	if err != nil || len(c) != 3 {
		t.Errorf("catalog %v %v", c, err)
	}
	if _, err := crane.Catalog(host, crane.Insecure, crane.WithAuth(&authn.Basic{Username: "gitlab-ci-token", Password: "job-token-1"})); err == nil {
		t.Error("a job token listed the catalog")
	}
	used := reg.UsedBytes()
	if used < 900_000 {
		t.Errorf("used %d bytes for three 300 kB layers", used)
	}

	// A restart serves the same images from disk.
	reg.Close()
	_, host2 := serve(t, dir, 0)
	again, err := remote.Image(ref(t, host2, "mayfly/debian:bookworm"), job)
	if err != nil {
		t.Fatalf("pull after restart: %v", err)
	}
	if d, _ := again.Digest(); d != want {
		t.Errorf("after restart %s, want %s", d, want)
	}
	if err := checkLayers(again); err != nil {
		t.Errorf("layers after restart: %v", err)
	}
}

// checkLayers reads every layer, which verifies each digest.
func checkLayers(img v1.Image) error {
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			return err
		}
		_, err = io.Copy(io.Discard, rc)
		rc.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

func TestStorageBound(t *testing.T) {
	reg, host := serve(t, t.TempDir(), 500_000)
	img, err := random.Image(300_000, 3)
	if err != nil {
		t.Fatal(err)
	}
	err = remote.Write(ref(t, host, "mayfly/big:1"), img, admin)
	if err == nil || !strings.Contains(err.Error(), "storage limit") {
		t.Errorf("push over the bound: %v", err)
	}
	if used := reg.UsedBytes(); used > 500_000 {
		t.Errorf("used %d bytes, bound 500000", used)
	}
	small, _ := random.Image(1000, 1)
	if err := remote.Write(ref(t, host, "mayfly/small:1"), small, admin); err != nil {
		t.Errorf("a small image after a refused one: %v", err)
	}
}

func TestChallengeAndToken(t *testing.T) {
	_, host := serve(t, t.TempDir(), 0)
	res, err := http.Get("http://" + host + "/v2/")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	want := `Bearer realm="http://` + host + `/jwt/auth",service="container_registry"`
	if res.StatusCode != 401 || res.Header.Get("WWW-Authenticate") != want {
		t.Errorf("ping: %d %q, want 401 %q", res.StatusCode, res.Header.Get("WWW-Authenticate"), want)
	}
	req, _ := http.NewRequest("GET", "http://"+host+"/jwt/auth?service=container_registry&scope=repository:root/app/x:pull,push&scope=repository:root/other:push", nil)
	req.SetBasicAuth("gitlab-ci-token", "job-token-1")
	res, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 200 || !strings.Contains(string(body), `"token"`) {
		t.Fatalf("token: %d %s", res.StatusCode, body)
	}
	for _, bad := range []string{"/v2/UPPER/manifests/x", "/v2/a/b/c", "/v3/"} {
		r, err := http.Get("http://" + host + bad)
		if err != nil {
			t.Fatal(err)
		}
		r.Body.Close()
		if r.StatusCode != 404 {
			t.Errorf("%s: %d", bad, r.StatusCode)
		}
	}
}
