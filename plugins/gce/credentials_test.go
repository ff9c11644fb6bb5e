package gce_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/mayfly-ci/mayfly/plugins/gce/gcefake"
	"github.com/mayfly-ci/mayfly/providers"
)

// TestServiceAccountCredentials runs the production authentication path
// (every test does, through settings): a service-account key file whose
// token endpoint is the fake's, the SDK's authenticating transport over
// the plugin's limiter, and the fake checking every API request carries
// the access token it issued.
func TestServiceAccountCredentials(t *testing.T) {
	var (
		mu    sync.Mutex
		auths []string
	)
	fake := gcefake.New(gcefake.Options{Project: testProject})
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != gcefake.TokenPath {
			mu.Lock()
			auths = append(auths, r.Header.Get("Authorization"))
			mu.Unlock()
		}
		fake.ServeHTTP(w, r)
	}))
	t.Cleanup(api.Close)

	p := newProvider(t, settings(t, api.URL, nil))
	id := createOne(t, p, testLabels)
	if _, err := p.List(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Delete(ctx(t), []string{id}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(auths) < 4 {
		t.Fatalf("the API saw %d requests", len(auths))
	}
	for i, a := range auths {
		if a != auths[0] || !strings.HasPrefix(a, "Bearer ya29.gcefake-") {
			t.Errorf("request %d carried Authorization %.30q..., want the access token the fake issued", i, a)
		}
	}
	if n := fake.TokenGrants(); n != 1 {
		t.Errorf("token grants = %d, want 1 (the token is reused)", n)
	}
	if calls := p.Stats().Calls; calls["instances.insert"] != 1 || calls["instances.delete"] != 1 {
		t.Errorf("limiter counted %v: it is not under the authenticating transport", calls)
	}
}

// TestUnauthenticatedIsRefused: the fake answers 401 to requests without
// credentials, and the plugin reports that as permanent (retrying the
// same credentials will not help).
func TestUnauthenticatedIsRefused(t *testing.T) {
	_, url := startFake(t, gcefake.Options{})
	p := newProvider(t, settings(t, url, map[string]any{"without_authentication": true, "credentials_file": ""}))
	_, err := p.List(ctx(t))
	if err == nil || !providers.IsPermanent(err) || !strings.Contains(err.Error(), "401") {
		t.Errorf("List without credentials = %v, want a permanent error with the 401", err)
	}
}

// TestSettingsRejectedByInit: Init fails with invalid_argument naming the
// key, before any API call.
func TestSettingsRejectedByInit(t *testing.T) {
	for _, raw := range []string{
		`{"project": "p-1234", "zones": ["us-east1-b"], "without_authentication": true}`,
		`{"project": "p-1234", "zones": []}`,
	} {
		p := newUninit(t)
		_, err := p.Init(ctx(t), json.RawMessage(raw))
		if providers.KindOf(err) != providers.KindInvalidArgument {
			t.Errorf("Init(%s) = %v, want invalid_argument", raw, err)
		}
	}
}
