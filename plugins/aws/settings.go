package aws

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/pluginkit"
)

// Settings are the JSON settings Init accepts. Unknown keys are rejected.
//
// The group is the pair (region, name_prefix): List reports the instances
// tagged mayfly-group=<name_prefix> in the region, so two groups of one
// manager (say Linux and Windows) must use different prefixes.
type Settings struct {
	// Region is the AWS region, e.g. "us-east-1". Required.
	Region string `json:"region"`
	// Endpoint replaces the EC2 endpoint URL (tests, VPC endpoints).
	Endpoint string `json:"endpoint"`
	// AccessKeyID, SecretAccessKey and SessionToken are static
	// credentials. Without them the SDK's default chain is used
	// (environment, shared config, instance role).
	AccessKeyID     string `json:"access_key_id"`
	SecretAccessKey string `json:"secret_access_key"`
	SessionToken    string `json:"session_token"`

	// LaunchTemplate names a launch template; AMI and InstanceType, if
	// also set, override the template's. Without a template both are
	// required.
	LaunchTemplate *LaunchTemplate `json:"launch_template"`
	AMI            string          `json:"ami"`
	InstanceType   string          `json:"instance_type"`
	// SubnetIDs are tried in order when a subnet's zone has no capacity.
	// Empty: the default subnet (or the launch template's).
	SubnetIDs        []string `json:"subnet_ids"`
	SecurityGroupIDs []string `json:"security_group_ids"`
	// IAMInstanceProfile is an instance profile name or ARN.
	IAMInstanceProfile string `json:"iam_instance_profile"`
	// Spot requests one-time spot instances that terminate on
	// interruption; SpotMaxPrice (USD per hour, e.g. "0.05") caps the
	// price, empty means the on-demand price.
	Spot         bool   `json:"spot"`
	SpotMaxPrice string `json:"spot_max_price"`

	// NamePrefix prefixes the Name tag and names the group (default
	// "mayfly").
	NamePrefix string `json:"name_prefix"`
	// OS is "linux" (SSH, default) or "windows" (WinRM over HTTPS).
	OS string `json:"os"`
	// Username logs in (default "ec2-user" on Linux, "Administrator" on
	// Windows). On Linux it must be the image's cloud-init default user.
	Username string `json:"username"`
	// UserData is added to the instance's user data. On Linux it is sent
	// as a second part of a MIME multipart archive after mayfly's
	// cloud-config and must start with "#!", "#cloud-config",
	// "#cloud-boothook" or "#include". On Windows it holds EC2Launch
	// <powershell> and <script> blocks, at most 10 KiB: mayfly's WinRM
	// certificate script goes first in its <powershell> block (one is
	// added when it has none); an EC2Launch v2 YAML document is refused.
	UserData string `json:"user_data"`
	// UseExternalIP makes ConnectInfo give the instance's public address
	// instead of its private one. Formerly use_public_ip (still read, with
	// a deprecation warning).
	UseExternalIP bool `json:"use_external_ip"`
	// KeySecretFile holds at least 32 bytes of secret from which the
	// per-instance SSH keys are derived, so that a restarted plugin can
	// still log in to the instances it made. Without it a random secret
	// is made per process (see Provider).
	KeySecretFile string `json:"key_secret_file"`
	// WindowsKeyFile is a PEM RSA private key whose public half is
	// imported as the EC2 key pair Windows encrypts its password with.
	// Without it a key is generated per process.
	WindowsKeyFile string `json:"windows_key_file"`
	// HostKeyFromConsole reads the SSH host key from the console output
	// (default true).
	HostKeyFromConsole *bool `json:"host_key_from_console"`

	// Manager, if set, narrows List to instances tagged
	// mayfly-manager=<Manager>; Create then refuses other managers.
	Manager string `json:"manager"`
	// MaxSize is reported by Init (0: no limit of the plugin's own).
	MaxSize int `json:"max_size"`
	// PageSize is DescribeInstances' MaxResults, 5-1000 (default 1000).
	PageSize int `json:"page_size"`
	// CreateConcurrency bounds the RunInstances calls of one Create in
	// flight (default 4).
	CreateConcurrency int `json:"create_concurrency"`
	// CapacityCooldown is how long a subnet that reported no capacity is
	// tried after the others (default 1m).
	CapacityCooldown *providers.Duration `json:"capacity_cooldown"`
	// CacheTTL is how long instance data from List serves ConnectInfo and
	// Heartbeat without another DescribeInstances (default 10s; "0s"
	// disables the cache).
	CacheTTL *providers.Duration `json:"cache_ttl"`
	// APITimeout bounds every EC2 API call (default 30s).
	APITimeout providers.Duration `json:"api_timeout"`
	// RateLimit paces the calls (see RateLimit).
	RateLimit RateLimit `json:"rate_limit"`
}

// LaunchTemplate names an EC2 launch template by id or name.
type LaunchTemplate struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	// Version is a version number, "$Default" or "$Latest" (default
	// "$Default").
	Version string `json:"version"`
}

// RateLimit configures the plugin's token buckets. EC2 throttles each API
// action per account and region with a token bucket; the defaults take
// half of the documented buckets so that other tools in the account keep
// the rest:
//
//	EC2 request buckets: non-mutating (Describe*, Get*) 100 burst, 20/s;
//	mutating (RunInstances, TerminateInstances, ImportKeyPair) 50, 5/s.
//	EC2 resource buckets: RunInstances 1000 instances, 2/s;
//	TerminateInstances 1000 instances, 20/s.
type RateLimit struct {
	// DescribeRate and DescribeBurst bound each non-mutating action
	// (default 10/s, burst 50).
	DescribeRate  float64 `json:"describe_rate"`
	DescribeBurst int     `json:"describe_burst"`
	// MutatingRate and MutatingBurst bound each mutating action (default
	// 2.5/s, burst 25).
	MutatingRate  float64 `json:"mutating_rate"`
	MutatingBurst int     `json:"mutating_burst"`
	// LaunchRate and LaunchBurst bound instances launched (default 1/s,
	// burst 500).
	LaunchRate  float64 `json:"launch_rate"`
	LaunchBurst int     `json:"launch_burst"`
	// TerminateRate and TerminateBurst bound instances terminated
	// (default 10/s, burst 500).
	TerminateRate  float64 `json:"terminate_rate"`
	TerminateBurst int     `json:"terminate_burst"`
	// Throttle holds throttle_backoff, the pause of an action after EC2
	// answers RequestLimitExceeded (default 1s), which doubles with each
	// further throttle of the action up to max_throttle_backoff (default
	// 1m) and resets after a success: pluginkit.Limiter's policy.
	pluginkit.Throttle
}

// config is Settings validated and with defaults applied.
type config struct {
	Settings
	os                 string
	hostKeyFromConsole bool
	capacityCooldown   time.Duration
	cacheTTL           time.Duration
	apiTimeout         time.Duration
}

var (
	regionRE   = regexp.MustCompile(`^[a-z]{2}(-[a-z]+)+-\d+$`)
	amiRE      = regexp.MustCompile(`^ami-[0-9a-f]{8}([0-9a-f]{9})?$`)
	subnetRE   = regexp.MustCompile(`^subnet-[0-9a-f]{8}([0-9a-f]{9})?$`)
	sgRE       = regexp.MustCompile(`^sg-[0-9a-f]{8}([0-9a-f]{9})?$`)
	ltIDRE     = regexp.MustCompile(`^lt-[0-9a-f]{17}$`)
	typeRE     = regexp.MustCompile(`^[a-z][a-z0-9-]*\.[a-z0-9-]+$`)
	prefixRE   = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9-]{0,39}$`)
	instanceRE = regexp.MustCompile(`^i-[0-9a-f]{8}([0-9a-f]{9})?$`)
)

func keyErr(key, format string, args ...any) error {
	return providers.InvalidArgument(fmt.Errorf("aws settings key %q: %s", key, fmt.Sprintf(format, args...)))
}

// deprecatedKeys are the settings keys renamed so that the cloud plugins
// name alike what means the same.
var deprecatedKeys = []pluginkit.Alias{
	{Old: "use_public_ip", New: "use_external_ip"},
}

// parseSettings decodes and validates raw settings; log receives the
// deprecation warnings.
func parseSettings(raw json.RawMessage, log *slog.Logger) (config, error) {
	var c config
	if err := pluginkit.DecodeSettings(raw, &c.Settings, log, deprecatedKeys...); err != nil {
		return c, fmt.Errorf("aws init: %w", err)
	}
	s := &c.Settings
	switch {
	case s.Region == "":
		return c, keyErr("region", "is required")
	case !regionRE.MatchString(s.Region):
		return c, keyErr("region", "%q is not a region name like us-east-1", s.Region)
	}
	if s.Endpoint != "" {
		u, err := url.Parse(s.Endpoint)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return c, keyErr("endpoint", "%q is not an absolute http(s) URL", s.Endpoint)
		}
	}
	if (s.AccessKeyID == "") != (s.SecretAccessKey == "") {
		return c, keyErr("access_key_id", "access_key_id and secret_access_key go together")
	}
	if s.SessionToken != "" && s.AccessKeyID == "" {
		return c, keyErr("session_token", "needs access_key_id and secret_access_key")
	}
	if lt := s.LaunchTemplate; lt != nil {
		switch {
		case lt.ID == "" && lt.Name == "":
			return c, keyErr("launch_template", "needs id or name")
		case lt.ID != "" && lt.Name != "":
			return c, keyErr("launch_template", "give id or name, not both")
		case lt.ID != "" && !ltIDRE.MatchString(lt.ID):
			return c, keyErr("launch_template", "id %q is not a launch template id (lt-…)", lt.ID)
		}
		if v := lt.Version; v != "" && v != "$Default" && v != "$Latest" {
			if n, err := strconv.Atoi(v); err != nil || n < 1 {
				return c, keyErr("launch_template", "version %q is not a positive number, $Default or $Latest", v)
			}
		}
	} else {
		if s.AMI == "" {
			return c, keyErr("ami", "is required without launch_template")
		}
		if s.InstanceType == "" {
			return c, keyErr("instance_type", "is required without launch_template")
		}
	}
	if s.AMI != "" && !amiRE.MatchString(s.AMI) {
		return c, keyErr("ami", "%q is not an AMI id (ami-…)", s.AMI)
	}
	if s.InstanceType != "" && !typeRE.MatchString(s.InstanceType) {
		return c, keyErr("instance_type", "%q is not an instance type like t3.micro", s.InstanceType)
	}
	seen := map[string]bool{}
	for i, id := range s.SubnetIDs {
		if !subnetRE.MatchString(id) {
			return c, keyErr("subnet_ids", "[%d] %q is not a subnet id (subnet-…)", i, id)
		}
		if seen[id] {
			return c, keyErr("subnet_ids", "[%d] %q is listed twice", i, id)
		}
		seen[id] = true
	}
	for i, id := range s.SecurityGroupIDs {
		if !sgRE.MatchString(id) {
			return c, keyErr("security_group_ids", "[%d] %q is not a security group id (sg-…)", i, id)
		}
	}
	if s.SpotMaxPrice != "" {
		if !s.Spot {
			return c, keyErr("spot_max_price", "needs spot: true")
		}
		if p, err := strconv.ParseFloat(s.SpotMaxPrice, 64); err != nil || p <= 0 {
			return c, keyErr("spot_max_price", "%q is not a positive price in USD per hour", s.SpotMaxPrice)
		}
	}
	if s.NamePrefix == "" {
		s.NamePrefix = "mayfly"
	}
	if !prefixRE.MatchString(s.NamePrefix) {
		return c, keyErr("name_prefix", "%q must be 1-40 letters, digits or '-', starting with a letter or digit", s.NamePrefix)
	}
	switch s.OS {
	case "", "linux":
		c.os = "linux"
		if s.Username == "" {
			s.Username = "ec2-user"
		}
		if s.WindowsKeyFile != "" {
			return c, keyErr("windows_key_file", "only applies to os \"windows\"")
		}
	case "windows":
		c.os = "windows"
		if s.Username == "" {
			s.Username = "Administrator"
		}
		if s.KeySecretFile != "" {
			return c, keyErr("key_secret_file", "only applies to os \"linux\"")
		}
	default:
		return c, keyErr("os", "%q is not linux or windows", s.OS)
	}
	maxUser := 12 << 10
	if c.os == "linux" && s.UserData != "" {
		if _, err := userDataType(s.UserData); err != nil {
			return c, keyErr("user_data", "%v", err)
		}
	}
	if c.os == "windows" {
		// mayfly's WinRM certificate script takes about 5 KiB.
		maxUser = 10 << 10
		if err := checkWindowsUserData(s.UserData); err != nil {
			return c, keyErr("user_data", "%v", err)
		}
	}
	if len(s.UserData) > maxUser {
		return c, keyErr("user_data", "is %d bytes; at most %d fit beside mayfly's part in EC2's 16 KiB", len(s.UserData), maxUser)
	}
	if s.IAMInstanceProfile != "" && strings.ContainsAny(s.IAMInstanceProfile, " \t\n") {
		return c, keyErr("iam_instance_profile", "%q contains white space", s.IAMInstanceProfile)
	}
	if s.Manager != "" {
		if err := checkTag(providers.LabelManager, s.Manager); err != nil {
			return c, keyErr("manager", "%v", err)
		}
	}
	if s.MaxSize < 0 {
		return c, keyErr("max_size", "must not be negative")
	}
	switch {
	case s.PageSize == 0:
		s.PageSize = 1000
	case s.PageSize < 5 || s.PageSize > 1000:
		return c, keyErr("page_size", "%d is outside DescribeInstances' 5-1000", s.PageSize)
	}
	switch {
	case s.CreateConcurrency == 0:
		s.CreateConcurrency = 4
	case s.CreateConcurrency < 0 || s.CreateConcurrency > 64:
		return c, keyErr("create_concurrency", "%d is outside 1-64", s.CreateConcurrency)
	}
	c.hostKeyFromConsole = s.HostKeyFromConsole == nil || *s.HostKeyFromConsole
	c.capacityCooldown = durationOr(s.CapacityCooldown, time.Minute)
	c.cacheTTL = durationOr(s.CacheTTL, 10*time.Second)
	c.apiTimeout = time.Duration(s.APITimeout)
	if c.apiTimeout == 0 {
		c.apiTimeout = 30 * time.Second
	}
	if err := s.RateLimit.validate(); err != nil {
		return c, err
	}
	return c, nil
}

func durationOr(d *providers.Duration, def time.Duration) time.Duration {
	if d == nil {
		return def
	}
	return time.Duration(*d)
}

func (r *RateLimit) validate() error {
	rates := []struct {
		key   string
		rate  *float64
		burst *int
		dr    float64
		db    int
	}{
		{"describe", &r.DescribeRate, &r.DescribeBurst, 10, 50},
		{"mutating", &r.MutatingRate, &r.MutatingBurst, 2.5, 25},
		{"launch", &r.LaunchRate, &r.LaunchBurst, 1, 500},
		{"terminate", &r.TerminateRate, &r.TerminateBurst, 10, 500},
	}
	for _, x := range rates {
		if *x.rate < 0 || *x.burst < 0 {
			return keyErr("rate_limit", "%s_rate and %s_burst must not be negative", x.key, x.key)
		}
		if *x.rate == 0 {
			*x.rate = x.dr
		}
		if *x.burst == 0 {
			*x.burst = x.db
		}
	}
	if err := r.Throttle.Defaults(time.Second, time.Minute); err != nil {
		return providers.InvalidArgument(fmt.Errorf("aws %w", err))
	}
	return nil
}

// checkTag reports whether k=v is a valid EC2 tag.
func checkTag(k, v string) error {
	switch {
	case k == "" || len(k) > 128:
		return fmt.Errorf("tag key %q must be 1-128 characters", k)
	case len(v) > 256:
		return fmt.Errorf("tag %q value is %d characters, at most 256", k, len(v))
	case strings.HasPrefix(strings.ToLower(k), "aws:"):
		return fmt.Errorf("tag key %q uses the reserved prefix aws:", k)
	}
	return nil
}

// userDataType returns the MIME type cloud-init gives a user data part
// from its first line.
func userDataType(ud string) (string, error) {
	switch {
	case strings.HasPrefix(ud, "#!"):
		return "text/x-shellscript", nil
	case strings.HasPrefix(ud, "#cloud-config"):
		return "text/cloud-config", nil
	case strings.HasPrefix(ud, "#cloud-boothook"):
		return "text/cloud-boothook", nil
	case strings.HasPrefix(ud, "#include"):
		return "text/x-include-url", nil
	}
	return "", errors.New(`must start with "#!", "#cloud-config", "#cloud-boothook" or "#include"`)
}
