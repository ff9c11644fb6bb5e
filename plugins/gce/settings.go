package gce

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
)

// Settings are the plugin's settings, a JSON object decoded strictly
// (unknown keys are errors).
type Settings struct {
	// Project is the GCP project id. Required.
	Project string `json:"project"`
	// Zones are tried in order; a zone out of capacity is skipped for
	// ZoneCooldown. Required.
	Zones []string `json:"zones"`
	// MachineType is the machine type name (default n1-standard-1).
	MachineType string `json:"machine_type"`
	// Image is a boot image URL or path ("projects/p/global/images/i").
	// Exclusive with ImageFamily.
	Image string `json:"image"`
	// ImageFamily and ImageProject name the newest image of a family.
	// Default: debian-12 from debian-cloud (linux), windows-2022 from
	// windows-cloud (windows).
	ImageFamily  string `json:"image_family"`
	ImageProject string `json:"image_project"`
	// DiskSizeGB is the boot disk size (0: the image's size).
	DiskSizeGB int64 `json:"disk_size_gb"`
	// DiskType is the boot disk type name, e.g. pd-balanced (default: the
	// GCE default).
	DiskType string `json:"disk_type"`
	// Network and Subnetwork are names or paths (default network "default").
	Network    string `json:"network"`
	Subnetwork string `json:"subnetwork"`
	// NetworkTags are the instance's network tags (firewall rules).
	NetworkTags []string `json:"network_tags"`
	// ServiceAccount is the email of the service account the instance runs
	// as; empty means none.
	ServiceAccount string `json:"service_account"`
	// ServiceAccountScopes are the OAuth scopes of ServiceAccount (default
	// cloud-platform); short names get the googleapis prefix.
	ServiceAccountScopes []string `json:"service_account_scopes"`
	// Preemptible and Spot pick the provisioning model (at most one).
	Preemptible bool `json:"preemptible"`
	Spot        bool `json:"spot"`
	// NoExternalIP leaves the instance without an external address.
	NoExternalIP bool `json:"no_external_ip"`
	// UseInternalIP makes ConnectInfo return the internal address even when
	// the instance has an external one (implied by NoExternalIP).
	UseInternalIP bool `json:"use_internal_ip"`
	// NamePrefix starts every instance name (default "mayfly").
	NamePrefix string `json:"name_prefix"`
	// OS is "linux" (SSH, default) or "windows" (WinRM over HTTPS).
	OS string `json:"os"`
	// Arch is the GOARCH of the machine type (default amd64).
	Arch string `json:"arch"`
	// Username is the login user (default "mayfly").
	Username string `json:"username"`
	// StartupScript runs at boot (metadata startup-script, or
	// windows-startup-script-ps1 on Windows, after mayfly's script that sets
	// up WinRM over HTTPS and publishes its certificate).
	StartupScript string `json:"startup_script"`
	// Manager, if set, restricts List to instances whose mayfly-manager
	// label is this value, and Create refuses other values.
	Manager string `json:"manager"`
	// MaxSize is reported in Info (0: no limit of the plugin's own).
	MaxSize int `json:"max_size"`
	// Endpoint overrides the Compute API endpoint (tests, private
	// endpoints).
	Endpoint string `json:"endpoint"`
	// CredentialsFile is a service-account key file; empty means
	// Application Default Credentials.
	CredentialsFile string `json:"credentials_file"`
	// WithoutAuthentication sends requests without credentials (for a
	// test endpoint only).
	WithoutAuthentication bool `json:"without_authentication"`
	// RateLimit (requests/s) and RateBurst bound every API request the
	// plugin makes (defaults 5 and 10: a fifth of GCE's default 1,500
	// requests/min per project and quota group).
	RateLimit float64 `json:"rate_limit"`
	RateBurst int     `json:"rate_burst"`
	// ThrottleBackoff is how long all calls pause after a rate-limit answer
	// without Retry-After (default 10s).
	ThrottleBackoff providers.Duration `json:"throttle_backoff"`
	// ListPageSize is maxResults of list calls (default 500, GCE's maximum).
	ListPageSize int `json:"list_page_size"`
	// OperationTimeout bounds the wait for a zone operation (default 5m).
	OperationTimeout providers.Duration `json:"operation_timeout"`
	// ZoneCooldown is how long a zone out of capacity is tried last
	// (default 5m).
	ZoneCooldown providers.Duration `json:"zone_cooldown"`
	// PasswordTimeout bounds one ConnectInfo's wait for the Windows
	// password on serial port 4 (default 45s); the caller retries after.
	PasswordTimeout providers.Duration `json:"password_timeout"`
	// PollInterval is the pause between serial port reads (default 10s).
	PollInterval providers.Duration `json:"poll_interval"`
	// CreateConcurrency bounds parallel inserts of one Create (default 8).
	CreateConcurrency int `json:"create_concurrency"`
}

var (
	// GCE resource names: RFC 1035 labels of at most 63 characters.
	nameRE     = regexp.MustCompile(`^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$`)
	prefixRE   = regexp.MustCompile(`^[a-z][-a-z0-9]{0,39}$`)
	projectRE  = regexp.MustCompile(`^[a-z][-a-z0-9.:]{4,62}[a-z0-9]$`)
	zoneRE     = regexp.MustCompile(`^[a-z]+-[a-z]+[0-9]+-[a-z]$`)
	linuxUser  = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}$`)
	windowsUsr = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,19}$`)
	emailRE    = regexp.MustCompile(`^[^@\s]+@[^@\s]+$`)
)

// decodeSettings decodes raw (the plugin's keys, or docker-machine google
// driver options), fills defaults and validates. Errors name the key and
// are of kind invalid_argument.
func decodeSettings(raw json.RawMessage, log *slog.Logger) (Settings, error) {
	var s Settings
	raw, err := fromMachineOptions(raw, log)
	if err != nil {
		return s, err
	}
	if err := providers.DecodeSettings(raw, &s); err != nil {
		return s, err
	}
	s.defaults()
	if err := s.validate(); err != nil {
		return s, providers.InvalidArgument(err)
	}
	return s, nil
}

func (s *Settings) defaults() {
	setString(&s.MachineType, "n1-standard-1")
	setString(&s.NamePrefix, "mayfly")
	setString(&s.OS, "linux")
	setString(&s.Arch, "amd64")
	setString(&s.Username, "mayfly")
	setString(&s.Network, "default")
	if s.Image == "" && s.ImageFamily == "" {
		if s.OS == "windows" {
			s.ImageFamily, s.ImageProject = "windows-2022", "windows-cloud"
		} else {
			s.ImageFamily, s.ImageProject = "debian-12", "debian-cloud"
		}
	}
	if s.RateLimit == 0 {
		s.RateLimit = 5
	}
	if s.RateBurst == 0 {
		s.RateBurst = 10
	}
	setDuration(&s.ThrottleBackoff, 10*time.Second)
	if s.ListPageSize == 0 {
		s.ListPageSize = 500
	}
	setDuration(&s.OperationTimeout, 5*time.Minute)
	setDuration(&s.ZoneCooldown, 5*time.Minute)
	setDuration(&s.PasswordTimeout, 45*time.Second)
	setDuration(&s.PollInterval, 10*time.Second)
	if s.CreateConcurrency == 0 {
		s.CreateConcurrency = 8
	}
	if s.NoExternalIP {
		s.UseInternalIP = true
	}
	if s.ServiceAccount != "" && len(s.ServiceAccountScopes) == 0 {
		s.ServiceAccountScopes = []string{"cloud-platform"}
	}
	for i, sc := range s.ServiceAccountScopes {
		if !strings.Contains(sc, "://") {
			s.ServiceAccountScopes[i] = "https://www.googleapis.com/auth/" + sc
		}
	}
}

func setString(p *string, v string) {
	if *p == "" {
		*p = v
	}
}

func setDuration(p *providers.Duration, v time.Duration) {
	if *p == 0 {
		*p = providers.Duration(v)
	}
}

func (s *Settings) validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("settings key %q: %s", key, fmt.Sprintf(format, args...)))
	}
	if s.Project == "" {
		bad("project", "is required")
	} else if !projectRE.MatchString(s.Project) {
		bad("project", "%q is not a GCP project id", s.Project)
	}
	if len(s.Zones) == 0 {
		bad("zones", "needs at least one zone")
	}
	seen := map[string]bool{}
	for _, z := range s.Zones {
		if !zoneRE.MatchString(z) {
			bad("zones", "%q is not a zone name like us-east1-b", z)
		}
		if seen[z] {
			bad("zones", "zone %q is listed twice", z)
		}
		seen[z] = true
	}
	if !nameRE.MatchString(s.MachineType) {
		bad("machine_type", "%q is not a machine type name", s.MachineType)
	}
	switch {
	case s.Image != "" && s.ImageFamily != "":
		bad("image", "set image or image_family, not both")
	case s.ImageFamily != "" && s.ImageProject == "":
		bad("image_project", "is required with image_family")
	case s.ImageFamily == "" && s.ImageProject != "":
		bad("image_family", "is required with image_project")
	}
	if s.DiskSizeGB < 0 {
		bad("disk_size_gb", "%d is negative", s.DiskSizeGB)
	}
	if s.DiskType != "" && !nameRE.MatchString(s.DiskType) {
		bad("disk_type", "%q is not a disk type name like pd-balanced", s.DiskType)
	}
	for _, tag := range s.NetworkTags {
		if !nameRE.MatchString(tag) {
			bad("network_tags", "%q is not a valid tag (lowercase letters, digits, dashes; at most 63)", tag)
		}
	}
	if s.ServiceAccount != "" && !emailRE.MatchString(s.ServiceAccount) {
		bad("service_account", "%q is not an email address", s.ServiceAccount)
	}
	if len(s.ServiceAccountScopes) > 0 && s.ServiceAccount == "" {
		bad("service_account_scopes", "needs service_account")
	}
	if s.Preemptible && s.Spot {
		bad("spot", "set preemptible or spot, not both")
	}
	if !prefixRE.MatchString(s.NamePrefix) {
		bad("name_prefix", "%q must start with a lowercase letter and hold at most 40 lowercase letters, digits and dashes", s.NamePrefix)
	}
	switch s.OS {
	case "linux":
		if !linuxUser.MatchString(s.Username) {
			bad("username", "%q is not a Linux user name", s.Username)
		}
	case "windows":
		if !windowsUsr.MatchString(s.Username) {
			bad("username", "%q is not a Windows user name (at most 20 letters, digits, _ . -)", s.Username)
		}
	default:
		bad("os", "%q is not linux or windows", s.OS)
	}
	if s.Arch != "amd64" && s.Arch != "arm64" {
		bad("arch", "%q is not amd64 or arm64", s.Arch)
	}
	if s.Endpoint != "" && !strings.HasPrefix(s.Endpoint, "http://") && !strings.HasPrefix(s.Endpoint, "https://") {
		bad("endpoint", "%q is not an http(s) URL", s.Endpoint)
	}
	if s.WithoutAuthentication && s.Endpoint == "" {
		bad("without_authentication", "is only allowed with endpoint (a test server)")
	}
	if s.WithoutAuthentication && s.CredentialsFile != "" {
		bad("credentials_file", "conflicts with without_authentication")
	}
	if s.RateLimit < 0 {
		bad("rate_limit", "%g is negative", s.RateLimit)
	}
	if s.RateBurst < 1 {
		bad("rate_burst", "%d must be at least 1", s.RateBurst)
	}
	if s.ListPageSize < 1 || s.ListPageSize > 500 {
		bad("list_page_size", "%d is not within 1-500", s.ListPageSize)
	}
	if s.MaxSize < 0 {
		bad("max_size", "%d is negative", s.MaxSize)
	}
	if s.CreateConcurrency < 1 {
		bad("create_concurrency", "%d must be at least 1", s.CreateConcurrency)
	}
	return errors.Join(errs...)
}

// region returns the region of zone ("us-east1" of "us-east1-b").
func region(zone string) string {
	if i := strings.LastIndexByte(zone, '-'); i > 0 {
		return zone[:i]
	}
	return zone
}

// sourceImage returns the boot image path of the settings.
func (s *Settings) sourceImage() string {
	if s.Image != "" {
		return s.Image
	}
	return fmt.Sprintf("projects/%s/global/images/family/%s", s.ImageProject, s.ImageFamily)
}

// networkPath returns the network as a resource path.
func (s *Settings) networkPath() string {
	if strings.Contains(s.Network, "/") {
		return s.Network
	}
	return "global/networks/" + s.Network
}

// subnetworkPath returns the subnetwork of zone as a resource path, or "".
func (s *Settings) subnetworkPath(zone string) string {
	if s.Subnetwork == "" || strings.Contains(s.Subnetwork, "/") {
		return s.Subnetwork
	}
	return fmt.Sprintf("regions/%s/subnetworks/%s", region(zone), s.Subnetwork)
}
