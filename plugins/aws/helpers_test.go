package aws_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"log/slog"
	"maps"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/plugins/aws"
	"github.com/mayfly-ci/mayfly/plugins/aws/awsfake"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/host"
	"github.com/mayfly-ci/mayfly/providers/plugintest"
)

const (
	akid   = "AKIDMAYFLYTEST000000"
	secret = "mayfly-test-secret/abcdefghij"
	ami    = "ami-0123456789abcdef0"
	winAMI = "ami-0aaaaaaaaaaaaaaa1"
	subA   = "subnet-0aaaaaaaaaaaaaaaa"
	subB   = "subnet-0bbbbbbbbbbbbbbbb"
	subC   = "subnet-0cccccccccccccccc"
)

var pluginBinary string

func TestMain(m *testing.M) {
	plugintest.Main(m, "github.com/mayfly-ci/mayfly/plugins/aws/cmd/mayfly-plugin-aws", &pluginBinary)
}

// env is one fake EC2 endpoint and the settings that reach it.
type env struct {
	srv      *awsfake.Server
	url      string
	settings map[string]any
}

func newEnv(t *testing.T, opts awsfake.Options) *env {
	t.Helper()
	opts.AccessKeyID, opts.SecretAccessKey = akid, secret
	if opts.Subnets == nil {
		opts.Subnets = map[string]string{subA: "us-east-1a", subB: "us-east-1b", subC: "us-east-1c"}
	}
	if opts.Images == nil {
		opts.Images = map[string]string{ami: "linux", winAMI: "windows"}
	}
	srv := awsfake.New(opts)
	hs := httptest.NewServer(srv)
	t.Cleanup(hs.Close)
	return &env{srv: srv, url: hs.URL, settings: map[string]any{
		"region":            "us-east-1",
		"endpoint":          hs.URL,
		"access_key_id":     akid,
		"secret_access_key": secret,
		"ami":               ami,
		"instance_type":     "t3.micro",
		"subnet_ids":        []string{subA, subB},
		"page_size":         5,
		"rate_limit":        map[string]any{"throttle_backoff": "100ms", "describe_rate": 1000, "mutating_rate": 1000, "launch_rate": 1000},
	}}
}

func (e *env) with(kv ...any) json.RawMessage {
	s := maps.Clone(e.settings)
	for i := 0; i+1 < len(kv); i += 2 {
		s[kv[i].(string)] = kv[i+1]
	}
	b, err := json.Marshal(s)
	if err != nil {
		panic(err)
	}
	return b
}

func ctxT(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func start(t *testing.T, settings json.RawMessage) *aws.Provider {
	t.Helper()
	p := aws.New(aws.Options{Logger: slog.New(slog.DiscardHandler)})
	if _, err := p.Init(ctxT(t), settings); err != nil {
		t.Fatalf("Init: %v", err)
	}
	return p
}

func startPlugin(t *testing.T) *host.Plugin {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	p, err := host.Start(ctx, host.Config{
		Path:        pluginBinary,
		Name:        "aws",
		Logger:      slog.New(slog.DiscardHandler),
		CallTimeout: 20 * time.Second,
		MinBackoff:  50 * time.Millisecond,
	})
	if err != nil {
		t.Fatalf("start plugin: %v", err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

// waitRunning polls List until every id runs.
func waitRunning(t *testing.T, p providers.Provider, ids []string) []providers.Instance {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		list, err := p.List(ctxT(t))
		if err != nil {
			t.Fatalf("List: %v", err)
		}
		running := 0
		for _, in := range list {
			if slices.Contains(ids, in.ID) && in.State == providers.StateRunning {
				running++
			}
		}
		if running == len(ids) {
			return list
		}
		if time.Now().After(deadline) {
			t.Fatalf("instances %v not all running: %+v", ids, list)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// authorizedKeys returns the keys in the cloud-config of user data.
func authorizedKeys(userData []byte) []string {
	var keys []string
	for line := range strings.Lines(string(userData)) {
		if k, ok := strings.CutPrefix(strings.TrimSpace(line), "- ssh-"); ok {
			keys = append(keys, "ssh-"+k)
		}
	}
	return keys
}

func writeRSAKey(t *testing.T, file string) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	b := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	if err := os.WriteFile(file, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func publicOf(t *testing.T, pemKey []byte) string {
	t.Helper()
	signer, err := ssh.ParsePrivateKey(pemKey)
	if err != nil {
		t.Fatal(err)
	}
	return string(signer.PublicKey().Marshal())
}

// handClock returns a clock for the fake that moves only when advanced.
func handClock() (now func() time.Time, advance func(time.Duration)) {
	var mu sync.Mutex
	t := time.Now()
	return func() time.Time {
			mu.Lock()
			defer mu.Unlock()
			return t
		}, func(d time.Duration) {
			mu.Lock()
			t = t.Add(d)
			mu.Unlock()
		}
}
