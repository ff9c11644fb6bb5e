package qemu

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
)

func TestParseSettings(t *testing.T) {
	dir := t.TempDir()
	kernel, initrd := filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initrd.gz")
	for _, p := range []string{kernel, initrd} {
		if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// /bin/true stands for qemu: parseSettings only looks the binary up.
	base := map[string]any{"state_dir": filepath.Join(dir, "state"), "kernel": kernel, "initrd": initrd, "qemu": "/bin/true"}
	with := func(kv ...any) json.RawMessage {
		m := map[string]any{}
		for k, v := range base {
			m[k] = v
		}
		for i := 0; i < len(kv); i += 2 {
			if kv[i+1] == nil {
				delete(m, kv[i].(string))
			} else {
				m[kv[i].(string)] = kv[i+1]
			}
		}
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	tests := []struct {
		name     string
		settings json.RawMessage
		wantKey  string // the key the error must name; "" for success
	}{
		{"defaults", with(), ""},
		{"all set", with("group", "linux-1", "memory_mb", 512, "cpus", 2, "boot_timeout", "90s",
			"network", "open", "accel", "tcg", "max_instances", 3), ""},
		{"unknown key", with("memroy_mb", 512), "memroy_mb"},
		{"wrong type", with("memory_mb", "lots"), "memory_mb"},
		{"bad duration", with("boot_timeout", "soon"), "boot_timeout"},
		{"negative duration", with("boot_timeout", "-1s"), "boot_timeout"},
		{"tiny memory", with("memory_mb", 16), "memory_mb"},
		{"too many cpus", with("cpus", 65), "cpus"},
		{"negative cpus", with("cpus", -1), "cpus"},
		{"bad network", with("network", "bridged"), "network"},
		{"bad accel", with("accel", "hvf"), "accel"},
		{"negative max", with("max_instances", -1), "max_instances"},
		{"bad group", with("group", "../x"), "group"},
		{"kernel without initrd", with("initrd", nil), "kernel"},
		{"kernel and cache dir", with("image_cache_dir", dir), "kernel"},
		{"missing kernel", with("kernel", filepath.Join(dir, "nope")), "kernel"},
		{"missing initrd", with("initrd", filepath.Join(dir, "nope")), "initrd"},
		{"comma in state dir", with("state_dir", dir+"/a,b"), "state_dir"},
		{"no qemu", with("qemu", filepath.Join(dir, "no-qemu")), "qemu"},
		{"not an object", json.RawMessage(`[1]`), ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := parseSettings(tt.settings)
			if tt.name == "not an object" {
				if err == nil || providers.KindOf(err) != providers.KindInvalidArgument {
					t.Fatalf("err = %v, want invalid_argument", err)
				}
				return
			}
			if tt.wantKey == "" {
				if err != nil {
					t.Fatalf("parseSettings(%s): %v", tt.settings, err)
				}
				return
			}
			if err == nil {
				t.Fatalf("parseSettings(%s) succeeded, want an error naming %q", tt.settings, tt.wantKey)
			}
			if !strings.Contains(err.Error(), `"`+tt.wantKey+`"`) {
				t.Errorf("error %q does not name key %q", err, tt.wantKey)
			}
			if providers.KindOf(err) != providers.KindInvalidArgument {
				t.Errorf("error %q has kind %s, want invalid_argument", err, providers.KindOf(err))
			}
			_ = c
		})
	}

	c, err := parseSettings(with())
	if err != nil {
		t.Fatal(err)
	}
	if c.Group != DefaultGroup || c.MemoryMB != DefaultMemoryMB || c.CPUs != DefaultCPUs ||
		time.Duration(c.BootTimeout) != DefaultBootTimeout || c.Network != "isolated" || c.Accel != "auto" ||
		c.groupDir != filepath.Join(dir, "state", DefaultGroup) {
		t.Errorf("defaults: %+v", c)
	}
	if c.accel != "kvm" && c.accel != "tcg" {
		t.Errorf("auto accel resolved to %q", c.accel)
	}
	c, err = parseSettings(with("kernel", nil, "initrd", nil, "state_dir", nil))
	if err != nil {
		t.Fatal(err)
	}
	cache, _ := os.UserCacheDir()
	if c.StateDir != filepath.Join(cache, "mayfly", "qemu") || c.ImageCacheDir != filepath.Join(cache, "mayfly") {
		t.Errorf("default dirs: state %q, image cache %q", c.StateDir, c.ImageCacheDir)
	}
}

func TestIDs(t *testing.T) {
	seen := map[string]bool{}
	for range 50 {
		id, key, err := newInstanceKey()
		if err != nil {
			t.Fatal(err)
		}
		if !idRE.MatchString(id) || seen[id] {
			t.Fatalf("id %q invalid or repeated", id)
		}
		seen[id] = true
		if !strings.Contains(string(key.pem), "OPENSSH PRIVATE KEY") || key.pub == nil {
			t.Fatalf("key for %s: %q", id, key.pem)
		}
	}
	for _, bad := range []string{"", "mayfly-", "../etc", "mayfly-0123456789ab/..", "mayfly-0123456789AB", "x-0123456789ab"} {
		if idRE.MatchString(bad) {
			t.Errorf("idRE accepts %q", bad)
		}
	}
}
