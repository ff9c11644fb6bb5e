package deploy

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// unit is a systemd unit file: section -> key -> values in order.
type unit map[string]map[string][]string

func parseUnit(r io.Reader) (unit, error) {
	u := unit{}
	section := ""
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			if u[section] == nil {
				u[section] = map[string][]string{}
			}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				return nil, fmt.Errorf("line %d: want key=value inside a [section]: %q", n, line)
			}
			k = strings.TrimSpace(k)
			u[section][k] = append(u[section][k], strings.TrimSpace(v))
		}
	}
	return u, sc.Err()
}

// last returns the value in force for key (the last assignment).
func (u unit) last(section, key string) string {
	v := u[section][key]
	if len(v) == 0 {
		return ""
	}
	return v[len(v)-1]
}

func loadUnit(t *testing.T) unit {
	t.Helper()
	f, err := os.Open("systemd/mayfly.service")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u, err := parseUnit(f)
	if err != nil {
		t.Fatalf("systemd/mayfly.service: %v", err)
	}
	return u
}

// unitSeconds parses a systemd time span in plain seconds or with units
// ("3h 5min").
func unitSeconds(s string) (time.Duration, error) {
	if n, err := strconv.Atoi(s); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	r := strings.NewReplacer("min", "m", " ", "")
	return time.ParseDuration(r.Replace(s))
}

func TestSystemdUnit(t *testing.T) {
	u := loadUnit(t)
	svc := "Service"
	if got := u.last(svc, "ExecStart"); !strings.HasPrefix(got, "/usr/local/bin/mayfly run --config /etc/mayfly/config.toml") {
		t.Errorf("ExecStart = %q", got)
	}
	want := map[string]string{
		"KillSignal":      "SIGQUIT", // drain, not abort
		"KillMode":        "mixed",   // SIGQUIT to mayfly only, not to plugins and VMs
		"NoNewPrivileges": "yes",
		"ProtectSystem":   "strict",
		"DeviceAllow":     "/dev/kvm rw",
	}
	for k, v := range want {
		if got := u.last(svc, k); got != v {
			t.Errorf("%s = %q, want %q", k, got, v)
		}
	}
	stop, err := unitSeconds(u.last(svc, "TimeoutStopSec"))
	if err != nil {
		t.Fatalf("TimeoutStopSec: %v", err)
	}
	if stop < hostedJobCap || stop > hostedJobCap+15*time.Minute {
		t.Errorf("TimeoutStopSec = %v, want the 3 h job cap plus a few minutes", stop)
	}
	if !strings.Contains(u.last(svc, "SupplementaryGroups"), "kvm") {
		t.Error("SupplementaryGroups lacks kvm: the qemu plugin could not open /dev/kvm")
	}
	// Options that would break qemu/KVM.
	for k, bad := range map[string]string{"PrivateDevices": "yes", "MemoryDenyWriteExecute": "yes", "PrivateUsers": "yes"} {
		if u.last(svc, k) == bad {
			t.Errorf("%s=%s breaks the qemu plugin", k, bad)
		}
	}

	t.Run("systemd-analyze", func(t *testing.T) {
		sa := requireTool(t, "systemd-analyze")
		// verify wants ExecStart to exist: point it at this test binary.
		exe, err := os.Executable()
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile("systemd/mayfly.service")
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(t.TempDir(), "mayfly.service")
		if err := os.WriteFile(path, bytes.ReplaceAll(b, []byte("/usr/local/bin/mayfly"), []byte(exe)), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := run(t, ".", sa, "verify", path)
		for _, line := range strings.Split(out, "\n") {
			if strings.Contains(line, "mayfly.service") {
				t.Errorf("systemd-analyze verify: %s", line)
			}
		}
		if err != nil {
			t.Errorf("systemd-analyze verify: %v\n%s", err, out)
		}
	})
}
