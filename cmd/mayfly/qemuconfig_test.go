package main

import (
	"fmt"
	"strings"
)

// qemuRunner is one [[runners]] entry of a mayfly run config whose fleet is
// qemu microVMs on this machine (the qemu plugin). Zero fields take the
// defaults noted.
type qemuRunner struct {
	name, url, token string
	shell            string // default "sh"
	// image is the plugin's profile; "" is its default (busybox).
	image string
	// group keeps the VMs of runners sharing a state_dir apart.
	group string
	// memoryMB: 0 is the profile's default.
	memoryMB           int
	maxInstances, idle int
	// maxJobTimeout in seconds; 0 leaves the jobs' own timeouts.
	maxJobTimeout int
	// bootTimeout is also the connector's timeout (the manager's boot
	// watchdog); default 120s.
	bootTimeout string
	// egressAllow are the host endpoints its VMs reach, each at
	// 10.0.2.2:PORT.
	egressAllow []string
	// idleTime is the policy's idle_time; default "10m".
	idleTime string
	// extra is TOML at the end of the entry, e.g. [runners.cache].
	extra string
}

// qemuConfig renders a mayfly run config (JSON logs at logLevel) whose
// runners' VMs live under stateDir and boot the images of cacheDir.
func qemuConfig(concurrent int, logLevel, stateDir, cacheDir string, runners ...qemuRunner) string {
	var b strings.Builder
	fmt.Fprintf(&b, "concurrent = %d\ncheck_interval = 1\nlog_level = %q\nlog_format = \"json\"\n", concurrent, logLevel)
	for _, r := range runners {
		shell, boot, idleTime := r.shell, r.bootTimeout, r.idleTime
		if shell == "" {
			shell = "sh"
		}
		if idleTime == "" {
			idleTime = "10m"
		}
		if boot == "" {
			boot = "120s"
		}
		fmt.Fprintf(&b, `
[[runners]]
  name = %q
  url = %q
  token = %q
  executor = "instance"
  shell = %q
  builds_dir = "/builds"
`, r.name, r.url, r.token, shell)
		if r.maxJobTimeout > 0 {
			fmt.Fprintf(&b, "  max_job_timeout = %d\n", r.maxJobTimeout)
		}
		fmt.Fprintf(&b, `  [runners.autoscaler]
    plugin = "qemu"
    max_instances = %d
    max_growth_rate = 2
    delete_instances_on_shutdown = true
    instance_ready_command = "test -d /proc"
    [runners.autoscaler.plugin_config]
      state_dir = %q
      image_cache_dir = %q
      boot_timeout = %q
`, r.maxInstances, stateDir, cacheDir, boot)
		if r.image != "" {
			fmt.Fprintf(&b, "      image = %q\n", r.image)
		}
		if r.group != "" {
			fmt.Fprintf(&b, "      group = %q\n", r.group)
		}
		if r.memoryMB > 0 {
			fmt.Fprintf(&b, "      memory_mb = %d\n", r.memoryMB)
		}
		if len(r.egressAllow) > 0 {
			fmt.Fprintf(&b, "      egress_allow = [\"%s\"]\n", strings.Join(r.egressAllow, `", "`))
		}
		fmt.Fprintf(&b, `    [runners.autoscaler.connector_config]
      timeout = %q
    [[runners.autoscaler.policy]]
      idle_count = %d
      idle_time = %q
%s`, boot, r.idle, idleTime, r.extra)
	}
	return b.String()
}
