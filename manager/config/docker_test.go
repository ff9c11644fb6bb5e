package config

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"time"
)

// dockerDoc is machineDoc with a [runners.docker] section of every key
// mayfly reads.
const dockerDoc = machineDoc + `  [runners.docker]
    image = "$CI_REGISTRY/mayfly/debian:bookworm"
    privileged = true
    volumes = ["/certs/client", "/srv/data:/data:ro"]
    pull_policy = ["if-not-present", "always"]
    allowed_pull_policies = ["always", "if-not-present"]
    allowed_images = ["registry.example.com/**", "*/mayfly/*:bookworm"]
    allowed_services = ["**/redis:*"]
    services_limit = 2
    memory = "1g"
    cpus = "1.5"
    dns = ["10.0.0.53"]
    extra_hosts = ["git.local:10.0.0.7"]
    wait_for_services_timeout = 45
    host = "unix:///run/docker.sock"
`

func TestDockerSection(t *testing.T) {
	cfg, err := Parse("c.toml", []byte(dockerDoc))
	if err != nil {
		t.Fatal(err)
	}
	d := cfg.Runners[0].Docker
	if d == nil {
		t.Fatal("Docker is nil for a docker+machine runner")
	}
	want := Docker{
		Host: "unix:///run/docker.sock", Image: "$CI_REGISTRY/mayfly/debian:bookworm", Privileged: true,
		Volumes: []string{"/certs/client", "/srv/data:/data:ro"}, PullPolicy: []string{"if-not-present", "always"},
		AllowedPullPolicies: []string{"always", "if-not-present"},
		AllowedImages:       []string{"registry.example.com/**", "*/mayfly/*:bookworm"}, AllowedServices: []string{"**/redis:*"},
		ServicesLimit: 2, Memory: 1 << 30, NanoCPUs: 1_500_000_000, DNS: []string{"10.0.0.53"},
		ExtraHosts: []string{"git.local:10.0.0.7"}, WaitForServicesTimeout: 45 * time.Second,
	}
	if !dockerEqual(*d, want) {
		t.Errorf("Docker =\n%+v\nwant\n%+v", *d, want)
	}
	for _, w := range cfg.Warnings {
		t.Errorf("unexpected warning %v", w)
	}
}

func dockerEqual(a, b Docker) bool {
	return a.Host == b.Host && a.Image == b.Image && a.Privileged == b.Privileged && slices.Equal(a.Volumes, b.Volumes) &&
		slices.Equal(a.PullPolicy, b.PullPolicy) && slices.Equal(a.AllowedPullPolicies, b.AllowedPullPolicies) &&
		slices.Equal(a.AllowedImages, b.AllowedImages) && slices.Equal(a.AllowedServices, b.AllowedServices) &&
		a.ServicesLimit == b.ServicesLimit && a.Memory == b.Memory && a.NanoCPUs == b.NanoCPUs &&
		slices.Equal(a.DNS, b.DNS) && slices.Equal(a.ExtraHosts, b.ExtraHosts) &&
		a.WaitForServicesTimeout == b.WaitForServicesTimeout && a.HelperImage == b.HelperImage
}

func TestDockerDefaults(t *testing.T) {
	cfg, err := Parse("c.toml", []byte(machineDoc+"  [runners.docker]\n    image = \"debian\"\n    pull_policy = \"never\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	d := cfg.Runners[0].Docker
	if d.Host != DefaultDockerHost || d.ServicesLimit != -1 || d.WaitForServicesTimeout != DefaultWaitForServicesTimeout || !slices.Equal(d.PullPolicy, []string{"never"}) {
		t.Errorf("defaults: %+v", *d)
	}
	// Without the section a docker+machine runner still runs images, with
	// gitlab-runner's defaults, and is told that jobs without one run in
	// the VM's shell.
	cfg, err = Parse("c.toml", []byte(machineDoc))
	if err != nil {
		t.Fatal(err)
	}
	if d := cfg.Runners[0].Docker; d == nil || !slices.Equal(d.PullPolicy, []string{"always"}) {
		t.Errorf("no section: Docker = %+v, want defaults", d)
	}
	if len(cfg.Warnings) != 1 || !strings.Contains(cfg.Warnings[0].Message, "no [runners.docker] image") {
		t.Errorf("warnings %v, want one about jobs without an image", cfg.Warnings)
	}
}

func TestDockerNotUsed(t *testing.T) {
	// The instance executor runs jobs in the VM's shell, as gitlab-runner's.
	cfg, err := Parse("c.toml", []byte(autoscalerDoc+"  [runners.docker]\n    image = \"debian\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Runners[0].Docker != nil {
		t.Error("an instance runner got a Docker config")
	}
	if len(cfg.Warnings) != 1 || cfg.Warnings[0].Key != "runners[0].docker" || cfg.Warnings[0].Line != 15 ||
		!strings.Contains(cfg.Warnings[0].Message, "instance executor runs jobs in the VM's shell") {
		t.Errorf("warnings %v", cfg.Warnings)
	}
	win := strings.Replace(autoscalerDoc, `executor = "instance"`, `executor = "docker-autoscaler"`, 1)
	win = strings.Replace(win, `timeout = "2m"`, "timeout = \"2m\"\n      os = \"windows\"", 1)
	cfg, err = Parse("c.toml", []byte(win))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Runners[0].Docker != nil {
		t.Error("a Windows runner got a Docker config")
	}
}

func TestDockerErrors(t *testing.T) {
	tests := []struct {
		name, from, to string
		key, msg       string
	}{
		{"pull policy", `pull_policy = ["if-not-present", "always"]`, `pull_policy = ["sometimes"]`, "runners[0].docker.pull_policy[0]", `"sometimes" is not one of always, if-not-present, never`},
		{"pull policy type", `pull_policy = ["if-not-present", "always"]`, `pull_policy = 3`, "runners[0].docker.pull_policy", "want a string or an array of strings"},
		{"memory", `memory = "1g"`, `memory = "lots"`, "runners[0].docker.memory", `want a size of at least 6m`},
		{"cpus", `cpus = "1.5"`, `cpus = "-1"`, "runners[0].docker.cpus", "want a positive number of CPUs"},
		{"dns", `dns = ["10.0.0.53"]`, `dns = ["ns.example.com"]`, "runners[0].docker.dns[0]", "want an IP address"},
		{"extra_hosts", `extra_hosts = ["git.local:10.0.0.7"]`, `extra_hosts = ["git.local"]`, "runners[0].docker.extra_hosts[0]", "want host:IP"},
		{"volume relative", `volumes = ["/certs/client", "/srv/data:/data:ro"]`, `volumes = ["/certs/client", "data:/data"]`, "runners[0].docker.volumes[1]", "want absolute paths"},
		{"volume mode", `volumes = ["/certs/client", "/srv/data:/data:ro"]`, `volumes = ["/a:/b:rx"]`, "runners[0].docker.volumes[0]", `mode "rx"`},
		{"services_limit", `services_limit = 2`, `services_limit = -5`, "runners[0].docker.services_limit", "want -1 (no limit)"},
		{"host", `host = "unix:///run/docker.sock"`, `host = "tcp://10.0.0.1:2375"`, "runners[0].docker.host", "want unix:///path/to/docker.sock"},
		{"allowed pull policy", `allowed_pull_policies = ["always", "if-not-present"]`, `allowed_pull_policies = ["often"]`, "runners[0].docker.allowed_pull_policies[0]", `"often" is not one of`},
		{"unknown key", `privileged = true`, `privilegd = true`, "runners.docker.privilegd", `unknown key (did you mean "privileged"?)`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if !strings.Contains(dockerDoc, tt.from) {
				t.Fatalf("the document has no %q", tt.from)
			}
			doc := strings.Replace(dockerDoc, tt.from, tt.to, 1)
			_, err := Parse("c.toml", []byte(doc))
			var list ErrorList
			if !errors.As(err, &list) || len(list) != 1 {
				t.Fatalf("got %v, want one error", err)
			}
			e := list[0]
			wantLine := strings.Count(doc[:strings.Index(doc, tt.to)], "\n") + 1
			if e.Key != tt.key || !strings.Contains(e.Message, tt.msg) || e.Line != wantLine || e.File != "c.toml" {
				t.Errorf("got %v (line %d), want line %d key %s message containing %q", e, e.Line, wantLine, tt.key, tt.msg)
			}
		})
	}
}

func TestDockerIgnoredKeysWarn(t *testing.T) {
	doc := dockerDoc + "    tls_verify = false\n    cap_add = [\"NET_ADMIN\"]\n    helper_image = \"registry/helper:x\"\n    shm_size = 300000\n"
	cfg, err := Parse("c.toml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, w := range cfg.Warnings {
		got[w.Key] = w.Message
	}
	for key, msg := range map[string]string{
		"runners.docker.tls_verify":      "through the job's SSH connection",
		"runners.docker.cap_add":         "use privileged",
		"runners[0].docker.helper_image": "not used",
		"runners.docker.shm_size":        "not supported",
	} {
		if !strings.Contains(got[key], msg) {
			t.Errorf("warning for %s = %q, want %q", key, got[key], msg)
		}
	}
}

func TestGlobRegexp(t *testing.T) {
	for _, tt := range []struct {
		glob, name string
		match      bool
	}{
		{"registry.example.com/**", "registry.example.com/a/b/c:1", true},
		{"*/mayfly/*:bookworm", "10.0.2.2:8929/mayfly/debian:bookworm", true},
		{"*/mayfly/*:bookworm", "10.0.2.2:8929/other/mayfly/debian:bookworm", false},
		{"ruby:*", "ruby:3.1", true},
		{"ruby:*", "ruby", false},
		{"ruby:?.?", "ruby:3.1", true},
		{"a.b", "axb", false},
	} {
		re, err := GlobRegexp(tt.glob)
		if err != nil {
			t.Fatal(err)
		}
		if re.MatchString(tt.name) != tt.match {
			t.Errorf("%q matches %q = %t, want %t", tt.glob, tt.name, !tt.match, tt.match)
		}
	}
}
