package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/config"
	"github.com/mayfly-ci/mayfly/plugins/aws"
	"github.com/mayfly-ci/mayfly/plugins/gce"
	"github.com/mayfly-ci/mayfly/providers"
)

// TestCloudConfigs loads the cloud fleet configs in testdata as mayfly
// verify does, checks their key values, and has each plugin accept its
// plugin_config (Init makes no API call; the endpoint, credentials and key
// file are replaced by local ones so that nothing outside the test is read).
func TestCloudConfigs(t *testing.T) {
	secretFile := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secretFile, []byte("0123456789abcdef0123456789abcdef-test"), 0o600); err != nil {
		t.Fatal(err)
	}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	windowsKeyFile := filepath.Join(t.TempDir(), "windows-key.pem")
	if err := os.WriteFile(windowsKeyFile, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey)}), 0o600); err != nil {
		t.Fatal(err)
	}
	weekday := time.Date(2026, 11, 18, 12, 0, 0, 0, time.UTC) // a Wednesday
	weekend := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC) // a Saturday
	spike := time.Date(2026, 11, 18, 3, 45, 0, 0, time.UTC)   // a weekday, 03:45 UTC
	office := time.Date(2026, 11, 18, 15, 0, 0, 0, time.UTC)  // 10:00 in New York
	evening := time.Date(2026, 11, 19, 1, 0, 0, 0, time.UTC)  // 20:00 in New York
	tests := []struct {
		file, provider, shell, machineKey, machine string
		os, protocol                               string
		minConnect                                 time.Duration
		idle                                       map[time.Time]int
		idleTime                                   time.Duration
		init                                       func(t *testing.T, settings map[string]any) error
	}{
		{
			file: "gce-linux.toml", provider: "gce", shell: "bash", machineKey: "machine_type", machine: "n1-standard-1",
			os: "linux", protocol: "ssh",
			idle:     map[time.Time]int{weekday: 50, weekend: 70, spike: 700},
			idleTime: time.Hour,
			init:     initGCE,
		},
		{
			file: "gce-windows.toml", provider: "gce", shell: "powershell", machineKey: "machine_type", machine: "n1-standard-2",
			os: "windows", protocol: "winrm", minConnect: 10 * time.Minute,
			idle:     map[time.Time]int{weekday: 40, weekend: 10},
			idleTime: 2 * time.Hour,
			init:     initGCE,
		},
		{
			file: "ec2-linux.toml", provider: "aws", shell: "bash", machineKey: "instance_type", machine: "c6i.large",
			os: "linux", protocol: "ssh",
			idle:     map[time.Time]int{office: 25, evening: 10, weekend: 10},
			idleTime: 30 * time.Minute,
			init: func(t *testing.T, s map[string]any) error {
				if _, ok := s["key_secret_file"]; !ok {
					t.Error("ec2-linux.toml: no key_secret_file: a restarted plugin could not log in to its instances")
				}
				s["key_secret_file"] = secretFile
				s["endpoint"] = "http://127.0.0.1:1"
				s["access_key_id"], s["secret_access_key"] = "AKIDTEST", "test-secret"
				return initPlugin(aws.New(aws.Options{}), s)
			},
		},
		{
			file: "ec2-windows.toml", provider: "aws", shell: "powershell", machineKey: "instance_type", machine: "m5.large",
			os: "windows", protocol: "winrm", minConnect: 10 * time.Minute,
			idle:     map[time.Time]int{weekday: 40, weekend: 10},
			idleTime: 2 * time.Hour,
			init: func(t *testing.T, s map[string]any) error {
				if _, ok := s["windows_key_file"]; !ok {
					t.Error("ec2-windows.toml: no windows_key_file: the Administrator password could not be decrypted")
				}
				s["windows_key_file"] = windowsKeyFile
				s["endpoint"] = "http://127.0.0.1:1"
				s["access_key_id"], s["secret_access_key"] = "AKIDTEST", "test-secret"
				return initPlugin(aws.New(aws.Options{}), s)
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.file, func(t *testing.T) {
			cfg, err := config.Load(filepath.Join("..", "..", "testdata", tc.file))
			if err != nil {
				t.Fatal(err)
			}
			if len(cfg.Runners) != 1 {
				t.Fatalf("%d runners, want 1", len(cfg.Runners))
			}
			r := cfg.Runners[0]
			f := r.Fleet
			if f.Block != "runners.autoscaler" || f.Provider != tc.provider {
				t.Errorf("fleet from [%s] with provider %q, want [runners.autoscaler] with %q", f.Block, f.Provider, tc.provider)
			}
			if r.Executor != "instance" || r.Shell != tc.shell {
				t.Errorf("executor %q shell %q, want instance and %q", r.Executor, r.Shell, tc.shell)
			}
			if got := f.ProviderConfig[tc.machineKey]; got != tc.machine {
				t.Errorf("%s = %v, want %s", tc.machineKey, got, tc.machine)
			}
			if f.MaxUses != 1 {
				t.Errorf("max uses %d, want 1 (a VM per job)", f.MaxUses)
			}
			c := f.Connector
			if c.OS != tc.os || c.Protocol != tc.protocol {
				t.Errorf("connector %s/%s, want %s/%s", c.OS, c.Protocol, tc.os, tc.protocol)
			}
			if c.Timeout < tc.minConnect {
				t.Errorf("connector timeout %s, want at least %s", c.Timeout, tc.minConnect)
			}
			if os, _ := f.ProviderConfig["os"].(string); tc.os == "windows" && os != "windows" {
				t.Errorf("plugin_config os = %q, want windows", os)
			}
			for at, want := range tc.idle {
				p, _ := f.Schedule.At(at)
				if p.IdleCount != want || p.IdleTime != tc.idleTime {
					t.Errorf("policy at %s: idle %d for %s, want %d for %s", at.Format(time.RFC3339), p.IdleCount, p.IdleTime, want, tc.idleTime)
				}
			}
			if tc.provider == "aws" {
				subnets, _ := f.ProviderConfig["subnet_ids"].([]any)
				if len(subnets) < 2 || f.ProviderConfig["spot"] != true {
					t.Errorf("subnet_ids %v spot %v: want subnets in several zones and spot", subnets, f.ProviderConfig["spot"])
				}
			}
			settings := map[string]any{}
			for k, v := range f.ProviderConfig {
				settings[k] = v
			}
			if err := tc.init(t, settings); err != nil {
				t.Errorf("the %s plugin rejects plugin_config: %v", tc.provider, err)
			}
		})
	}
}

func initGCE(t *testing.T, s map[string]any) error {
	s["endpoint"] = "http://127.0.0.1:1"
	s["without_authentication"] = true
	return initPlugin(gce.New(gce.Options{Logger: slog.New(slog.DiscardHandler)}), s)
}

func initPlugin(p providers.Provider, settings map[string]any) error {
	raw, err := json.Marshal(settings)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = p.Init(ctx, raw)
	return err
}
