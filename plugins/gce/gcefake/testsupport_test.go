package gcefake

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"encoding/base64"
	"encoding/json"
	"math/big"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

// TestLocalInstanceOptions checks the options that let a local server play
// the instances: a fixed address and a fixed Windows password, still
// delivered RSA-OAEP encrypted on serial port 4.
func TestLocalInstanceOptions(t *testing.T) {
	const fixed = "Fixed-Passw0rd!"
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
	md, _ := json.Marshal(map[string]any{"items": []map[string]string{{"key": "windows-keys", "value": string(entry)}}})
	s, c := newClient(t, Options{Address: "127.0.0.1", WindowsPassword: fixed})
	body := strings.Replace(instanceJSON("win-1", `, "metadata": `+string(md)), "debian-cloud/global/images/family/debian-12", "windows-cloud/global/images/family/windows-2022", 1)
	if code, m, _ := c.do("POST", base+"/zones/us-east1-b/instances", body); code != 200 {
		t.Fatalf("insert %d %v", code, m)
	}
	_, in, _ := c.do("GET", base+"/zones/us-east1-b/instances/win-1", "")
	nic := in["networkInterfaces"].([]any)[0].(map[string]any)
	if nic["networkIP"] != "127.0.0.1" {
		t.Errorf("networkIP = %v, want 127.0.0.1", nic["networkIP"])
	}
	if nat := nic["accessConfigs"].([]any)[0].(map[string]any)["natIP"]; nat != "127.0.0.1" {
		t.Errorf("natIP = %v, want 127.0.0.1", nat)
	}
	_, out, _ := c.do("GET", base+"/zones/us-east1-b/instances/win-1/serialPort?port=4", "")
	line, _, _ := strings.Cut(out["contents"].(string), "\n")
	var creds struct {
		EncryptedPassword string `json:"encryptedPassword"`
		PasswordFound     bool   `json:"passwordFound"`
	}
	if err := json.Unmarshal([]byte(line), &creds); err != nil || !creds.PasswordFound {
		t.Fatalf("serial port 4 line %q: %v", line, err)
	}
	ct, _ := base64.StdEncoding.DecodeString(creds.EncryptedPassword)
	pt, err := rsa.DecryptOAEP(sha1.New(), nil, key, ct, nil)
	if err != nil {
		t.Fatal(err)
	}
	if string(pt) != fixed || s.WindowsPassword("us-east1-b", "win-1", "admin") != fixed {
		t.Errorf("decrypted %q, agent set %q; want %q", pt, s.WindowsPassword("us-east1-b", "win-1", "admin"), fixed)
	}
}

// TestHostKeysAndOnMetadata checks the options that let a local SSH server
// play Linux instances: the agent publishes the given host key, and
// OnMetadata sees every insert and setMetadata before its answer, so a
// test can authorise the ssh-keys entries in time.
func TestHostKeysAndOnMetadata(t *testing.T) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := ssh.NewPublicKey(priv.Public())
	if err != nil {
		t.Fatal(err)
	}
	hostKey := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub)))
	var mu sync.Mutex
	var seen []string // name: ssh-keys
	s, c := newClient(t, Options{
		HostKeys: []string{hostKey + " root@server", "not a key"},
		OnMetadata: func(in InstanceInfo) {
			mu.Lock()
			seen = append(seen, in.Name+": "+in.Metadata["ssh-keys"])
			mu.Unlock()
		},
	})
	seenNow := func() string {
		mu.Lock()
		defer mu.Unlock()
		return strings.Join(seen, "\n")
	}
	md := `, "metadata": {"items": [{"key": "enable-guest-attributes", "value": "TRUE"}, {"key": "ssh-keys", "value": "mayfly:ssh-ed25519 AAAA1 mayfly"}]}`
	if code, m, _ := c.do("POST", base+"/zones/us-east1-b/instances", instanceJSON("vm-1", md)); code != 200 {
		t.Fatalf("insert %d %v", code, m)
	}
	if got := seenNow(); got != "vm-1: mayfly:ssh-ed25519 AAAA1 mayfly" {
		t.Errorf("OnMetadata after insert saw %q", got)
	}
	_, in, _ := c.do("GET", base+"/zones/us-east1-b/instances/vm-1", "")
	fp := in["metadata"].(map[string]any)["fingerprint"].(string)
	body := `{"fingerprint": "` + fp + `", "items": [{"key": "ssh-keys", "value": "mayfly:ssh-ed25519 AAAA2 mayfly"}]}`
	if code, m, _ := c.do("POST", base+"/zones/us-east1-b/instances/vm-1/setMetadata", body); code != 200 {
		t.Fatalf("setMetadata %d %v", code, m)
	}
	if got := seenNow(); !strings.HasSuffix(got, "\nvm-1: mayfly:ssh-ed25519 AAAA2 mayfly") {
		t.Errorf("OnMetadata after setMetadata saw %q", got)
	}
	// A failed call is not reported.
	c.do("POST", base+"/zones/us-east1-b/instances/vm-1/setMetadata", `{"fingerprint": "stale"}`)
	c.do("POST", base+"/zones/us-east1-b/instances", instanceJSON("vm-1", md))
	if n := strings.Count(seenNow(), "\n") + 1; n != 2 {
		t.Errorf("OnMetadata called %d times, want 2 (failed calls are not reported)", n)
	}

	_, ga, _ := c.do("GET", base+"/zones/us-east1-b/instances/vm-1/getGuestAttributes?queryPath=hostkeys/", "")
	items := ga["queryValue"].(map[string]any)["items"].([]any)
	if len(items) != 1 {
		t.Fatalf("host keys published: %v, want only the given ed25519 key", items)
	}
	it := items[0].(map[string]any)
	if it["key"] != ssh.KeyAlgoED25519 || ssh.KeyAlgoED25519+" "+it["value"].(string) != hostKey {
		t.Errorf("published %v, want %q", it, hostKey)
	}
	if got := s.HostKey("us-east1-b", "vm-1", ssh.KeyAlgoED25519); got != hostKey {
		t.Errorf("HostKey = %q, want %q", got, hostKey)
	}
}
