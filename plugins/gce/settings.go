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
	"github.com/mayfly-ci/mayfly/providers/pluginkit"
	"google.golang.org/protobuf/proto"
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
	// ExternalIP gives the instance an external address (default true).
	// Formerly no_external_ip, negated (still read, with a deprecation
	// warning).
	ExternalIP *bool `json:"external_ip"`
	// UseExternalIP makes ConnectInfo return the instance's external
	// address rather than its internal one (default: ExternalIP; false
	// whenever ExternalIP is). Formerly use_internal_ip, negated (still
	// read, with a deprecation warning).
	UseExternalIP *bool `json:"use_external_ip"`
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
	// RateLimit bounds every API request the plugin makes (see RateLimit).
	RateLimit RateLimit `json:"rate_limit"`
	// ListPageSize is maxResults of list calls (default 500, GCE's maximum).
	ListPageSize int `json:"list_page_size"`
	// OperationTimeout bounds the wait for a zone operation (default 5m).
	OperationTimeout providers.Duration `json:"operation_timeout"`
	// CapacityCooldown is how long a zone out of capacity is tried last
	// (default 5m). Formerly zone_cooldown (still read, with a deprecation
	// warning).
	CapacityCooldown providers.Duration `json:"capacity_cooldown"`
	// PasswordTimeout bounds one ConnectInfo's wait for the Windows
	// password on serial port 4 (default 45s); the caller retries after.
	PasswordTimeout providers.Duration `json:"password_timeout"`
	// PollInterval is the pause between serial port reads (default 10s).
	PollInterval providers.Duration `json:"poll_interval"`
	// CreateConcurrency bounds parallel inserts of one Create (default 8).
	CreateConcurrency int `json:"create_concurrency"`
}

// RateLimit is the "rate_limit" settings object: one token bucket for
// every API request of the plugin, and the backoff after a rate-limit
// answer (pluginkit.Limiter's policy, all requests paused together).
type RateLimit struct {
	// Rate (requests/s) and Burst bound the requests (defaults 5 and 10:
	// a fifth of GCE's default 1,500 requests/min per project and quota
	// group). Formerly the number rate_limit and rate_burst.
	Rate  float64 `json:"rate"`
	Burst int     `json:"burst"`
	// Throttle holds throttle_backoff, the pause of all requests after a
	// rate-limit answer without Retry-After (default 10s; formerly the
	// top-level throttle_backoff), doubling with each further throttle up
	// to max_throttle_backoff (default 5m).
	pluginkit.Throttle
}

// deprecatedKeys are the settings keys renamed so that the cloud plugins
// name alike what means the same. The number form of rate_limit comes
// first, so that rate_burst can move into the object it becomes.
var deprecatedKeys = []pluginkit.Alias{
	{Old: "rate_limit", New: "rate_limit.rate", Match: pluginkit.IsNumber},
	{Old: "rate_burst", New: "rate_limit.burst"},
	{Old: "throttle_backoff", New: "rate_limit.throttle_backoff"},
	{Old: "zone_cooldown", New: "capacity_cooldown"},
	{Old: "no_external_ip", New: "external_ip", Convert: pluginkit.Negate},
	{Old: "use_internal_ip", New: "use_external_ip", Convert: pluginkit.Negate},
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
	if err := pluginkit.DecodeSettings(raw, &s, log, deprecatedKeys...); err != nil {
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
	if s.RateLimit.Rate == 0 {
		s.RateLimit.Rate = 5
	}
	if s.RateLimit.Burst == 0 {
		s.RateLimit.Burst = 10
	}
	if s.ListPageSize == 0 {
		s.ListPageSize = 500
	}
	setDuration(&s.OperationTimeout, 5*time.Minute)
	setDuration(&s.CapacityCooldown, 5*time.Minute)
	setDuration(&s.PasswordTimeout, 45*time.Second)
	setDuration(&s.PollInterval, 10*time.Second)
	if s.CreateConcurrency == 0 {
		s.CreateConcurrency = 8
	}
	if s.ExternalIP == nil {
		s.ExternalIP = proto.Bool(true)
	}
	if s.UseExternalIP == nil || !*s.ExternalIP {
		// Without an external address there is only the internal one.
		s.UseExternalIP = proto.Bool(*s.ExternalIP)
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
	if s.RateLimit.Rate < 0 {
		bad("rate_limit", "rate %g is negative", s.RateLimit.Rate)
	}
	if s.RateLimit.Burst < 1 {
		bad("rate_limit", "burst %d must be at least 1", s.RateLimit.Burst)
	}
	if err := s.RateLimit.Throttle.Defaults(10*time.Second, 5*time.Minute); err != nil {
		errs = append(errs, err)
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
