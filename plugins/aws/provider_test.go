package aws_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"log/slog"
	"maps"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/plugins/aws"
	"github.com/mayfly-ci/mayfly/plugins/aws/awsfake"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/conformance"
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

var labels = map[string]string{providers.LabelManager: "mgr-1", providers.LabelRunner: "linux"}

func conformanceOptions(t *testing.T) conformance.Options {
	fault := func(action, code string, times int) func(t *testing.T) json.RawMessage {
		return func(t *testing.T) json.RawMessage {
			e := newEnv(t, awsfake.Options{PendingDuration: 100 * time.Millisecond})
			e.srv.FailNext(action, code, "", times)
			return e.with()
		}
	}
	bad := newEnv(t, awsfake.Options{})
	return conformance.Options{
		Settings: func(t *testing.T) json.RawMessage {
			return newEnv(t, awsfake.Options{PendingDuration: 200 * time.Millisecond, ShuttingDownDuration: 200 * time.Millisecond}).with()
		},
		InvalidSettings: bad.with("instance_typo", "t3.micro"),
		ReadyTimeout:    20 * time.Second,
		PollInterval:    50 * time.Millisecond,
		CallTimeout:     20 * time.Second,
		Faults: []conformance.Fault{
			// Both subnets out of capacity once: the fallback runs dry.
			{Name: "NoCapacityInAnySubnet", Settings: fault("RunInstances", "InsufficientInstanceCapacity", 2), Op: "create", Want: providers.KindCapacityExhausted, WantScope: "us-east-1"},
			{Name: "InstanceLimit", Settings: fault("RunInstances", "InstanceLimitExceeded", 1), Op: "create", Want: providers.KindQuotaExceeded, WantScope: "us-east-1"},
			{Name: "VcpuLimit", Settings: fault("RunInstances", "VcpuLimitExceeded", 1), Op: "create", Want: providers.KindQuotaExceeded, WantScope: "us-east-1"},
			{Name: "RunThrottled", Settings: fault("RunInstances", "RequestLimitExceeded", 1), Op: "create", Want: providers.KindRateLimited, WantRetryAfter: 100 * time.Millisecond},
			{Name: "DescribeThrottled", Settings: fault("DescribeInstances", "RequestLimitExceeded", 1), Op: "list", Want: providers.KindRateLimited, WantRetryAfter: 100 * time.Millisecond},
			{Name: "AuthFailure", Settings: fault("DescribeInstances", "UnauthorizedOperation", 1), Op: "list", Want: providers.KindPermanent},
			// The SDK retries an internal error twice; the third one counts.
			{Name: "InternalErrorPersists", Settings: fault("DescribeInstances", "InternalError", 3), Op: "list", Want: providers.KindTransient},
		},
	}
}

func TestConformanceInProcess(t *testing.T) {
	conformance.Run(t, func(t *testing.T) providers.Provider {
		return aws.New(aws.Options{})
	}, conformanceOptions(t))
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

func TestConformancePlugin(t *testing.T) {
	conformance.Run(t, func(t *testing.T) providers.Provider { return startPlugin(t) }, conformanceOptions(t))
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

func TestSubnetFallback(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	p := start(t, e.with("subnet_ids", []string{subA, subB, subC}, "create_concurrency", 1))
	e.srv.SetCapacity(subA, 0)
	ids, err := p.Create(ctxT(t), 3, labels)
	if err != nil || len(ids) != 3 {
		t.Fatalf("Create(3) = %v, %v", ids, err)
	}
	for _, id := range ids {
		if in, _ := e.srv.Instance(id); in.SubnetID != subB {
			t.Errorf("instance %s in %s, want %s (first subnet with capacity)", id, in.SubnetID, subB)
		}
	}
	// subnet A failed once; it is then tried last, so 3 launches cost 4 calls.
	if got := e.srv.Calls()["RunInstances"]; got != 4 {
		t.Errorf("RunInstances calls = %d, want 4 (1 refused in %s, 3 in %s)", got, subA, subB)
	}

	e.srv.SetCapacity(subB, 0)
	ids, err = p.Create(ctxT(t), 1, labels)
	if err != nil {
		t.Fatalf("Create with A and B full: %v", err)
	}
	if in, _ := e.srv.Instance(ids[0]); in.SubnetID != subC {
		t.Errorf("instance in %s, want %s", in.SubnetID, subC)
	}

	e.srv.SetCapacity(subC, 0)
	e.srv.ResetCalls()
	ids, err = p.Create(ctxT(t), 2, labels)
	scope, ok := providers.IsCapacityExhausted(err)
	if len(ids) != 0 || !ok || scope != "us-east-1" {
		t.Fatalf("Create with no capacity anywhere = %v, %v; want capacity_exhausted in us-east-1", ids, err)
	}
	for _, s := range []string{subA, subB, subC} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not name subnet %s", err, s)
		}
	}
	if got := e.srv.Calls()["RunInstances"]; got != 3 {
		t.Errorf("RunInstances calls = %d, want 3 (one per subnet, then stop)", got)
	}
}

func TestQuota(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	p := start(t, e.with("create_concurrency", 1))
	e.srv.SetInstanceLimit(2)
	ids, err := p.Create(ctxT(t), 3, labels)
	if scope, ok := providers.IsQuotaExceeded(err); !ok || scope != "us-east-1" || len(ids) != 2 {
		t.Fatalf("Create(3) under a limit of 2 = %v, %v; want 2 ids and quota_exceeded in us-east-1", ids, err)
	}
	if !strings.Contains(err.Error(), "InstanceLimitExceeded") {
		t.Errorf("error %q does not carry the EC2 code", err)
	}
	// A quota error is not a capacity error: no fallback to subnet B.
	if got := e.srv.Calls()["RunInstances"]; got != 3 {
		t.Errorf("RunInstances calls = %d, want 3", got)
	}
}

func TestThrottlingBackoff(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	p := start(t, e.with())
	e.srv.FailNext("RunInstances", "RequestLimitExceeded", "", 3)
	var waits []time.Duration
	for range 3 {
		_, err := p.Create(ctxT(t), 1, labels)
		ra, ok := providers.IsRateLimited(err)
		if !ok {
			t.Fatalf("Create while throttled = %v, want rate_limited", err)
		}
		waits = append(waits, ra)
	}
	if want := []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond}; !slices.Equal(waits, want) {
		t.Errorf("retry-after of successive throttles = %v, want %v (doubling)", waits, want)
	}
	// The SDK did not retry the throttled calls: one request per Create.
	if got := e.srv.Calls()["RunInstances"]; got != 3 {
		t.Errorf("RunInstances calls = %d, want 3 (no SDK retries on throttling)", got)
	}
	// The next call waits out the pause, then succeeds and resets it.
	begin := time.Now()
	if _, err := p.Create(ctxT(t), 1, labels); err != nil {
		t.Fatalf("Create after the throttling: %v", err)
	}
	if waited := time.Since(begin); waited < 350*time.Millisecond {
		t.Errorf("Create after a 400ms pause returned after %s", waited)
	}
	e.srv.FailNext("RunInstances", "RequestLimitExceeded", "", 1)
	if _, err := p.Create(ctxT(t), 1, labels); err == nil {
		t.Fatal("Create succeeded through an injected throttle")
	} else if ra, _ := providers.IsRateLimited(err); ra != 100*time.Millisecond {
		t.Errorf("retry-after after a success = %s, want the first backoff again", ra)
	}
	// A caller whose deadline ends before the pause gets the wait without
	// an API call.
	before := e.srv.Calls()["RunInstances"]
	short, cancel := context.WithTimeout(t.Context(), 10*time.Millisecond)
	defer cancel()
	if _, err := p.Create(short, 1, labels); err == nil {
		t.Error("Create with a deadline inside the pause succeeded")
	} else if _, ok := providers.IsRateLimited(err); !ok {
		t.Errorf("Create with a deadline inside the pause = %v, want rate_limited", err)
	}
	if got := e.srv.Calls()["RunInstances"]; got != before {
		t.Errorf("a call inside the pause reached EC2 (%d → %d calls)", before, got)
	}
}

func TestLocalRateLimit(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	p := start(t, e.with("rate_limit", map[string]any{"describe_rate": 0.5, "describe_burst": 1}))
	if _, err := p.List(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	_, err := p.List(short)
	ra, ok := providers.IsRateLimited(err)
	if !ok || ra < time.Second {
		t.Errorf("second List within the bucket's 2s = %v (retry after %s), want rate_limited with the wait", err, ra)
	}
	if got := e.srv.Calls()["DescribeInstances"]; got != 1 {
		t.Errorf("DescribeInstances calls = %d, want 1", got)
	}
}

func TestListPaging(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	p := start(t, e.with())
	ids, err := p.Create(ctxT(t), 12, labels)
	if err != nil {
		t.Fatal(err)
	}
	// Instances of another group or without a manager tag stay out.
	other := start(t, e.with("name_prefix", "other"))
	if _, err := other.Create(ctxT(t), 2, labels); err != nil {
		t.Fatal(err)
	}
	e.srv.ResetCalls()
	list, err := p.List(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, in := range list {
		got = append(got, in.ID)
		if !in.HasLabels(labels) || in.Labels[aws.TagGroup] != "mayfly" {
			t.Errorf("instance %s labels %v", in.ID, in.Labels)
		}
	}
	if !slices.Equal(slices.Sorted(slices.Values(got)), slices.Sorted(slices.Values(ids))) {
		t.Errorf("List = %v, want %v", got, ids)
	}
	if calls := e.srv.Calls()["DescribeInstances"]; calls != 3 {
		t.Errorf("DescribeInstances calls = %d, want 3 pages of 5", calls)
	}
	reqs := e.srv.Requests()
	if len(reqs) < 2 || reqs[1].Get("NextToken") == "" || reqs[0].Get("MaxResults") != "5" {
		t.Errorf("paging requests: %v", reqs)
	}
}

func TestSpotInterruptionInList(t *testing.T) {
	e := newEnv(t, awsfake.Options{ShuttingDownDuration: time.Hour})
	p := start(t, e.with("spot", true, "spot_max_price", "0.02"))
	ids, err := p.Create(ctxT(t), 3, labels)
	if err != nil {
		t.Fatal(err)
	}
	if in, _ := e.srv.Instance(ids[0]); !in.Spot || in.SpotMaxPrice != "0.02" {
		t.Errorf("instance spot=%t max price %q", in.Spot, in.SpotMaxPrice)
	}
	waitRunning(t, p, ids)
	if err := e.srv.InterruptSpot(ids[0], false); err != nil {
		t.Fatal(err)
	}
	if err := e.srv.InterruptSpot(ids[1], true); err != nil {
		t.Fatal(err)
	}
	list, err := p.List(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]providers.Instance{}
	for _, in := range list {
		got[in.ID] = in
	}
	for _, id := range ids[:2] {
		if in := got[id]; in.State != providers.StateGone || in.Reason != aws.ReasonSpotInterrupted {
			t.Errorf("interrupted %s listed %s (%q), want gone (spot-interrupted)", id, in.State, in.Reason)
		}
	}
	if in := got[ids[2]]; in.State != providers.StateRunning {
		t.Errorf("uninterrupted %s listed %s", ids[2], in.State)
	}
	if err := p.Heartbeat(ctxT(t), ids[0]); !providers.IsNotFound(err) {
		t.Errorf("Heartbeat of an interrupted instance = %v, want not found", err)
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

func TestConnectInfoLinux(t *testing.T) {
	e := newEnv(t, awsfake.Options{ConsoleDelay: 300 * time.Millisecond})
	secretFile := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secretFile, []byte(strings.Repeat("k", 48)), 0o600); err != nil {
		t.Fatal(err)
	}
	e.settings["key_secret_file"] = secretFile
	p := start(t, e.with("user_data", "#!/bin/sh\necho ready > /run/mayfly\n", "username", "admin", "instance_type", "t4g.small"))
	ids, err := p.Create(ctxT(t), 2, labels)
	if err != nil {
		t.Fatal(err)
	}
	waitRunning(t, p, ids)
	var pubs []string
	for _, id := range ids {
		in, _ := e.srv.Instance(id)
		ud := string(in.UserData)
		if !strings.Contains(ud, "multipart/mixed") || !strings.Contains(ud, "text/x-shellscript") || !strings.Contains(ud, "echo ready > /run/mayfly") {
			t.Errorf("user data of %s lacks the multipart parts:\n%s", id, ud)
		}
		keys := authorizedKeys(in.UserData)
		if len(keys) != 1 {
			t.Fatalf("user data of %s authorises %d keys: %v", id, len(keys), keys)
		}
		ci, err := p.ConnectInfo(ctxT(t), id)
		if err != nil {
			t.Fatalf("ConnectInfo(%s): %v", id, err)
		}
		if err := ci.Validate(); err != nil {
			t.Error(err)
		}
		if ci.Protocol != providers.ProtocolSSH || ci.Port != 22 || ci.Username != "admin" || ci.Address != in.PrivateIP || ci.Arch != "arm64" || ci.OS != "linux" {
			t.Errorf("ConnectInfo = %+v", ci)
		}
		signer, err := ssh.ParsePrivateKey(ci.PrivateKey)
		if err != nil {
			t.Fatal(err)
		}
		pub := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(signer.PublicKey())))
		if !strings.HasPrefix(keys[0], pub+" ") {
			t.Errorf("private key of %s signs as %s, user data authorises %s", id, pub, keys[0])
		}
		pubs = append(pubs, pub)
		// The console has not shown the host key yet.
		if ci.HostKey != "" {
			t.Errorf("host key %q before the console output exists", ci.HostKey)
		}
	}
	if pubs[0] == pubs[1] {
		t.Error("two instances share one SSH key")
	}
	time.Sleep(350 * time.Millisecond)
	in, _ := e.srv.Instance(ids[0])
	ci, err := p.ConnectInfo(ctxT(t), ids[0])
	if err != nil {
		t.Fatal(err)
	}
	if ci.HostKey != in.HostKey {
		t.Errorf("host key %q, the instance's is %q", ci.HostKey, in.HostKey)
	}
	before := e.srv.Calls()["GetConsoleOutput"]
	if _, err := p.ConnectInfo(ctxT(t), ids[0]); err != nil {
		t.Fatal(err)
	}
	if after := e.srv.Calls()["GetConsoleOutput"]; after != before {
		t.Errorf("a known host key was fetched again (%d → %d calls)", before, after)
	}

	pub := start(t, e.with("use_public_ip", true))
	ci, err = pub.ConnectInfo(ctxT(t), ids[1])
	if err != nil {
		t.Fatal(err)
	}
	if in, _ := e.srv.Instance(ids[1]); ci.Address != in.PublicIP || ci.Address == in.PrivateIP {
		t.Errorf("use_public_ip address %q, public %q", ci.Address, in.PublicIP)
	}
	// An instance of another group is not ours to connect to.
	other := start(t, e.with("name_prefix", "other"))
	if _, err := other.ConnectInfo(ctxT(t), ids[0]); !providers.IsNotFound(err) {
		t.Errorf("ConnectInfo from another group = %v, want not found", err)
	}
}

func TestWindowsPassword(t *testing.T) {
	e := newEnv(t, awsfake.Options{PasswordDelay: 300 * time.Millisecond})
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "win.pem")
	writeRSAKey(t, keyFile)
	settings := e.with("os", "windows", "ami", winAMI, "instance_type", "m5.large", "windows_key_file", keyFile,
		"user_data", "<powershell>Enable-PSRemoting</powershell>")
	p := start(t, settings)
	ids, err := p.Create(ctxT(t), 2, map[string]string{providers.LabelManager: "mgr-1", providers.LabelRunner: "windows"})
	if err != nil {
		t.Fatal(err)
	}
	if calls := e.srv.Calls(); calls["ImportKeyPair"] != 1 {
		t.Errorf("ImportKeyPair calls = %d, want 1 per plugin", calls["ImportKeyPair"])
	}
	if kp := e.srv.KeyPairs(); len(kp) != 1 || !strings.HasPrefix(kp[0], "mayfly-win-") {
		t.Errorf("key pairs %v", kp)
	}
	in, _ := e.srv.Instance(ids[0])
	if ud := string(in.UserData); !strings.HasPrefix(ud, "<powershell>\n# mayfly: WinRM over HTTPS") || !strings.HasSuffix(ud, "\nEnable-PSRemoting</powershell>") || in.KeyName == "" {
		t.Errorf("windows user data %q key %q, want mayfly's WinRM script then the user_data setting's", ud, in.KeyName)
	}
	waitRunning(t, p, ids)
	_, err = p.ConnectInfo(ctxT(t), ids[0])
	if providers.KindOf(err) != providers.KindTransient || !strings.Contains(err.Error(), "not available yet") {
		t.Errorf("ConnectInfo before the password exists = %v, want transient", err)
	}
	time.Sleep(350 * time.Millisecond)
	for _, id := range ids {
		ci, err := p.ConnectInfo(ctxT(t), id)
		if err != nil {
			t.Fatalf("ConnectInfo(%s): %v", id, err)
		}
		if err := ci.Validate(); err != nil {
			t.Error(err)
		}
		if ci.Password != e.srv.Password(id) || ci.Protocol != providers.ProtocolWinRM || ci.Port != 5986 || ci.Username != "Administrator" || ci.OS != "windows" {
			t.Errorf("ConnectInfo(%s) = %+v, fake password %q", id, ci, e.srv.Password(id))
		}
	}
	if _, err := p.Create(ctxT(t), 1, labels); err != nil {
		t.Fatal(err)
	}
	if got := e.srv.Calls()["ImportKeyPair"]; got != 1 {
		t.Errorf("ImportKeyPair calls after a second Create = %d, want 1", got)
	}
	// A restarted plugin with the same key file decrypts the passwords of
	// the instances made before; a duplicate key pair is no error.
	p2 := start(t, settings)
	if _, err := p2.Create(ctxT(t), 1, labels); err != nil {
		t.Fatalf("Create after restart: %v", err)
	}
	ci, err := p2.ConnectInfo(ctxT(t), ids[1])
	if err != nil || ci.Password != e.srv.Password(ids[1]) {
		t.Errorf("ConnectInfo after restart = %+v, %v", ci, err)
	}
	// The key pair of a key file outlives Shutdown; a generated one does not.
	if err := p2.Shutdown(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if kp := e.srv.KeyPairs(); len(kp) != 1 {
		t.Errorf("key pairs after Shutdown = %v, want the file's pair kept", kp)
	}
	eph := start(t, e.with("os", "windows", "ami", winAMI))
	if _, err := eph.Create(ctxT(t), 1, labels); err != nil {
		t.Fatal(err)
	}
	if _, err := eph.ConnectInfo(ctxT(t), ids[0]); providers.KindOf(err) != providers.KindPermanent {
		t.Errorf("ConnectInfo with another Windows key = %v, want permanent", err)
	}
	if err := eph.Shutdown(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if kp := e.srv.KeyPairs(); len(kp) != 1 {
		t.Errorf("key pairs after an ephemeral plugin's Shutdown = %v, want only the file's", kp)
	}
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

func TestDeleteUnknownAndMalformed(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	p := start(t, e.with())
	ids, err := p.Create(ctxT(t), 2, labels)
	if err != nil {
		t.Fatal(err)
	}
	e.srv.ResetCalls()
	ghost := "i-0123456789abcdef0"
	all := append(slices.Clone(ids), ghost, "not-an-instance", ids[0])
	deleted, err := p.Delete(ctxT(t), all)
	if err != nil {
		t.Fatalf("Delete: %v", err)
	}
	want := append(slices.Clone(ids), ghost, "not-an-instance")
	if !slices.Equal(slices.Sorted(slices.Values(deleted)), slices.Sorted(slices.Values(want))) {
		t.Errorf("Delete = %v, want %v", deleted, want)
	}
	// One call refused for the unknown id, one without it.
	if got := e.srv.Calls()["TerminateInstances"]; got != 2 {
		t.Errorf("TerminateInstances calls = %d, want 2", got)
	}
	for _, id := range ids {
		if in, _ := e.srv.Instance(id); in.State != "terminated" && in.State != "shutting-down" {
			t.Errorf("instance %s is %s after Delete", id, in.State)
		}
	}
	e.srv.FailNext("TerminateInstances", "RequestLimitExceeded", "", 1)
	if _, err := p.Delete(ctxT(t), ids); err == nil {
		t.Error("Delete succeeded through a throttle")
	} else if _, ok := providers.IsRateLimited(err); !ok {
		t.Errorf("throttled Delete = %v, want rate_limited", err)
	}
}

// TestRestartLeakFree kills the plugin process while it holds instances:
// the restarted process lists them (from EC2's tags, no local state), can
// still log in to them (same key secret), and deletes them all.
func TestRestartLeakFree(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	secretFile := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secretFile, []byte(strings.Repeat("k", 48)), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startPlugin(t)
	if _, err := p.Init(ctxT(t), e.with("key_secret_file", secretFile)); err != nil {
		t.Fatal(err)
	}
	ids, err := p.Create(ctxT(t), 3, labels)
	if err != nil {
		t.Fatal(err)
	}
	waitRunning(t, p, ids)
	before, err := p.ConnectInfo(ctxT(t), ids[0])
	if err != nil {
		t.Fatal(err)
	}
	pid := p.PID()
	proc, err := os.FindProcess(pid)
	if err != nil {
		t.Fatal(err)
	}
	if err := proc.Kill(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for p.Restarts() == 0 || p.PID() == 0 || p.PID() == pid {
		if time.Now().After(deadline) {
			t.Fatal("plugin was not restarted")
		}
		time.Sleep(20 * time.Millisecond)
	}
	list := waitRunning(t, p, ids)
	if len(list) != 3 {
		t.Errorf("List after restart = %+v", list)
	}
	after, err := p.ConnectInfo(ctxT(t), ids[0])
	if err != nil {
		t.Fatalf("ConnectInfo after restart: %v", err)
	}
	if publicOf(t, after.PrivateKey) != publicOf(t, before.PrivateKey) {
		t.Error("the restarted plugin derived another SSH key")
	}
	var listed []string
	for _, in := range list {
		listed = append(listed, in.ID)
	}
	deleted, err := p.Delete(ctxT(t), listed)
	if err != nil || len(deleted) != 3 {
		t.Fatalf("Delete(%v) = %v, %v", listed, deleted, err)
	}
	for _, in := range e.srv.Instances() {
		if in.State != "terminated" && in.State != "shutting-down" {
			t.Errorf("instance %s left %s (leak)", in.ID, in.State)
		}
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

func TestRestartWithoutSecretRefusesOldInstances(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	ids, err := start(t, e.with()).Create(ctxT(t), 1, labels)
	if err != nil {
		t.Fatal(err)
	}
	p2 := start(t, e.with())
	_, err = p2.ConnectInfo(ctxT(t), ids[0])
	if providers.KindOf(err) != providers.KindPermanent || !strings.Contains(err.Error(), "key_secret_file") {
		t.Errorf("ConnectInfo after a restart without key_secret_file = %v, want a permanent error", err)
	}
}

func TestCreateRefusesUnlabelled(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	p := start(t, e.with("manager", "mgr-1"))
	for _, l := range []map[string]string{
		{providers.LabelRunner: "x"},
		{providers.LabelManager: "someone-else"},
		{providers.LabelManager: "mgr-1", "Name": "mine"},
		{providers.LabelManager: "mgr-1", "aws:owner": "x"},
	} {
		if _, err := p.Create(ctxT(t), 1, l); providers.KindOf(err) != providers.KindInvalidArgument {
			t.Errorf("Create with labels %v = %v, want invalid_argument", l, err)
		}
	}
	if got := e.srv.Calls()["RunInstances"]; got != 0 {
		t.Errorf("refused creates made %d RunInstances calls", got)
	}
}

// TestAPICallsPerJob counts the EC2 calls one job's instance costs: create,
// wait until it runs, get connect info (with host key), heartbeat, delete.
func TestAPICallsPerJob(t *testing.T) {
	for _, tc := range []struct {
		name string
		os   string
		n    int
	}{{"linux/1", "linux", 1}, {"linux/10", "linux", 10}, {"windows/1", "windows", 1}} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, awsfake.Options{PendingDuration: 100 * time.Millisecond})
			settings := e.with()
			if tc.os == "windows" {
				settings = e.with("os", "windows", "ami", winAMI)
			}
			p := start(t, settings)
			ids, err := p.Create(ctxT(t), tc.n, labels)
			if err != nil {
				t.Fatal(err)
			}
			polls := e.srv.Calls()["DescribeInstances"]
			waitRunning(t, p, ids)
			polls = e.srv.Calls()["DescribeInstances"] - polls
			for _, id := range ids {
				if _, err := p.ConnectInfo(ctxT(t), id); err != nil {
					t.Fatal(err)
				}
				if err := p.Heartbeat(ctxT(t), id); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := p.Delete(ctxT(t), ids); err != nil {
				t.Fatal(err)
			}
			calls := e.srv.Calls()
			perJob := func(action string) float64 { return float64(calls[action]) / float64(tc.n) }
			t.Logf("%s: per job RunInstances %.2f TerminateInstances %.2f GetConsoleOutput %.2f GetPasswordData %.2f ImportKeyPair %.2f; DescribeInstances %d (all from %d List polls, none from ConnectInfo/Heartbeat)",
				tc.name, perJob("RunInstances"), perJob("TerminateInstances"), perJob("GetConsoleOutput"), perJob("GetPasswordData"), perJob("ImportKeyPair"), calls["DescribeInstances"], polls)
			if calls["RunInstances"] != tc.n {
				t.Errorf("RunInstances = %d, want %d", calls["RunInstances"], tc.n)
			}
			if calls["TerminateInstances"] != 1 {
				t.Errorf("TerminateInstances = %d, want 1 for the batch", calls["TerminateInstances"])
			}
			if calls["DescribeInstances"] != polls {
				t.Errorf("DescribeInstances = %d, of which %d from List polls: ConnectInfo/Heartbeat missed the cache", calls["DescribeInstances"], polls)
			}
			switch tc.os {
			case "linux":
				if calls["GetConsoleOutput"] != tc.n {
					t.Errorf("GetConsoleOutput = %d, want %d", calls["GetConsoleOutput"], tc.n)
				}
			case "windows":
				// The WinRM certificate is the plugin's own: no call reads it.
				if calls["GetPasswordData"] != tc.n || calls["ImportKeyPair"] != 1 || calls["DescribeInstanceAttribute"] != 0 {
					t.Errorf("GetPasswordData = %d, ImportKeyPair = %d, DescribeInstanceAttribute = %d", calls["GetPasswordData"], calls["ImportKeyPair"], calls["DescribeInstanceAttribute"])
				}
			}
			if pc := p.APICalls(); pc["RunInstances"] != calls["RunInstances"] || pc["TerminateInstances"] != calls["TerminateInstances"] {
				t.Errorf("provider counts %v disagree with the endpoint's %v", pc, calls)
			}
		})
	}
}

func TestUserDataDecodes(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	p := start(t, e.with())
	ids, err := p.Create(ctxT(t), 1, labels)
	if err != nil {
		t.Fatal(err)
	}
	reqs := e.srv.Requests()
	ud, err := base64.StdEncoding.DecodeString(reqs[len(reqs)-1].Get("UserData"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(ud), "#cloud-config\nssh_authorized_keys:\n  - ssh-ed25519 ") {
		t.Errorf("user data without user_data setting:\n%s", ud)
	}
	in, _ := e.srv.Instance(ids[0])
	if in.Tags["Name"] == "" || in.Tags[aws.TagKeyID] == "" || in.Tags[providers.LabelManager] != "mgr-1" {
		t.Errorf("tags = %v", in.Tags)
	}
	if got := reqs[len(reqs)-1].Get("TagSpecification.2.ResourceType"); got != "volume" {
		t.Errorf("second tag specification is for %q, want volume", got)
	}
}

func TestLaunchTemplateAndOptions(t *testing.T) {
	e := newEnv(t, awsfake.Options{LaunchTemplates: []awsfake.LaunchTemplate{
		{ID: "lt-0123456789abcdef0", Name: "runners", ImageID: ami, InstanceType: "c6i.large"},
	}})
	delete(e.settings, "ami")
	delete(e.settings, "instance_type")
	p := start(t, e.with(
		"launch_template", map[string]any{"name": "runners", "version": "$Latest"},
		"security_group_ids", []string{"sg-0123456789abcdef0"},
		"iam_instance_profile", "arn:aws:iam::123456789012:instance-profile/runner",
	))
	ids, err := p.Create(ctxT(t), 1, labels)
	if err != nil {
		t.Fatal(err)
	}
	in, _ := e.srv.Instance(ids[0])
	if in.ImageID != ami || in.InstanceType != "c6i.large" {
		t.Errorf("instance from template: image %s type %s", in.ImageID, in.InstanceType)
	}
	if !slices.Equal(in.SecurityGroups, []string{"sg-0123456789abcdef0"}) || in.IAMProfile != "arn:aws:iam::123456789012:instance-profile/runner" {
		t.Errorf("security groups %v, profile %q", in.SecurityGroups, in.IAMProfile)
	}
	req := e.srv.Requests()[0]
	if req.Get("LaunchTemplate.LaunchTemplateName") != "runners" || req.Get("LaunchTemplate.Version") != "$Latest" {
		t.Errorf("launch template parameters: %v", req)
	}
	missing := start(t, e.with("launch_template", map[string]any{"name": "gone"}))
	if _, err := missing.Create(ctxT(t), 1, labels); providers.KindOf(err) != providers.KindInvalidArgument {
		t.Errorf("Create with an unknown template = %v, want invalid_argument", err)
	}
}
