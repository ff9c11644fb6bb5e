package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/plugins/qemu/qemuvm"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/provisioner/image"
)

// Settings are the plugin's Init settings, a JSON object. Unknown keys are
// rejected and every error names its key. Every key is optional, e.g.
//
//	{"group": "linux", "state_dir": "/var/lib/mayfly/qemu",
//	 "image_cache_dir": "/var/cache/mayfly", "memory_mb": 512, "cpus": 1,
//	 "boot_timeout": "60s", "network": "isolated", "accel": "auto",
//	 "max_instances": 4}
type Settings struct {
	// Group names the instance group; VMs live in StateDir/Group/<id>.
	// Default "default".
	Group string `json:"group"`
	// StateDir holds one directory per VM (pid, metadata, console log, the
	// VM's initrd with its host key, the client key). Default
	// $XDG_CACHE_HOME/mayfly/qemu (os.UserCacheDir).
	StateDir string `json:"state_dir"`
	// ImageCacheDir is where the base image is built with image.Build (and
	// found when cached; debs/ holds the kernel package). Default
	// $XDG_CACHE_HOME/mayfly. Excludes Kernel and Initrd.
	ImageCacheDir string `json:"image_cache_dir"`
	// KernelDeb is the linux-image .deb image.Build unpacks; default the
	// newest in ImageCacheDir/debs.
	KernelDeb string `json:"kernel_deb"`
	// Kernel and Initrd are a prebuilt base image (image.Image.Kernel and
	// .Initrd); give both or neither.
	Kernel string `json:"kernel"`
	Initrd string `json:"initrd"`
	// MemoryMB is each VM's memory (default 256, at least 64).
	MemoryMB int `json:"memory_mb"`
	// CPUs is each VM's number of virtual CPUs (default 1, at most 64).
	CPUs int `json:"cpus"`
	// BootTimeout bounds qemu start to the guest's ready marker; a VM not
	// ready by then is killed and listed failed (default 60s).
	BootTimeout providers.Duration `json:"boot_timeout"`
	// Network is "isolated" (default: the guest can open no connection) or
	// "open" (slirp's default; the guest reaches the host's loopback too).
	Network string `json:"network"`
	// Accel is "auto" (default: kvm when /dev/kvm is usable), "kvm" or "tcg".
	Accel string `json:"accel"`
	// MaxInstances caps the VMs of the group (Info.MaxSize); 0: no cap.
	MaxInstances int `json:"max_instances"`
	// QEMU is the qemu-system-x86_64 binary (default from $PATH).
	QEMU string `json:"qemu"`
}

// Defaults for Settings.
const (
	DefaultGroup       = "default"
	DefaultMemoryMB    = 256
	DefaultCPUs        = 1
	DefaultBootTimeout = 60 * time.Second
)

var groupRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// config is validated Settings with the image resolved.
type config struct {
	Settings
	groupDir string // StateDir/Group
	network  qemuvm.Network
	accel    string // "kvm" or "tcg"
	image    *image.Image
}

func keyErr(key string, format string, args ...any) error {
	return providers.InvalidArgument(fmt.Errorf("settings key %q: "+format, append([]any{key}, args...)...))
}

// parseSettings decodes and checks raw settings and applies the defaults.
// It does not touch the image or the state directory.
func parseSettings(raw json.RawMessage) (*config, error) {
	var s Settings
	if err := providers.DecodeSettings(raw, &s); err != nil {
		return nil, err
	}
	c := &config{Settings: s}
	if c.Group == "" {
		c.Group = DefaultGroup
	}
	if !groupRE.MatchString(c.Group) {
		return nil, keyErr("group", "%q: want letters, digits, '.', '_' or '-', at most 63, not starting with a symbol", c.Group)
	}
	cache, cacheErr := os.UserCacheDir()
	var err error
	if c.StateDir == "" {
		if cacheErr != nil {
			return nil, keyErr("state_dir", "not set and no user cache directory: %v", cacheErr)
		}
		c.StateDir = filepath.Join(cache, "mayfly", "qemu")
	}
	if c.StateDir, err = cleanPath("state_dir", c.StateDir); err != nil {
		return nil, err
	}
	c.groupDir = filepath.Join(c.StateDir, c.Group)

	switch {
	case (c.Kernel == "") != (c.Initrd == ""):
		return nil, keyErr("kernel", "give both \"kernel\" and \"initrd\", or neither (then the image is built in \"image_cache_dir\")")
	case c.Kernel != "" && (c.ImageCacheDir != "" || c.KernelDeb != ""):
		return nil, keyErr("kernel", "excludes \"image_cache_dir\" and \"kernel_deb\": give a prebuilt image or the inputs to build one")
	case c.Kernel != "":
		for key, p := range map[string]*string{"kernel": &c.Kernel, "initrd": &c.Initrd} {
			if *p, err = cleanPath(key, *p); err != nil {
				return nil, err
			}
			if _, err := os.Stat(*p); err != nil {
				return nil, keyErr(key, "%v", err)
			}
		}
	default:
		if c.ImageCacheDir == "" {
			if cacheErr != nil {
				return nil, keyErr("image_cache_dir", "not set and no user cache directory: %v", cacheErr)
			}
			c.ImageCacheDir = filepath.Join(cache, "mayfly")
		}
		if c.ImageCacheDir, err = cleanPath("image_cache_dir", c.ImageCacheDir); err != nil {
			return nil, err
		}
		if c.KernelDeb != "" {
			if c.KernelDeb, err = cleanPath("kernel_deb", c.KernelDeb); err != nil {
				return nil, err
			}
		}
	}

	if c.MemoryMB == 0 {
		c.MemoryMB = DefaultMemoryMB
	}
	if c.MemoryMB < 64 || c.MemoryMB > 1<<20 {
		return nil, keyErr("memory_mb", "%d is outside 64..%d", c.MemoryMB, 1<<20)
	}
	if c.CPUs == 0 {
		c.CPUs = DefaultCPUs
	}
	if c.CPUs < 1 || c.CPUs > 64 {
		return nil, keyErr("cpus", "%d is outside 1..64", c.CPUs)
	}
	if c.BootTimeout == 0 {
		c.BootTimeout = providers.Duration(DefaultBootTimeout)
	}
	switch c.Network {
	case "", "isolated":
		c.Network, c.network = "isolated", qemuvm.NetworkIsolated
	case "open":
		c.network = qemuvm.NetworkOpen
	default:
		return nil, keyErr("network", "%q: want \"isolated\" or \"open\"", c.Network)
	}
	switch c.Accel {
	case "", "auto":
		c.Accel, c.accel = "auto", qemuvm.DetectAccel()
	case "kvm":
		if qemuvm.DetectAccel() != "kvm" {
			return nil, keyErr("accel", "\"kvm\" but /dev/kvm cannot be opened read-write; use \"auto\" or \"tcg\"")
		}
		c.accel = "kvm"
	case "tcg":
		c.accel = "tcg"
	default:
		return nil, keyErr("accel", "%q: want \"auto\", \"kvm\" or \"tcg\"", c.Accel)
	}
	if c.MaxInstances < 0 {
		return nil, keyErr("max_instances", "%d is negative", c.MaxInstances)
	}
	if c.QEMU == "" {
		c.QEMU = qemuvm.DefaultQEMU
	}
	if c.QEMU, err = exec.LookPath(c.QEMU); err != nil {
		return nil, keyErr("qemu", "%v (install Debian's qemu-system-x86: scripts/setup-vm.sh)", err)
	}
	return c, nil
}

// cleanPath makes p absolute and rejects what qemu's option syntax cannot carry.
func cleanPath(key, p string) (string, error) {
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", keyErr(key, "%v", err)
	}
	if strings.ContainsAny(abs, ",\n") {
		return "", keyErr(key, "%q must not contain a comma or newline (qemu option syntax)", abs)
	}
	return abs, nil
}

// resolveImage finds or builds the base image.
func (c *config) resolveImage(ctx context.Context, log *slog.Logger) error {
	if c.Kernel != "" {
		c.image = &image.Image{Kernel: c.Kernel, Initrd: c.Initrd}
		return nil
	}
	start := time.Now()
	img, err := image.Build(ctx, image.Options{CacheDir: c.ImageCacheDir, KernelDeb: c.KernelDeb})
	if err != nil {
		if errors.Is(err, image.ErrMissing) {
			return providers.Permanent(fmt.Errorf("settings key %q: base image: %w", "image_cache_dir", err))
		}
		return fmt.Errorf("base image in %s: %w", c.ImageCacheDir, err)
	}
	log.Info("base image", "kernel", img.KernelVersion, "hash", img.Hash, "cached", img.Cached,
		"took", time.Since(start).Round(time.Millisecond).String())
	c.image = img
	return nil
}
