package coordinator

import (
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// TestRegistryWithJobTokens pushes an image with the push token, then pulls
// it with a running job's CI_REGISTRY_USER/CI_REGISTRY_PASSWORD from its
// payload, pushes to CI_REGISTRY_IMAGE, and finds the token refused once
// the job is over. All through go-containerregistry's client over 127.0.0.1.
func TestRegistryWithJobTokens(t *testing.T) {
	e := newEnv(t, Config{StateDir: t.TempDir(), Registry: &RegistryConfig{}})
	t.Cleanup(func() { e.s.Close() })
	e.project("app", "", jobs("build")...)
	host := strings.TrimPrefix(e.ts.URL, "http://")
	ref := func(repo string) name.Reference {
		r, err := name.ParseReference(host+"/"+repo, name.Insecure)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	img, err := random.Image(100_000, 2)
	if err != nil {
		t.Fatal(err)
	}
	push := remote.WithAuth(&authn.Basic{Username: "root", Password: e.s.PushToken()})
	if err := remote.Write(ref("mayfly/debian:bookworm"), img, push); err != nil {
		t.Fatalf("push with the push token: %v", err)
	}

	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	j := e.mustJob(tok)
	vars := map[string]runnerapi.Variable{}
	for _, v := range j.Variables {
		vars[v.Key] = v
	}
	if vars["CI_REGISTRY"].Value != host || vars["CI_REGISTRY_IMAGE"].Value != host+"/root/app" || vars["CI_REGISTRY_USER"].Value != "gitlab-ci-token" ||
		vars["CI_REGISTRY_PASSWORD"].Value != j.Token || !vars["CI_REGISTRY_PASSWORD"].Masked || vars["CI_REGISTRY_PASSWORD"].Public {
		t.Errorf("registry variables: %+v %+v %+v %+v", vars["CI_REGISTRY"], vars["CI_REGISTRY_IMAGE"], vars["CI_REGISTRY_USER"], vars["CI_REGISTRY_PASSWORD"])
	}
	if len(j.Credentials) != 1 || j.Credentials[0] != (runnerapi.Credentials{Type: "registry", URL: host, Username: "gitlab-ci-token", Password: j.Token}) {
		t.Errorf("credentials %+v", j.Credentials)
	}
	jobAuth := remote.WithAuth(&authn.Basic{Username: vars["CI_REGISTRY_USER"].Value, Password: vars["CI_REGISTRY_PASSWORD"].Value})
	got, err := remote.Image(ref("mayfly/debian:bookworm"), jobAuth)
	if err != nil {
		t.Fatalf("pull with the job token: %v", err)
	}
	if d1, _ := got.Digest(); func() bool { d2, _ := img.Digest(); return d1 != d2 }() {
		t.Error("pulled another image")
	}
	if err := remote.Write(ref("root/app/built:1"), img, jobAuth); err != nil {
		t.Errorf("push to CI_REGISTRY_IMAGE: %v", err)
	}
	if err := remote.Write(ref("mayfly/debian:hacked"), img, jobAuth); err == nil {
		t.Error("a job token pushed outside its project")
	}
	e.finish(j, runnerapi.StateSuccess, nil)
	var te *transport.Error
	if _, err := remote.Image(ref("mayfly/debian:bookworm"), remote.WithAuth(&authn.Basic{Username: "gitlab-ci-token", Password: j.Token})); !errors.As(err, &te) || te.StatusCode != http.StatusUnauthorized {
		t.Errorf("pull with a finished job's token: %v", err)
	}
}
