package aws

import (
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
)

func TestParseSettingsErrors(t *testing.T) {
	base := `"region":"us-east-1","ami":"ami-0123456789abcdef0","instance_type":"t3.micro"`
	tests := []struct {
		json string
		key  string
	}{
		{`{"ami":"ami-0123456789abcdef0","instance_type":"t3.micro"}`, `"region"`},
		{`{"region":"moon-1"` + `,"ami":"ami-0123456789abcdef0","instance_type":"t3.micro"}`, `"region"`},
		{`{"region":"us-east-1","instance_type":"t3.micro"}`, `"ami"`},
		{`{"region":"us-east-1","ami":"ami-0123456789abcdef0"}`, `"instance_type"`},
		{`{` + base + `,"colour":"red"}`, `"colour"`},
		{`{` + base + `,"subnet_ids":"subnet-0aaaaaaaaaaaaaaaa"}`, `"subnet_ids"`},
		{`{` + base + `,"subnet_ids":["subnet-1"]}`, `"subnet_ids"`},
		{`{` + base + `,"subnet_ids":["subnet-0aaaaaaaaaaaaaaaa","subnet-0aaaaaaaaaaaaaaaa"]}`, `"subnet_ids"`},
		{`{` + base + `,"security_group_ids":["default"]}`, `"security_group_ids"`},
		{`{` + base + `,"endpoint":"localhost:80"}`, `"endpoint"`},
		{`{` + base + `,"access_key_id":"AKID"}`, `"access_key_id"`},
		{`{` + base + `,"spot_max_price":"0.1"}`, `"spot_max_price"`},
		{`{` + base + `,"spot":true,"spot_max_price":"cheap"}`, `"spot_max_price"`},
		{`{` + base + `,"os":"plan9"}`, `"os"`},
		{`{` + base + `,"user_data":"echo hi"}`, `"user_data"`},
		{`{` + base + `,"page_size":3}`, `"page_size"`},
		{`{` + base + `,"name_prefix":"bad prefix"}`, `"name_prefix"`},
		{`{` + base + `,"windows_key_file":"/k.pem"}`, `"windows_key_file"`},
		{`{` + base + `,"cache_ttl":"soon"}`, `"cache_ttl"`},
		{`{` + base + `,"rate_limit":{"throttle_backoff":"2m","max_throttle_backoff":"1m"}}`, `"rate_limit"`},
		{`{"region":"us-east-1","launch_template":{}}`, `"launch_template"`},
		{`{"region":"us-east-1","launch_template":{"id":"lt-0123456789abcdef0","name":"x"}}`, `"launch_template"`},
		{`{"region":"us-east-1","launch_template":{"name":"x","version":"newest"}}`, `"launch_template"`},
		{`{` + base + `,"manager":"` + strings.Repeat("m", 300) + `"}`, `"manager"`},
		{`{` + base + `,"os":"windows","user_data":"version: 1.0\ntasks:\n- task: executeScript"}`, `"user_data"`},
		{`{` + base + `,"os":"windows","user_data":"<powershell>Write-Output hi"}`, `"user_data"`},
		{`{` + base + `,"os":"windows","user_data":"` + strings.Repeat("#", 10<<10+1) + `"}`, `"user_data"`},
		{`{` + base + `,"user_data":"#!/bin/sh` + strings.Repeat("#", 12<<10) + `"}`, `"user_data"`},
	}
	for _, tt := range tests {
		_, err := parseSettings(json.RawMessage(tt.json), nil)
		if err == nil {
			t.Errorf("parseSettings(%s) succeeded, want an error naming %s", tt.json, tt.key)
			continue
		}
		if !strings.Contains(err.Error(), tt.key) {
			t.Errorf("parseSettings(%s) = %q, want it to name %s", tt.json, err, tt.key)
		}
		if providers.KindOf(err) != providers.KindInvalidArgument {
			t.Errorf("parseSettings(%s) error kind %s, want invalid_argument", tt.json, providers.KindOf(err))
		}
	}
}

func TestParseSettingsDefaults(t *testing.T) {
	c, err := parseSettings(json.RawMessage(`{"region":"eu-west-1","launch_template":{"name":"runners"}}`), nil)
	if err != nil {
		t.Fatal(err)
	}
	switch {
	case c.os != "linux", c.Username != "ec2-user", c.NamePrefix != "mayfly", c.PageSize != 1000,
		c.CreateConcurrency != 4, !c.hostKeyFromConsole, c.cacheTTL != 10*time.Second,
		c.capacityCooldown != time.Minute, c.apiTimeout != 30*time.Second:
		t.Errorf("defaults: %+v", c)
	}
	r := c.RateLimit
	if r.DescribeRate != 10 || r.DescribeBurst != 50 || r.MutatingRate != 2.5 || r.MutatingBurst != 25 ||
		r.LaunchRate != 1 || r.LaunchBurst != 500 || time.Duration(r.ThrottleBackoff) != time.Second {
		t.Errorf("rate limit defaults: %+v", r)
	}
	w, err := parseSettings(json.RawMessage(`{"region":"eu-west-1","ami":"ami-0123456789abcdef0","instance_type":"m5.large","os":"windows","cache_ttl":"0s"}`), nil)
	if err != nil {
		t.Fatal(err)
	}
	if w.Username != "Administrator" || w.cacheTTL != 0 {
		t.Errorf("windows defaults: user %q cache %s", w.Username, w.cacheTTL)
	}
}

func TestKeySecretFile(t *testing.T) {
	dir := t.TempDir()
	short := filepath.Join(dir, "short")
	good := filepath.Join(dir, "good")
	if err := os.WriteFile(short, []byte("tiny"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(good, []byte(strings.Repeat("s", 40)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := newSSHKeys(short); err == nil || !strings.Contains(err.Error(), "key_secret_file") {
		t.Errorf("short secret: %v", err)
	}
	if _, err := newSSHKeys(filepath.Join(dir, "missing")); err == nil || !strings.Contains(err.Error(), "key_secret_file") {
		t.Errorf("missing secret: %v", err)
	}
	a, err := newSSHKeys(good)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := newSSHKeys(good)
	r, _ := newSSHKeys("")
	if a.id != b.id || a.id == r.id {
		t.Errorf("key ids: file %s/%s, random %s", a.id, b.id, r.id)
	}
	n1, n2 := newNonce(), newNonce()
	k1, _ := a.authorizedKey(n1)
	k1b, _ := b.authorizedKey(n1)
	k2, _ := a.authorizedKey(n2)
	kr, _ := r.authorizedKey(n1)
	if k1 != k1b || k1 == k2 || k1 == kr {
		t.Errorf("derived keys: same secret+nonce equal %t, other nonce differs %t, other secret differs %t", k1 == k1b, k1 != k2, k1 != kr)
	}
}

// TestDeprecatedKeys: use_public_ip, renamed use_external_ip as in the gce
// plugin, is still read, with a deprecation warning.
func TestDeprecatedKeys(t *testing.T) {
	base := `"region":"us-east-1","ami":"ami-0123456789abcdef0","instance_type":"t3.micro"`
	var logs strings.Builder
	c, err := parseSettings(json.RawMessage(`{`+base+`,"use_public_ip":true}`), slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil || !c.UseExternalIP {
		t.Errorf("use_public_ip: %+v, %v; want use_external_ip set", c.Settings, err)
	}
	if !strings.Contains(logs.String(), "deprecated settings key") || !strings.Contains(logs.String(), "use_public_ip") {
		t.Errorf("no deprecation warning naming use_public_ip: %q", logs.String())
	}
	_, err = parseSettings(json.RawMessage(`{`+base+`,"use_public_ip":true,"use_external_ip":false}`), nil)
	if err == nil || !strings.Contains(err.Error(), "use_public_ip") || providers.KindOf(err) != providers.KindInvalidArgument {
		t.Errorf("both names: %v, want an invalid_argument error naming use_public_ip", err)
	}
}
