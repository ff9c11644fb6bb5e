package config

import (
	"fmt"
	"net"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"

	units "github.com/docker/go-units"
)

// Docker is a runner's [runners.docker]: how jobs with an image run in
// containers on their VM's Docker Engine. Only the keys that matter on a
// fleet with one VM per job are read; gitlab-runner's others warn.
type Docker struct {
	// Host is the Docker Engine's socket on the VM, reached through the
	// job's SSH connection: unix:///var/run/docker.sock by default.
	Host string
	// Image is the default image of jobs that name none.
	Image string
	// Privileged runs the job's and the services' containers privileged.
	Privileged bool
	// Volumes are "HOST:CONTAINER[:MODE]" binds of VM paths, or
	// "CONTAINER" paths that get a volume of their own for the job.
	Volumes []string
	// PullPolicy is tried in order: always, if-not-present, never
	// (default always, as gitlab-runner's).
	PullPolicy []string
	// AllowedPullPolicies limits the policies a job may ask for; empty:
	// those of PullPolicy.
	AllowedPullPolicies []string
	// AllowedImages and AllowedServices are glob patterns (with ** for
	// any depth) a job's image and services must match; empty allows all.
	AllowedImages, AllowedServices []string
	// ServicesLimit caps a job's services; -1 (default) means no limit.
	ServicesLimit int
	// Memory (bytes) and NanoCPUs limit each container; 0 is no limit.
	Memory   int64
	NanoCPUs int64
	// DNS servers and ExtraHosts ("host:IP") of every container.
	DNS, ExtraHosts []string
	// WaitForServicesTimeout bounds waiting for services' ports;
	// negative: no wait.
	WaitForServicesTimeout time.Duration
	// HelperImage is accepted for compatibility; mayfly needs no helper
	// image (runner stages run in the VM's shell).
	HelperImage string
}

// Defaults of [runners.docker].
const (
	DefaultDockerHost             = "unix:///var/run/docker.sock"
	DefaultWaitForServicesTimeout = 30 * time.Second
)

// Pull policies, as gitlab-runner names them.
const (
	PullAlways       = "always"
	PullIfNotPresent = "if-not-present"
	PullNever        = "never"
)

var pullPolicies = []string{PullAlways, PullIfNotPresent, PullNever}

// dockerIgnored are gitlab-runner's [runners.docker] keys that mayfly
// accepts and does not use, with the reason.
var dockerIgnored = map[string]string{
	"tls_verify":                   "the Docker Engine is reached through the job's SSH connection",
	"tls_cert_path":                "the Docker Engine is reached through the job's SSH connection",
	"hostname":                     "not supported",
	"runtime":                      "containers use the VM's default runtime",
	"memory_swap":                  "not supported; memory is",
	"memory_reservation":           "not supported; memory is",
	"cgroup_parent":                "not supported",
	"cpuset_cpus":                  "not supported; cpus is",
	"cpuset_mems":                  "not supported",
	"cpu_shares":                   "not supported; cpus is",
	"dns_search":                   "not supported; dns is",
	"services_privileged":          "services follow privileged",
	"disable_entrypoint_overwrite": "not supported",
	"user":                         "containers run as the image's user",
	"allowed_users":                "not supported",
	"group_add":                    "not supported",
	"userns_mode":                  "not supported",
	"cap_add":                      "not supported; use privileged",
	"cap_drop":                     "not supported",
	"oom_kill_disable":             "not supported",
	"oom_score_adjust":             "not supported",
	"security_opt":                 "not supported",
	"services_security_opt":        "not supported",
	"devices":                      "not supported",
	"device_cgroup_rules":          "not supported",
	"gpus":                         "not supported",
	"services_devices":             "not supported",
	"disable_cache":                "each VM lives for one job; there is no local cache volume",
	"volume_keep":                  "the VM and its volumes are deleted after the job",
	"volume_driver":                "volumes use the VM's local driver",
	"volume_driver_ops":            "volumes use the VM's local driver",
	"cache_dir":                    "each VM lives for one job; there is no local cache",
	"volumes_from":                 "not supported",
	"network_mode":                 "each job has a network of its own",
	"pid_mode":                     "not supported",
	"ipcmode":                      "not supported",
	"mac_address":                  "not supported",
	"links":                        "services are reached by their aliases on the job's network",
	"services":                     "runner-level services are not supported; use services: in .gitlab-ci.yml",
	"service_memory":               "services follow memory",
	"service_memory_swap":          "not supported",
	"service_memory_reservation":   "not supported",
	"service_cgroup_parent":        "not supported",
	"service_slot_cgroup_template": "not supported",
	"service_cpuset_cpus":          "not supported",
	"service_cpus":                 "services follow cpus",
	"service_cpu_shares":           "not supported",
	"service_gpus":                 "not supported",
	"allowed_privileged_images":    "privileged applies to every image",
	"allowed_privileged_services":  "privileged applies to every service",
	"isolation":                    "Windows containers are not supported",
	"shm_size":                     "not supported",
	"tmpfs":                        "not supported",
	"services_tmpfs":               "not supported",
	"sysctls":                      "not supported",
	"helper_image_flavor":          "mayfly needs no helper image",
	"container_labels":             "not supported",
	"enable_ipv6":                  "not supported",
	"ulimit":                       "not supported",
	"network_mtu":                  "not supported",
	"log_options":                  "not supported",
}

func init() {
	for k, why := range dockerIgnored {
		ignoredKeys["runners.docker."+k] = why
	}
}

type fileDocker struct {
	Host                   string   `toml:"host"`
	Image                  string   `toml:"image"`
	Privileged             bool     `toml:"privileged"`
	Volumes                []string `toml:"volumes"`
	PullPolicy             any      `toml:"pull_policy"`
	AllowedPullPolicies    []string `toml:"allowed_pull_policies"`
	AllowedImages          []string `toml:"allowed_images"`
	AllowedServices        []string `toml:"allowed_services"`
	ServicesLimit          *int     `toml:"services_limit"`
	Memory                 string   `toml:"memory"`
	CPUs                   string   `toml:"cpus"`
	DNS                    []string `toml:"dns"`
	ExtraHosts             []string `toml:"extra_hosts"`
	WaitForServicesTimeout *int     `toml:"wait_for_services_timeout"`
	HelperImage            string   `toml:"helper_image"`
}

// dockerExecutors run jobs with an image in containers on the VM.
var dockerExecutors = map[string]bool{"docker+machine": true, "docker-autoscaler": true}

// docker validates [runners.docker] of a runner whose executor and VM
// OS are known. It returns nil when the runner does not run containers.
func (b *builder) docker(key string, d *fileDocker, executor, os string) *Docker {
	k := func(s string) string { return key + "." + s }
	switch {
	case !dockerExecutors[executor]:
		if d != nil {
			b.warnf(key, "ignored: the %s executor runs jobs in the VM's shell; image and services need docker+machine or docker-autoscaler", executor)
		}
		return nil
	case os == "windows":
		if d != nil {
			b.warnf(key, "ignored: jobs on Windows VMs run in the VM's shell; image and services are not supported there")
		}
		return nil
	case d == nil:
		d = &fileDocker{}
	}
	out := &Docker{
		Host:                   d.Host,
		Image:                  d.Image,
		Privileged:             d.Privileged,
		Volumes:                d.Volumes,
		AllowedImages:          d.AllowedImages,
		AllowedServices:        d.AllowedServices,
		ServicesLimit:          -1,
		DNS:                    d.DNS,
		ExtraHosts:             d.ExtraHosts,
		WaitForServicesTimeout: DefaultWaitForServicesTimeout,
		HelperImage:            d.HelperImage,
	}
	if out.Host == "" {
		out.Host = DefaultDockerHost
	} else if u, err := url.Parse(out.Host); err != nil || u.Scheme != "unix" || !strings.HasPrefix(u.Path, "/") {
		b.errorf(k("host"), "want unix:///path/to/docker.sock (the socket on the VM), got %q", out.Host)
	}
	out.PullPolicy = b.pullPolicy(k("pull_policy"), d.PullPolicy)
	for j, p := range d.AllowedPullPolicies {
		b.oneOf(fmt.Sprintf("%s[%d]", k("allowed_pull_policies"), j), p, pullPolicies)
	}
	out.AllowedPullPolicies = d.AllowedPullPolicies
	for _, list := range []struct {
		name  string
		globs []string
	}{{"allowed_images", d.AllowedImages}, {"allowed_services", d.AllowedServices}} {
		for j, g := range list.globs {
			if _, err := GlobRegexp(g); err != nil {
				b.errorf(fmt.Sprintf("%s[%d]", k(list.name), j), "%v", err)
			}
		}
	}
	if d.ServicesLimit != nil {
		if *d.ServicesLimit < -1 {
			b.errorf(k("services_limit"), "want -1 (no limit) or a number of services, got %d", *d.ServicesLimit)
		} else {
			out.ServicesLimit = *d.ServicesLimit
		}
	}
	if d.Memory != "" {
		n, err := units.RAMInBytes(d.Memory)
		if err != nil || n < 6<<20 {
			b.errorf(k("memory"), "want a size of at least 6m such as \"512m\" or \"2g\", got %q", d.Memory)
		}
		out.Memory = n
	}
	if d.CPUs != "" {
		f, err := strconv.ParseFloat(d.CPUs, 64)
		if err != nil || f <= 0 {
			b.errorf(k("cpus"), "want a positive number of CPUs such as \"1.5\", got %q", d.CPUs)
		}
		out.NanoCPUs = int64(f * 1e9)
	}
	for j, s := range d.DNS {
		if net.ParseIP(s) == nil {
			b.errorf(fmt.Sprintf("%s[%d]", k("dns"), j), "want an IP address, got %q", s)
		}
	}
	for j, h := range d.ExtraHosts {
		host, ip, ok := strings.Cut(h, ":")
		if !ok || host == "" || (net.ParseIP(ip) == nil && ip != "host-gateway") {
			b.errorf(fmt.Sprintf("%s[%d]", k("extra_hosts"), j), "want host:IP, got %q", h)
		}
	}
	for j, v := range d.Volumes {
		if err := checkVolume(v); err != nil {
			b.errorf(fmt.Sprintf("%s[%d]", k("volumes"), j), "%v", err)
		}
	}
	if t := d.WaitForServicesTimeout; t != nil {
		out.WaitForServicesTimeout = time.Duration(*t) * time.Second
		if *t == 0 {
			out.WaitForServicesTimeout = DefaultWaitForServicesTimeout
		}
	}
	if d.HelperImage != "" {
		b.warnf(k("helper_image"), "not used: get_sources, cache and artifacts run in the VM's own shell, beside the containers")
	}
	return out
}

// pullPolicy reads pull_policy: a string or an array of strings.
func (b *builder) pullPolicy(key string, v any) []string {
	var out []string
	switch p := v.(type) {
	case nil:
		return []string{PullAlways}
	case string:
		out = []string{p}
	case []any:
		for _, e := range p {
			s, ok := e.(string)
			if !ok {
				b.errorf(key, "want a string or an array of strings, got %v", v)
				return nil
			}
			out = append(out, s)
		}
	default:
		b.errorf(key, "want a string or an array of strings, got %v", v)
		return nil
	}
	if len(out) == 0 {
		return []string{PullAlways}
	}
	for j, p := range out {
		if !contains(pullPolicies, p) {
			b.errorf(fmt.Sprintf("%s[%d]", key, j), "%q is not one of %s", p, strings.Join(pullPolicies, ", "))
		}
	}
	return out
}

func contains(list []string, s string) bool {
	for _, e := range list {
		if e == s {
			return true
		}
	}
	return false
}

// checkVolume validates one volumes entry: an absolute container path, or
// an absolute VM path and a container path with an optional mode.
func checkVolume(v string) error {
	parts := strings.Split(v, ":")
	switch len(parts) {
	case 1, 2, 3:
	default:
		return fmt.Errorf("want CONTAINER_PATH or HOST_PATH:CONTAINER_PATH[:ro|rw], got %q", v)
	}
	for _, p := range parts[:min(len(parts), 2)] {
		if !strings.HasPrefix(p, "/") {
			return fmt.Errorf("want absolute paths (CONTAINER_PATH or HOST_PATH:CONTAINER_PATH[:ro|rw]), got %q", v)
		}
	}
	if len(parts) == 3 && parts[2] != "ro" && parts[2] != "rw" {
		return fmt.Errorf("mode %q: want ro or rw", parts[2])
	}
	return nil
}

// GlobRegexp compiles an allowed_images or allowed_services pattern as
// gitlab-runner matches them (doublestar globs): * matches within a path
// segment, ** across segments, ? one character.
func GlobRegexp(glob string) (*regexp.Regexp, error) {
	if glob == "" {
		return nil, fmt.Errorf("empty pattern")
	}
	var b strings.Builder
	b.WriteString("^")
	for i := 0; i < len(glob); i++ {
		switch c := glob[i]; c {
		case '*':
			if i+1 < len(glob) && glob[i+1] == '*' {
				b.WriteString(".*")
				i++
			} else {
				b.WriteString("[^/]*")
			}
		case '?':
			b.WriteString("[^/]")
		default:
			b.WriteString(regexp.QuoteMeta(string(c)))
		}
	}
	b.WriteString("$")
	return regexp.Compile(b.String())
}
