package gcefake

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"encoding/base64"
	"encoding/json"
	"math/big"
	"strings"
	"testing"
	"time"
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
