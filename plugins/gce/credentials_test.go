package gce_test

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/mayfly-ci/mayfly/plugins/gce/gcefake"
	"github.com/mayfly-ci/mayfly/providers"
)

// TestServiceAccountCredentials runs the production authentication path:
// a service-account key file whose token endpoint is a local server, the
// SDK's authenticating transport over the plugin's limiter, and the fake
// API checking every request carries the bearer token.
func TestServiceAccountCredentials(t *testing.T) {
	var (
		mu         sync.Mutex
		tokenCalls int
		auths      []string
	)
	tokens := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		tokenCalls++
		mu.Unlock()
		if !strings.Contains(string(body), "assertion=") {
			http.Error(w, "want a JWT bearer grant", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"access_token": "test-token-1", "token_type": "Bearer", "expires_in": 3600}`)
	}))
	t.Cleanup(tokens.Close)

	fake := gcefake.New(gcefake.Options{Project: testProject})
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		auths = append(auths, r.Header.Get("Authorization"))
		mu.Unlock()
		fake.ServeHTTP(w, r)
	}))
	t.Cleanup(api.Close)

	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	sa, _ := json.Marshal(map[string]string{
		"type":           "service_account",
		"project_id":     testProject,
		"private_key_id": "key-1",
		"private_key":    string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})),
		"client_email":   "mayfly@" + testProject + ".iam.gserviceaccount.com",
		"client_id":      "1234567890",
		"token_uri":      tokens.URL + "/token",
	})
	path := filepath.Join(t.TempDir(), "sa.json")
	if err := os.WriteFile(path, sa, 0o600); err != nil {
		t.Fatal(err)
	}

	raw := settings(t, api.URL, map[string]any{"without_authentication": false, "credentials_file": path})
	p := newProvider(t, raw)
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
		if !strings.HasPrefix(a, "Bearer ") || len(a) < len("Bearer ")+8 {
			t.Errorf("request %d carried Authorization %q, want a bearer token", i, a)
		}
	}
	t.Logf("token endpoint calls: %d; API requests: %d; first Authorization: %.20s...", tokenCalls, len(auths), auths[0])
	if calls := p.Stats().Calls; calls["instances.insert"] != 1 || calls["instances.delete"] != 1 {
		t.Errorf("limiter counted %v: it is not under the authenticating transport", calls)
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
