package qemu

import (
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/plugins/qemu/qemuvm"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/provisioner/image"
)

func TestParseSettings(t *testing.T) {
	dir := t.TempDir()
	kernel, initrd, disk := filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initrd.gz"), filepath.Join(dir, "disk.img")
	for _, p := range []string{kernel, initrd, disk} {
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
		{"bad egress", with("egress", "bridged"), "egress"},
		{"egress and its old name agree", with("egress", "open", "network", "open"), ""},
		{"egress and its old name disagree", with("egress", "open", "network", "isolated"), "network"},
		{"egress allow", with("egress_allow", []string{"127.0.0.1:8929", "[::1]:5000", "192.0.2.7:443"}), ""},
		{"egress allow with open egress", with("egress", "open", "egress_allow", []string{"127.0.0.1:8929"}), ""},
		{"egress allow without port", with("egress_allow", []string{"127.0.0.1"}), "egress_allow"},
		{"egress allow host name", with("egress_allow", []string{"localhost:8929"}), "egress_allow"},
		{"egress allow port 0", with("egress_allow", []string{"127.0.0.1:0"}), "egress_allow"},
		{"egress allow unspecified", with("egress_allow", []string{"0.0.0.0:80"}), "egress_allow"},
		{"egress allow same port twice", with("egress_allow", []string{"127.0.0.1:80", "127.0.0.2:80"}), "egress_allow"},
		{"egress allow not a list", with("egress_allow", "127.0.0.1:80"), "egress_allow"},
		{"bad image", with("image", "ubuntu"), "image"},
		{"debian image prebuilt", with("image", "debian", "disk", disk), ""},
		{"debian image without its disk", with("image", "debian"), "disk"},
		{"disk of a busybox image", with("disk", disk), "disk"},
		{"disk without kernel", with("kernel", nil, "initrd", nil, "disk", disk), "disk"},
		{"missing disk", with("image", "debian-docker", "disk", filepath.Join(dir, "nope")), "disk"},
		{"no qemu-img", with("image", "debian", "disk", disk, "qemu_img", filepath.Join(dir, "no-qemu-img")), "qemu_img"},
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
	if c.profile != image.ProfileBusybox || c.Image != "busybox" || c.network != qemuvm.NetworkIsolated || len(c.allow) != 0 {
		t.Errorf("defaults: image %q, network %v, allow %v", c.Image, c.network, c.allow)
	}
	// Per-profile memory defaults; the old key name still works.
	for profile, mem := range map[string]int{"debian": 512, "debian-docker": 1024} {
		c, err := parseSettings(with("image", profile, "disk", disk, "network", "open"))
		if err != nil {
			t.Fatal(err)
		}
		if c.MemoryMB != mem || c.network != qemuvm.NetworkOpen || c.Egress != "open" {
			t.Errorf("image %s: memory_mb %d, network %v, egress %q; want %d MB, open", profile, c.MemoryMB, c.network, c.Egress, mem)
		}
	}
	c, err = parseSettings(with("egress_allow", []string{"127.0.0.1:8929", "[::ffff:127.0.0.2]:5000"}))
	if err != nil {
		t.Fatal(err)
	}
	if want := []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:8929"), netip.MustParseAddrPort("127.0.0.2:5000")}; !slices.Equal(c.allow, want) {
		t.Errorf("egress_allow parsed to %v, want %v", c.allow, want)
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
