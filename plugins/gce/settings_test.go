package gce

import (
	"encoding/json"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
)

func TestDecodeSettingsDefaults(t *testing.T) {
	s, err := decodeSettings(json.RawMessage(`{"project": "my-project", "zones": ["us-east1-b", "us-east1-c"]}`), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"machine_type", s.MachineType, "n1-standard-1"},
		{"image", s.sourceImage(), "projects/debian-cloud/global/images/family/debian-12"},
		{"os", s.OS, "linux"},
		{"arch", s.Arch, "amd64"},
		{"username", s.Username, "mayfly"},
		{"name_prefix", s.NamePrefix, "mayfly"},
		{"network", s.networkPath(), "global/networks/default"},
		{"rate_limit.rate", s.RateLimit.Rate, 5.0},
		{"rate_limit.burst", s.RateLimit.Burst, 10},
		{"rate_limit.throttle_backoff", time.Duration(s.RateLimit.ThrottleBackoff), 10 * time.Second},
		{"rate_limit.max_throttle_backoff", time.Duration(s.RateLimit.MaxThrottleBackoff), 5 * time.Minute},
		{"capacity_cooldown", time.Duration(s.CapacityCooldown), 5 * time.Minute},
		{"external_ip", *s.ExternalIP, true},
		{"list_page_size", s.ListPageSize, 500},
		{"operation_timeout", time.Duration(s.OperationTimeout), 5 * time.Minute},
		{"use_external_ip", *s.UseExternalIP, true},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}

	w, err := decodeSettings(json.RawMessage(`{"project": "my-project", "zones": ["us-east1-b"], "os": "windows",
		"subnetwork": "runners", "external_ip": false}`), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if got := w.sourceImage(); got != "projects/windows-cloud/global/images/family/windows-2022" {
		t.Errorf("windows image = %q", got)
	}
	if got := w.subnetworkPath("us-east1-b"); got != "regions/us-east1/subnetworks/runners" {
		t.Errorf("subnetwork = %q", got)
	}
	if *w.UseExternalIP {
		t.Error("external_ip false does not imply use_external_ip false")
	}
}

func TestDecodeSettingsErrorsNameTheKey(t *testing.T) {
	base := `"project": "my-project", "zones": ["us-east1-b"]`
	tests := []struct {
		json string
		key  string
	}{
		{`{"zones": ["us-east1-b"]}`, `"project"`},
		{`{"project": "my-project"}`, `"zones"`},
		{`{"project": "My Project", "zones": ["us-east1-b"]}`, `"project"`},
		{`{"project": "my-project", "zones": ["us-east1"]}`, `"zones"`},
		{`{"project": "my-project", "zones": ["us-east1-b", "us-east1-b"]}`, `"zones"`},
		{`{` + base + `, "machine_type": "N1 Standard"}`, `"machine_type"`},
		{`{` + base + `, "image": "x", "image_family": "y", "image_project": "z"}`, `"image"`},
		{`{` + base + `, "image_family": "y"}`, `"image_project"`},
		{`{` + base + `, "disk_size_gb": -1}`, `"disk_size_gb"`},
		{`{` + base + `, "disk_type": "PD SSD"}`, `"disk_type"`},
		{`{` + base + `, "network_tags": ["Bad_Tag"]}`, `"network_tags"`},
		{`{` + base + `, "service_account": "nobody"}`, `"service_account"`},
		{`{` + base + `, "preemptible": true, "spot": true}`, `"spot"`},
		{`{` + base + `, "service_account_scopes": ["compute"]}`, `"service_account_scopes"`},
		{`{` + base + `, "name_prefix": "9lives"}`, `"name_prefix"`},
		{`{` + base + `, "os": "plan9"}`, `"os"`},
		{`{` + base + `, "arch": "riscv64"}`, `"arch"`},
		{`{` + base + `, "username": "Root User"}`, `"username"`},
		{`{` + base + `, "os": "windows", "username": "a-very-long-windows-user"}`, `"username"`},
		{`{` + base + `, "endpoint": "127.0.0.1:80"}`, `"endpoint"`},
		{`{` + base + `, "rate_limit": -1}`, `"rate_limit"`},
		{`{` + base + `, "list_page_size": 501}`, `"list_page_size"`},
		{`{` + base + `, "operation_timeout": "soon"}`, `"operation_timeout"`},
		{`{` + base + `, "zone": "us-east1-b"}`, `"zone"`},
		{`{` + base + `, "rate_burst": "ten"}`, `"rate_burst"`},
		{`{` + base + `, "rate_limit": {"burst": 0.5}}`, `rate_limit`},
		{`{` + base + `, "rate_limit": {"throttle_backoff": "1m", "max_throttle_backoff": "1s"}}`, `"rate_limit"`},
		{`{` + base + `, "zone_cooldown": "1m", "capacity_cooldown": "2m"}`, `"zone_cooldown"`},
		{`{` + base + `, "no_external_ip": "yes"}`, `"no_external_ip"`},
	}
	for _, tt := range tests {
		_, err := decodeSettings(json.RawMessage(tt.json), slog.New(slog.DiscardHandler))
		if err == nil {
			t.Errorf("decodeSettings(%s) succeeded", tt.json)
			continue
		}
		if !strings.Contains(err.Error(), tt.key) {
			t.Errorf("decodeSettings(%s) error %q does not name %s", tt.json, err, tt.key)
		}
		if providers.KindOf(err) != providers.KindInvalidArgument {
			t.Errorf("decodeSettings(%s) error kind %s, want invalid_argument", tt.json, providers.KindOf(err))
		}
	}
}

// TestDockerMachineOptions decodes the MachineOptions of the hosted GCP
// Linux fleet's config (testdata/hosted-gcp-linux.toml), as mayfly passes
// them: option name to string value, "true" for bare flags.
func TestDockerMachineOptions(t *testing.T) {
	raw := json.RawMessage(`{
		"google-project": "gitlab-ci-runners",
		"google-zone": "us-east1-c",
		"google-machine-type": "n1-standard-1",
		"google-disk-size": "25",
		"google-disk-type": "pd-standard",
		"google-machine-image": "projects/cos-cloud/global/images/family/cos-stable",
		"google-tags": "gitlab-com,srm",
		"google-use-internal-ip": "true",
		"google-preemptible": "true",
		"engine-registry-mirror": "https://mirror.gcr.io"
	}`)
	s, err := decodeSettings(raw, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if s.Project != "gitlab-ci-runners" || !slices.Equal(s.Zones, []string{"us-east1-c"}) || s.MachineType != "n1-standard-1" ||
		s.DiskSizeGB != 25 || s.DiskType != "pd-standard" || s.sourceImage() != "projects/cos-cloud/global/images/family/cos-stable" ||
		!slices.Equal(s.NetworkTags, []string{"gitlab-com", "srm"}) || *s.UseExternalIP || !*s.ExternalIP || !s.Preemptible {
		t.Errorf("decoded %+v", s)
	}

	for _, tt := range []struct{ opts, want string }{
		{`{"google-machine-image": "https://www.googleapis.com/compute/v1/projects/ubuntu-os-cloud/global/images/family/ubuntu-2204-lts"}`,
			"projects/ubuntu-os-cloud/global/images/family/ubuntu-2204-lts"},
		{`{"google-machine-image": "ubuntu-os-cloud/global/images/ubuntu-2204-jammy-v20240110"}`,
			"projects/ubuntu-os-cloud/global/images/ubuntu-2204-jammy-v20240110"},
	} {
		raw := json.RawMessage(strings.Replace(tt.opts, "{", `{"google-project": "p-1234", "google-zone": "us-east1-b", `, 1))
		s, err := decodeSettings(raw, slog.New(slog.DiscardHandler))
		if err != nil || s.sourceImage() != tt.want {
			t.Errorf("%s: image %q, %v; want %q", tt.opts, s.sourceImage(), err, tt.want)
		}
	}

	for _, tt := range []struct{ opts, key string }{
		{`{"google-project": "p-1234", "google-zone": "us-east1-b", "google-open-port": "22"}`, `"google-open-port"`},
		{`{"google-project": "p-1234", "google-zone": "us-east1-b", "google-disk-size": "big"}`, `"google-disk-size"`},
		{`{"google-project": "p-1234", "google-zone": "us-east1-b", "google-preemptible": true}`, `"google-preemptible"`},
		{`{"google-project": "p-1234", "google-zone": "us-east1-b", "zones": ["us-east1-c"]}`, `"google-zone"`},
		{`{"google-project": "p-1234", "google-zone": "us-east1"}`, `"zones"`},
	} {
		_, err := decodeSettings(json.RawMessage(tt.opts), slog.New(slog.DiscardHandler))
		if err == nil || !strings.Contains(err.Error(), tt.key) || providers.KindOf(err) != providers.KindInvalidArgument {
			t.Errorf("%s: %v, want an invalid_argument error naming %s", tt.opts, err, tt.key)
		}
	}
}

// TestDeprecatedKeys: the keys renamed so that the cloud plugins name alike
// what means the same are still read, each with a deprecation warning,
// and mean what they meant.
func TestDeprecatedKeys(t *testing.T) {
	base := `"project": "my-project", "zones": ["us-east1-b"]`
	tests := []struct {
		old, new string
		check    func(Settings) bool
	}{
		{`"rate_limit": 7, "rate_burst": 3, "throttle_backoff": "2s"`, `"rate_limit": {"rate": 7, "burst": 3, "throttle_backoff": "2s"}`,
			func(s Settings) bool {
				return s.RateLimit.Rate == 7 && s.RateLimit.Burst == 3 && time.Duration(s.RateLimit.ThrottleBackoff) == 2*time.Second
			}},
		{`"zone_cooldown": "90s"`, `"capacity_cooldown": "90s"`,
			func(s Settings) bool { return time.Duration(s.CapacityCooldown) == 90*time.Second }},
		{`"no_external_ip": true`, `"external_ip": false`,
			func(s Settings) bool { return !*s.ExternalIP && !*s.UseExternalIP }},
		{`"use_internal_ip": true`, `"use_external_ip": false`,
			func(s Settings) bool { return *s.ExternalIP && !*s.UseExternalIP }},
		{`"use_internal_ip": false`, `"use_external_ip": true`,
			func(s Settings) bool { return *s.ExternalIP && *s.UseExternalIP }},
	}
	for _, tt := range tests {
		var logs strings.Builder
		old, err := decodeSettings(json.RawMessage(`{`+base+`, `+tt.old+`}`), slog.New(slog.NewTextHandler(&logs, nil)))
		if err != nil {
			t.Errorf("old keys %s: %v", tt.old, err)
			continue
		}
		if !tt.check(old) {
			t.Errorf("old keys %s decoded to %+v", tt.old, old)
		}
		if !strings.Contains(logs.String(), "deprecated settings key") {
			t.Errorf("old keys %s: no deprecation warning in %q", tt.old, logs.String())
		}
		logs.Reset()
		cur, err := decodeSettings(json.RawMessage(`{`+base+`, `+tt.new+`}`), slog.New(slog.NewTextHandler(&logs, nil)))
		if err != nil || !tt.check(cur) {
			t.Errorf("new keys %s: %+v, %v", tt.new, cur, err)
		}
		if strings.Contains(logs.String(), "deprecated") {
			t.Errorf("new keys %s warned: %q", tt.new, logs.String())
		}
	}
}
