package gcefake

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"cloud.google.com/go/compute/apiv1/computepb"
	"google.golang.org/protobuf/proto"
)

const base = "/compute/v1/projects/p"

type client struct {
	t     *testing.T
	url   string
	token string
}

func newClient(t *testing.T, opts Options) (*Server, *client) {
	t.Helper()
	opts.Project = "p"
	s := New(opts)
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	return s, &client{t: t, url: srv.URL, token: grant(t, srv.URL, signedJWT(t, srv.URL+TokenPath, time.Hour))}
}

// signedJWT returns a service-account JWT for aud, signed with the fake's
// key, valid for ttl (negative: expired).
func signedJWT(t *testing.T, aud string, ttl time.Duration) string {
	t.Helper()
	key, err := serviceAccount()
	if err != nil {
		t.Fatal(err)
	}
	seg := func(v any) string {
		b, _ := json.Marshal(v)
		return base64.RawURLEncoding.EncodeToString(b)
	}
	now := time.Now()
	unsigned := seg(map[string]string{"alg": "RS256", "typ": "JWT"}) + "." + seg(map[string]any{
		"iss": ServiceAccountEmail, "aud": aud, "scope": "https://www.googleapis.com/auth/compute",
		"iat": now.Unix(), "exp": now.Add(ttl).Unix(),
	})
	sum := sha256.Sum256([]byte(unsigned))
	sig, err := rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	return unsigned + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// grant exchanges assertion for an access token at the fake's token
// endpoint (JWT bearer grant), failing the test when it is refused.
func grant(t *testing.T, baseURL, assertion string) string {
	t.Helper()
	code, m := tokenRequest(t, baseURL, url.Values{"grant_type": {"urn:ietf:params:oauth:grant-type:jwt-bearer"}, "assertion": {assertion}})
	tok, _ := m["access_token"].(string)
	if code != 200 || tok == "" || m["token_type"] != "Bearer" {
		t.Fatalf("token grant: %d %v", code, m)
	}
	return tok
}

func tokenRequest(t *testing.T, baseURL string, form url.Values) (int, map[string]any) {
	t.Helper()
	resp, err := http.PostForm(baseURL+TokenPath, form)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&m)
	return resp.StatusCode, m
}

// do sends a request and decodes the JSON answer into a generic map, so
// the tests see the wire format, not the SDK's types.
func (c *client) do(method, path, body string) (int, map[string]any, http.Header) {
	c.t.Helper()
	req, err := http.NewRequest(method, c.url+path, strings.NewReader(body))
	if err != nil {
		c.t.Fatal(err)
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		c.t.Fatalf("%s %s: answer is not JSON: %q", method, path, b)
	}
	return resp.StatusCode, m, resp.Header
}

func instanceJSON(name string, extra string) string {
	return fmt.Sprintf(`{"name": %q, "machineType": "zones/us-east1-b/machineTypes/n1-standard-1",
		"disks": [{"boot": true, "autoDelete": true, "initializeParams": {"sourceImage": "projects/debian-cloud/global/images/family/debian-12"}}],
		"networkInterfaces": [{"network": "global/networks/default", "accessConfigs": [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}]}],
		"labels": {"mayfly-manager": "m1"}%s}`, name, extra)
}

func errorReason(m map[string]any) (int, string) {
	e, _ := m["error"].(map[string]any)
	code, _ := e["code"].(float64)
	errs, _ := e["errors"].([]any)
	if len(errs) == 0 {
		return int(code), ""
	}
	first, _ := errs[0].(map[string]any)
	reason, _ := first["reason"].(string)
	return int(code), reason
}

func TestInsertGetDeleteWireFormat(t *testing.T) {
	s, c := newClient(t, Options{DeleteDelay: time.Hour})
	code, op, _ := c.do("POST", base+"/zones/us-east1-b/instances", instanceJSON("vm-1", ""))
	if code != 200 || op["kind"] != "compute#operation" || op["status"] != "RUNNING" || op["operationType"] != "insert" {
		t.Fatalf("insert answer %d %v", code, op)
	}
	if _, ok := op["targetId"].(string); !ok {
		t.Errorf("targetId %v is not a JSON string (uint64 fields are strings)", op["targetId"])
	}
	code, op, _ = c.do("GET", base+"/zones/us-east1-b/operations/"+op["name"].(string), "")
	if code != 200 || op["status"] != "DONE" || op["progress"] != float64(100) {
		t.Errorf("operation %d %v, want DONE", code, op)
	}

	code, in, _ := c.do("GET", base+"/zones/us-east1-b/instances/vm-1", "")
	if code != 200 {
		t.Fatalf("get %d %v", code, in)
	}
	if _, err := time.Parse(time.RFC3339, in["creationTimestamp"].(string)); err != nil {
		t.Errorf("creationTimestamp: %v", err)
	}
	if in["status"] != "RUNNING" || in["kind"] != "compute#instance" || !strings.HasSuffix(in["zone"].(string), "/zones/us-east1-b") {
		t.Errorf("instance %v", in)
	}
	nic := in["networkInterfaces"].([]any)[0].(map[string]any)
	ac := nic["accessConfigs"].([]any)[0].(map[string]any)
	if nic["networkIP"] == "" || ac["natIP"] == nil {
		t.Errorf("network interface %v lacks addresses", nic)
	}

	code, m, _ := c.do("POST", base+"/zones/us-east1-b/instances", instanceJSON("vm-1", ""))
	if c, r := errorReason(m); code != 409 || c != 409 || r != "alreadyExists" {
		t.Errorf("duplicate insert %d %v", code, m)
	}
	code, _, _ = c.do("DELETE", base+"/zones/us-east1-b/instances/vm-1", "")
	if code != 200 {
		t.Fatalf("delete %d", code)
	}
	if got := s.Instances(); len(got) != 1 || got[0].Status != "STOPPING" {
		t.Errorf("after delete: %+v, want STOPPING", got)
	}
	reqs := s.Requests()
	if last := reqs[len(reqs)-1]; last.Method != "instances.delete" || last.Zone != "us-east1-b" || last.Name != "vm-1" || last.Status != 200 {
		t.Errorf("last request recorded as %+v, want instances.delete of us-east1-b/vm-1 answered 200", last)
	}
	code, m, _ = c.do("GET", base+"/zones/us-east1-b/instances/nope", "")
	if c, r := errorReason(m); code != 404 || c != 404 || r != "notFound" {
		t.Errorf("get unknown %d %v", code, m)
	}
	code, m, _ = c.do("GET", "/compute/v1/projects/other/zones/us-east1-b/instances/vm-1", "")
	if code != 404 {
		t.Errorf("other project answered %d %v", code, m)
	}
}

func TestInsertValidation(t *testing.T) {
	_, c := newClient(t, Options{})
	tests := []struct{ name, body, field string }{
		{"bad name", instanceJSON("VM_1", ""), "resource.name"},
		{"bad label value", strings.Replace(instanceJSON("vm-1", ""), `"m1"`, `"M 1"`, 1), "resource.labels"},
		{"bad label key", strings.Replace(instanceJSON("vm-1", ""), `"mayfly-manager"`, `"Mayfly"`, 1), "resource.labels"},
		{"machine type of another zone", strings.Replace(instanceJSON("vm-1", ""), "zones/us-east1-b/machineTypes", "zones/us-east1-c/machineTypes", 1), "resource.machineType"},
		{"preemptible restarting", instanceJSON("vm-1", `, "scheduling": {"preemptible": true, "automaticRestart": true, "onHostMaintenance": "TERMINATE"}`), "automaticRestart"},
		{"unknown field", instanceJSON("vm-1", `, "colour": "blue"`), "Invalid JSON payload"},
	}
	for _, tt := range tests {
		code, m, _ := c.do("POST", base+"/zones/us-east1-b/instances", tt.body)
		msg, _ := m["error"].(map[string]any)["message"].(string)
		if code != 400 || !strings.Contains(msg, tt.field) {
			t.Errorf("%s: %d %q, want 400 naming %s", tt.name, code, msg, tt.field)
		}
	}
}

func TestListFilterAndPaging(t *testing.T) {
	s, c := newClient(t, Options{})
	for i := range 5 {
		c.do("POST", base+"/zones/us-east1-b/instances", instanceJSON(fmt.Sprintf("vm-%d", i), ""))
	}
	c.do("POST", base+"/zones/us-east1-c/instances", strings.Replace(instanceJSON("vm-c", ""), "us-east1-b", "us-east1-c", 1))
	c.do("POST", base+"/zones/us-east1-b/instances", strings.Replace(instanceJSON("other", ""), `"mayfly-manager": "m1"`, `"team": "x"`, 1))

	var names []string
	token := ""
	pages := 0
	for {
		path := base + "/zones/us-east1-b/instances?maxResults=2&filter=" + "labels.mayfly-manager%3A*"
		if token != "" {
			path += "&pageToken=" + token
		}
		code, m, _ := c.do("GET", path, "")
		if code != 200 {
			t.Fatalf("list %d %v", code, m)
		}
		pages++
		items, _ := m["items"].([]any)
		if len(items) > 2 {
			t.Errorf("page of %d items with maxResults=2", len(items))
		}
		for _, it := range items {
			names = append(names, it.(map[string]any)["name"].(string))
		}
		token, _ = m["nextPageToken"].(string)
		if token == "" {
			break
		}
	}
	if strings.Join(names, ",") != "vm-0,vm-1,vm-2,vm-3,vm-4" || pages != 3 {
		t.Errorf("listed %v in %d pages", names, pages)
	}

	code, m, _ := c.do("GET", base+"/aggregated/instances?filter=labels.mayfly-manager+%3D+%22m1%22&maxResults=500", "")
	items := m["items"].(map[string]any)
	if code != 200 || len(items["zones/us-east1-b"].(map[string]any)["instances"].([]any)) != 5 ||
		len(items["zones/us-east1-c"].(map[string]any)["instances"].([]any)) != 1 {
		t.Errorf("aggregated list %d %v", code, m)
	}
	s.SetUnreachable("us-east1-d", true)
	_, m, _ = c.do("GET", base+"/aggregated/instances", "")
	w := m["items"].(map[string]any)["zones/us-east1-d"].(map[string]any)["warning"].(map[string]any)
	if w["code"] != "UNREACHABLE" {
		t.Errorf("unreachable zone warning %v", w)
	}

	for _, bad := range []string{"maxResults=501", "filter=bogus+stuff", "filter=disks.type+%3D+x", "pageToken=%21%21"} {
		code, m, _ := c.do("GET", base+"/zones/us-east1-b/instances?"+bad, "")
		if c, r := errorReason(m); code != 400 || c != 400 || r != "invalid" {
			t.Errorf("list ?%s answered %d %v, want 400 invalid", bad, code, m)
		}
	}
}

func TestParseFilter(t *testing.T) {
	in := &computepb.Instance{Name: proto.String("vm-1"), Status: proto.String("RUNNING"), Labels: map[string]string{"a": "x", "b": "yz"}}
	tests := []struct {
		filter string
		want   bool
	}{
		{"", true},
		{"labels.a:*", true},
		{"labels.c:*", false},
		{`labels.a = "x"`, true},
		{`labels.a = x`, true},
		{`labels.a = "y"`, false},
		{`labels.b != "yz"`, false},
		{`labels.b:y`, true},
		{`(labels.a = "x") (status = RUNNING)`, true},
		{`(labels.a = "x") AND (status = "STOPPING")`, false},
		{`name = "vm-1"`, true},
		{`name = "vm-1" AND status = RUNNING`, true},
		{`name = vm-1 AND status = "STOPPING"`, false},
		{`(name = "vm-1") AND (labels.b:y) (labels.a:*)`, true},
		{`name = "a AND b"`, false},
		{`labels.a = "(x)" AND name = vm-1`, false},
	}
	for _, tt := range tests {
		match, err := parseFilter(tt.filter, instanceFields)
		if err != nil {
			t.Errorf("parseFilter(%q): %v", tt.filter, err)
			continue
		}
		if got := match(in); got != tt.want {
			t.Errorf("filter %q matched %v, want %v", tt.filter, got, tt.want)
		}
	}
	for _, bad := range []string{
		"(labels.a = x", "labels.a", "cpuPlatform = x", `labels.a = "x`,
		"name = vm-1 OR name = vm-2", "name = vm-1 AND", "name = vm-1 status = RUNNING", "(name = vm-1) name = vm-2",
		`operationType = "insert"`,
	} {
		if _, err := parseFilter(bad, instanceFields); err == nil {
			t.Errorf("parseFilter(%q) accepted", bad)
		}
	}
}

func TestFaults(t *testing.T) {
	s, c := newClient(t, Options{})
	s.FailNext(Fault{Method: "instances.insert", Status: 429, Reason: "rateLimitExceeded", RetryAfter: "3"})
	code, m, h := c.do("POST", base+"/zones/us-east1-b/instances", instanceJSON("vm-1", ""))
	if c, r := errorReason(m); code != 429 || c != 429 || r != "rateLimitExceeded" || h.Get("Retry-After") != "3" {
		t.Errorf("429 fault: %d %v %v", code, m, h)
	}
	if e := m["error"].(map[string]any); e["status"] != "RESOURCE_EXHAUSTED" || e["errors"].([]any)[0].(map[string]any)["domain"] != "usageLimits" {
		t.Errorf("429 error body %v", e)
	}

	s.ExhaustZone("us-east1-b", 1)
	_, op, _ := c.do("POST", base+"/zones/us-east1-b/instances", instanceJSON("vm-1", ""))
	_, op, _ = c.do("POST", base+"/zones/us-east1-b/operations/"+op["name"].(string)+"/wait", "")
	errs := op["error"].(map[string]any)["errors"].([]any)
	if op["status"] != "DONE" || errs[0].(map[string]any)["code"] != "ZONE_RESOURCE_POOL_EXHAUSTED" || op["httpErrorStatusCode"] != float64(503) {
		t.Errorf("exhausted zone operation %v", op)
	}
	if len(s.Instances()) != 0 {
		t.Error("a failed insert left an instance")
	}

	s.SetQuota("us-east1", 1)
	c.do("POST", base+"/zones/us-east1-b/instances", instanceJSON("vm-1", ""))
	_, op, _ = c.do("POST", base+"/zones/us-east1-b/instances", instanceJSON("vm-2", ""))
	_, op, _ = c.do("GET", base+"/zones/us-east1-b/operations/"+op["name"].(string), "")
	e := op["error"].(map[string]any)["errors"].([]any)[0].(map[string]any)
	if e["code"] != "QUOTA_EXCEEDED" || !strings.Contains(e["message"].(string), "in region us-east1") {
		t.Errorf("quota operation error %v", e)
	}
	if err := s.Preempt("us-east1-b", "vm-1"); err == nil {
		t.Error("preempted a standard instance")
	}
}

func TestSlowOperationWait(t *testing.T) {
	_, c := newClient(t, Options{OperationDelay: 300 * time.Millisecond, MaxWait: 50 * time.Millisecond})
	_, op, _ := c.do("POST", base+"/zones/us-east1-b/instances", instanceJSON("vm-1", ""))
	_, op, _ = c.do("POST", base+"/zones/us-east1-b/operations/"+op["name"].(string)+"/wait", "")
	if op["status"] != "RUNNING" {
		t.Errorf("wait returned %v before MaxWait ran out", op["status"])
	}
}

// TestWindowsAgent drives the password reset by hand, as the docs
// describe it: setMetadata with a windows-keys entry, read serial port 4,
// decrypt with RSA-OAEP SHA-1.
func TestWindowsAgent(t *testing.T) {
	s, c := newClient(t, Options{})
	body := strings.Replace(instanceJSON("win-1", ""), "debian-cloud/global/images/family/debian-12", "windows-cloud/global/images/family/windows-2022", 1)
	if code, m, _ := c.do("POST", base+"/zones/us-east1-b/instances", body); code != 200 {
		t.Fatalf("insert %d %v", code, m)
	}
	_, in, _ := c.do("GET", base+"/zones/us-east1-b/instances/win-1", "")
	fp := in["metadata"].(map[string]any)["fingerprint"].(string)

	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	entry, _ := json.Marshal(map[string]string{
		"userName": "admin", "email": "a@example.com",
		"modulus":  base64.StdEncoding.EncodeToString(key.N.Bytes()),
		"exponent": base64.StdEncoding.EncodeToString(big.NewInt(int64(key.E)).Bytes()),
		"expireOn": time.Now().Add(time.Hour).UTC().Format(time.RFC3339),
	})
	md, _ := json.Marshal(map[string]any{"fingerprint": fp, "items": []map[string]string{{"key": "windows-keys", "value": string(entry)}}})
	if code, m, _ := c.do("POST", base+"/zones/us-east1-b/instances/win-1/setMetadata", "{\"fingerprint\": \"stale\"}"); code != 412 {
		t.Errorf("setMetadata with a stale fingerprint: %d %v", code, m)
	}
	if code, m, _ := c.do("POST", base+"/zones/us-east1-b/instances/win-1/setMetadata", string(md)); code != 200 {
		t.Fatalf("setMetadata %d %v", code, m)
	}
	_, out, _ := c.do("GET", base+"/zones/us-east1-b/instances/win-1/serialPort?port=4", "")
	line, _, _ := strings.Cut(out["contents"].(string), "\n")
	var creds struct {
		EncryptedPassword string `json:"encryptedPassword"`
		PasswordFound     bool   `json:"passwordFound"`
		UserName          string `json:"userName"`
		Modulus           string `json:"modulus"`
	}
	if err := json.Unmarshal([]byte(line), &creds); err != nil || !creds.PasswordFound || creds.UserName != "admin" {
		t.Fatalf("serial port 4 line %q: %v", line, err)
	}
	ct, _ := base64.StdEncoding.DecodeString(creds.EncryptedPassword)
	pt, err := rsa.DecryptOAEP(sha1.New(), nil, key, ct, nil)
	if err != nil {
		t.Fatal(err)
	}
	if string(pt) != s.WindowsPassword("us-east1-b", "win-1", "admin") {
		t.Errorf("decrypted %q, agent set %q", pt, s.WindowsPassword("us-east1-b", "win-1", "admin"))
	}
	if out["next"] != fmt.Sprint(len(line)+1) {
		t.Errorf("next = %v, want %d (as a JSON string)", out["next"], len(line)+1)
	}
	// The same entry again is not answered twice.
	_, in, _ = c.do("GET", base+"/zones/us-east1-b/instances/win-1", "")
	md = bytes.Replace(md, []byte(fp), []byte(in["metadata"].(map[string]any)["fingerprint"].(string)), 1)
	c.do("POST", base+"/zones/us-east1-b/instances/win-1/setMetadata", string(md))
	_, out, _ = c.do("GET", base+"/zones/us-east1-b/instances/win-1/serialPort?port=4&start="+fmt.Sprint(len(line)+1), "")
	if out["contents"] != "" {
		t.Errorf("entry answered twice: %q", out["contents"])
	}
}

func TestParseOperationFilter(t *testing.T) {
	op := &computepb.Operation{
		Name: proto.String("operation-1"), OperationType: proto.String(OpPreempted),
		Status: computepb.Operation_DONE.Enum(), User: proto.String("system"),
		TargetLink: proto.String("https://compute.example/projects/p/zones/z/instances/vm-1"), TargetId: proto.Uint64(42),
	}
	tests := []struct {
		filter string
		want   bool
	}{
		{`operationType="compute.instances.preempted"`, true},
		{`operationType="compute.instances.preempted" AND targetLink="https://compute.example/projects/p/zones/z/instances/vm-1"`, true},
		{`operationType="compute.instances.preempted" AND targetLink="https://compute.example/projects/p/zones/z/instances/vm-2"`, false},
		{`(status = DONE) (user = system) (targetId = 42)`, true},
		{`operationType = insert`, false},
		{`targetLink:instances/vm-1`, true},
	}
	for _, tt := range tests {
		match, err := parseFilter(tt.filter, operationFields)
		if err != nil {
			t.Errorf("parseFilter(%q): %v", tt.filter, err)
			continue
		}
		if got := match(op); got != tt.want {
			t.Errorf("filter %q matched %v, want %v", tt.filter, got, tt.want)
		}
	}
	if _, err := parseFilter("labels.a:*", operationFields); err == nil {
		t.Error("an operation filter on labels was accepted")
	}
}

// TestPreempt plays preemptions as GCE does them: STOPPING at once, then
// TERMINATED after PreemptDelay (or deleted, with termination action
// DELETE), with a compute.instances.preempted zone operation by user
// system that zoneOperations.list finds with the filter of the GCE docs.
func TestPreempt(t *testing.T) {
	const (
		spot        = `, "scheduling": {"provisioningModel": "SPOT", "onHostMaintenance": "TERMINATE", "automaticRestart": false}`
		spotDelete  = `, "scheduling": {"provisioningModel": "SPOT", "onHostMaintenance": "TERMINATE", "instanceTerminationAction": "DELETE"}`
		preemptible = `, "scheduling": {"preemptible": true, "onHostMaintenance": "TERMINATE"}`
		delay       = 300 * time.Millisecond
	)
	tests := []struct {
		name      string
		extra     string
		delay     time.Duration
		before    func(c *client) // run before Preempt
		wantErr   string          // Preempt's error, if any
		wantFirst string          // status right after Preempt
		wantLast  string          // status after PreemptDelay; "" = gone
	}{
		{name: "spot", extra: spot, delay: delay, wantFirst: "STOPPING", wantLast: "TERMINATED"},
		{name: "preemptible at once", extra: preemptible, wantFirst: "TERMINATED", wantLast: "TERMINATED"},
		{name: "spot deleted on preemption", extra: spotDelete, delay: delay, wantFirst: "STOPPING", wantLast: ""},
		{name: "standard", extra: "", wantErr: "neither preemptible nor spot"},
		{name: "unknown", extra: spot, before: func(c *client) {
			c.do("DELETE", base+"/zones/us-east1-b/instances/vm-1", "")
		}, wantErr: "no such instance"},
		{name: "twice", extra: spot, delay: time.Hour, before: func(c *client) {}, wantErr: "already"},
		{name: "being deleted", extra: spot, before: func(c *client) {
			c.do("DELETE", base+"/zones/us-east1-b/instances/vm-1", "")
		}, wantErr: "already"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := Options{PreemptDelay: tt.delay}
			if tt.name == "being deleted" {
				opts.DeleteDelay = time.Hour
			}
			s, c := newClient(t, opts)
			for _, name := range []string{"vm-1", "vm-2"} {
				if code, m, _ := c.do("POST", base+"/zones/us-east1-b/instances", instanceJSON(name, tt.extra)); code != 200 {
					t.Fatalf("insert %s: %d %v", name, code, m)
				}
			}
			if tt.name == "twice" {
				if err := s.Preempt("us-east1-b", "vm-1"); err != nil {
					t.Fatal(err)
				}
			}
			if tt.before != nil {
				tt.before(c)
			}
			err := s.Preempt("us-east1-b", "vm-1")
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Preempt: %v, want an error with %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			_, in, _ := c.do("GET", base+"/zones/us-east1-b/instances/vm-1", "")
			if in["status"] != tt.wantFirst {
				t.Errorf("status right after Preempt %v, want %s", in["status"], tt.wantFirst)
			}
			self := in["selfLink"].(string)
			if tt.delay > 0 {
				time.Sleep(tt.delay + 50*time.Millisecond)
			}
			code, in, _ := c.do("GET", base+"/zones/us-east1-b/instances/vm-1", "")
			switch {
			case tt.wantLast == "" && code != 404:
				t.Errorf("after PreemptDelay: %d %v, want 404 (deleted)", code, in["status"])
			case tt.wantLast != "" && (in["status"] != tt.wantLast || in["lastStopTimestamp"] == nil):
				t.Errorf("after PreemptDelay: status %v, lastStopTimestamp %v; want %s with a stop time", in["status"], in["lastStopTimestamp"], tt.wantLast)
			}
			_, other, _ := c.do("GET", base+"/zones/us-east1-b/instances/vm-2", "")
			if other["status"] != "RUNNING" {
				t.Errorf("the other instance is %v, want RUNNING", other["status"])
			}

			// The filter of the GCE docs' preemption-history sample.
			filter := `operationType="compute.instances.preempted" AND targetLink="` + self + `"`
			code, list, _ := c.do("GET", base+"/zones/us-east1-b/operations?filter="+url.QueryEscape(filter), "")
			items, _ := list["items"].([]any)
			if code != 200 || len(items) != 1 {
				t.Fatalf("preemption operations of vm-1: %d %v, want one", code, list)
			}
			op := items[0].(map[string]any)
			if op["operationType"] != OpPreempted || op["status"] != "DONE" || op["user"] != "system" ||
				op["statusMessage"] != "Instance was preempted." || op["targetLink"] != self || op["kind"] != "compute#operation" {
				t.Errorf("preemption operation %v", op)
			}
			code, got, _ := c.do("GET", base+"/zones/us-east1-b/operations/"+op["name"].(string), "")
			if code != 200 || got["operationType"] != OpPreempted {
				t.Errorf("zoneOperations.get of the preemption: %d %v", code, got)
			}
			filter = `operationType="compute.instances.preempted" AND targetLink="` + strings.Replace(self, "vm-1", "vm-2", 1) + `"`
			_, list, _ = c.do("GET", base+"/zones/us-east1-b/operations?filter="+url.QueryEscape(filter), "")
			if items, _ := list["items"].([]any); len(items) != 0 {
				t.Errorf("vm-2 has preemption operations: %v", items)
			}
			if ops := s.Operations(); len(ops) != 3 || ops[2].Type != OpPreempted || ops[2].User != "system" {
				t.Errorf("Operations() = %+v, want the two inserts then the preemption", ops)
			}
		})
	}
}

func TestListOperationsPaging(t *testing.T) {
	_, c := newClient(t, Options{})
	for _, name := range []string{"vm-1", "vm-2", "vm-3"} {
		c.do("POST", base+"/zones/us-east1-b/instances", instanceJSON(name, ""))
	}
	c.do("POST", base+"/zones/us-east1-c/instances", strings.ReplaceAll(instanceJSON("vm-4", ""), "us-east1-b", "us-east1-c"))
	var names []string
	tok := ""
	for range 5 {
		_, page, _ := c.do("GET", base+"/zones/us-east1-b/operations?maxResults=2&filter=operationType%3Dinsert&pageToken="+tok, "")
		for _, it := range page["items"].([]any) {
			op := it.(map[string]any)
			names = append(names, op["targetLink"].(string)[strings.LastIndexByte(op["targetLink"].(string), '/')+1:])
		}
		tok, _ = page["nextPageToken"].(string)
		if tok == "" {
			break
		}
	}
	if got := strings.Join(names, ","); got != "vm-1,vm-2,vm-3" {
		t.Errorf("operations of us-east1-b, paged by 2: %s, want vm-1,vm-2,vm-3 in order", got)
	}
	code, m, _ := c.do("GET", base+"/zones/us-east1-b/operations?filter=labels.a%3A*", "")
	if c, r := errorReason(m); code != 400 || c != 400 || r != "invalid" {
		t.Errorf("operations filter on labels: %d %v, want 400 invalid", code, m)
	}
}

// TestAuthentication: the API answers 401 as Compute Engine does without a
// bearer token, with a token it did not issue, and with a JWT whose
// signature does not verify; the token endpoint refuses expired or foreign grants; a JWT the
// service account signed itself is accepted as a bearer token.
func TestAuthentication(t *testing.T) {
	s, c := newClient(t, Options{})
	for _, tt := range []struct {
		name, token, reason string
	}{
		{"no token", "", "required"},
		{"unknown token", "ya29.not-issued", "authError"},
		{"JWT with a bad signature", func() string {
			j := signedJWT(t, c.url+TokenPath, time.Hour)
			return j[:strings.LastIndexByte(j, '.')] + ".AAAA"
		}(), "authError"},
	} {
		anon := &client{t: t, url: c.url, token: tt.token}
		code, m, h := anon.do("GET", base+"/aggregated/instances", "")
		if code != 401 {
			t.Errorf("%s: status %d, want 401", tt.name, code)
		}
		if _, reason := errorReason(m); reason != tt.reason {
			t.Errorf("%s: reason %q, want %q", tt.name, reason, tt.reason)
		}
		if e, _ := m["error"].(map[string]any); e["status"] != "UNAUTHENTICATED" || h.Get("WWW-Authenticate") == "" {
			t.Errorf("%s: error %v, WWW-Authenticate %q", tt.name, m["error"], h.Get("WWW-Authenticate"))
		}
	}
	if code, _, _ := c.do("GET", base+"/aggregated/instances", ""); code != 200 {
		t.Errorf("with an issued token: status %d", code)
	}
	self := &client{t: t, url: c.url, token: signedJWT(t, "https://compute.googleapis.com/", time.Hour)}
	if code, _, _ := self.do("GET", base+"/aggregated/instances", ""); code != 200 {
		t.Errorf("with a self-signed service-account JWT: status %d", code)
	}
	for name, form := range map[string]url.Values{
		"expired JWT":      {"grant_type": {"urn:ietf:params:oauth:grant-type:jwt-bearer"}, "assertion": {signedJWT(t, c.url+TokenPath, -time.Minute)}},
		"wrong audience":   {"grant_type": {"urn:ietf:params:oauth:grant-type:jwt-bearer"}, "assertion": {signedJWT(t, "https://example.invalid/", time.Hour)}},
		"other grant type": {"grant_type": {"client_credentials"}},
	} {
		if code, m := tokenRequest(t, c.url, form); code != 400 || m["error"] == nil {
			t.Errorf("%s: %d %v, want 400 with an OAuth error", name, code, m)
		}
	}
	if n := s.TokenGrants(); n != 1 {
		t.Errorf("TokenGrants = %d, want 1", n)
	}
	if key, err := ServiceAccountKey(c.url, "p"); err != nil || !strings.Contains(string(key), `"token_uri":"`+c.url+TokenPath+`"`) {
		t.Errorf("ServiceAccountKey = %s, %v", key, err)
	}
}
