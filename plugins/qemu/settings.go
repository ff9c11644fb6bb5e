package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
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
//	 "image": "debian-docker", "image_cache_dir": "/var/cache/mayfly",
//	 "memory_mb": 1024, "cpus": 1, "boot_timeout": "120s",
//	 "egress": "isolated", "egress_allow": ["127.0.0.1:8929"],
//	 "accel": "auto", "max_instances": 4}
type Settings struct {
	// Group names the instance group; VMs live in StateDir/Group/<id>.
	// Default "default".
	Group string `json:"group"`
	// StateDir holds one directory per VM (pid, metadata, console log, the
	// VM's initrd with its host key, the client key). Default
	// $XDG_CACHE_HOME/mayfly/qemu (os.UserCacheDir).
	StateDir string `json:"state_dir"`
	// Image is the image profile VMs boot (see provisioner/image):
	// "busybox" (the default: busybox and dropbear in an initramfs, the
	// fastest boot), "debian" (a Debian rootfs with bash, git, curl and
	// OpenSSH on a disk; each VM writes to its own copy-on-write overlay) or
	// "debian-docker" (debian plus Docker Engine, ready when Docker answers).
	// The plugin builds a missing busybox image itself (seconds); a Debian
	// one must be built beforehand with `mayfly image build --profile NAME`
	// (as root; minutes).
	Image string `json:"image"`
	// ImageCacheDir is where the base image is built with image.Build (and
	// found when cached; debs/ holds the kernel package). Default
	// $XDG_CACHE_HOME/mayfly. Excludes Kernel and Initrd.
	ImageCacheDir string `json:"image_cache_dir"`
	// KernelDeb is the linux-image .deb image.Build unpacks; default the
	// newest in ImageCacheDir/debs.
	KernelDeb string `json:"kernel_deb"`
	// Kernel and Initrd are a prebuilt base image (image.Image.Kernel and
	// .Initrd); give both or neither, and Disk too for a Debian image.
	Kernel string `json:"kernel"`
	Initrd string `json:"initrd"`
	Disk   string `json:"disk"`
	// MemoryMB is each VM's memory (at least 64; default 256 for busybox,
	// 512 for debian, 1024 for debian-docker).
	MemoryMB int `json:"memory_mb"`
	// CPUs is each VM's number of virtual CPUs (default 1, at most 64).
	CPUs int `json:"cpus"`
	// BootTimeout bounds qemu start to the guest's ready marker; a VM not
	// ready by then is killed and listed failed (default 60s).
	BootTimeout providers.Duration `json:"boot_timeout"`
	// Egress is what a VM may connect to, as the hosted fleet's firewall
	// has it: "isolated" (the default: only the EgressAllow endpoints; no
	// other host port, no other VM, no DNS, no link-local address, nothing
	// outside) or "open" (everything the host reaches, including the host's
	// own loopback ports: only for trusted jobs).
	Egress string `json:"egress"`
	// Network is the old name of Egress.
	Network string `json:"network"`
	// EgressAllow are host endpoints "IP:PORT" every VM may connect to,
	// e.g. the coordinator's "127.0.0.1:8929": the guest reaches each at
	// 10.0.2.2:PORT (so a GitLab whose external URL is
	// http://10.0.2.2:8929 is reachable from jobs). Ports must be distinct.
	EgressAllow []string `json:"egress_allow"`
	// Accel is "auto" (default: kvm when /dev/kvm is usable), "kvm" or "tcg".
	Accel string `json:"accel"`
	// MaxInstances caps the VMs of the group (Info.MaxSize); 0: no cap.
	MaxInstances int `json:"max_instances"`
	// QEMU is the qemu-system-x86_64 binary (default from $PATH).
	QEMU string `json:"qemu"`
	// QEMUImg is the qemu-img binary that makes each Debian VM's disk
	// overlay (default from $PATH).
	QEMUImg string `json:"qemu_img"`
}

// Defaults for Settings.
const (
	DefaultGroup       = "default"
	DefaultMemoryMB    = 256
	DefaultCPUs        = 1
	DefaultBootTimeout = 60 * time.Second
)

// defaultMemoryMB is each profile's default memory_mb.
var defaultMemoryMB = map[image.Profile]int{
	image.ProfileBusybox:      DefaultMemoryMB,
	image.ProfileDebian:       512,
	image.ProfileDebianDocker: 1024,
}

var groupRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// config is validated Settings with the image resolved.
type config struct {
	Settings
	groupDir string // StateDir/Group
	profile  image.Profile
	network  qemuvm.Network
	allow    []netip.AddrPort
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
	if c.profile, err = image.ParseProfile(c.Image); err != nil {
		return nil, keyErr("image", "%v", err)
	}
	c.Image = string(c.profile)

	switch {
	case (c.Kernel == "") != (c.Initrd == ""):
		return nil, keyErr("kernel", "give both \"kernel\" and \"initrd\", or neither (then the image is built in \"image_cache_dir\")")
	case c.Kernel != "" && (c.ImageCacheDir != "" || c.KernelDeb != ""):
		return nil, keyErr("kernel", "excludes \"image_cache_dir\" and \"kernel_deb\": give a prebuilt image or the inputs to build one")
	case c.Disk != "" && c.Kernel == "":
		return nil, keyErr("disk", "a prebuilt disk needs \"kernel\" and \"initrd\" of the same image")
	case c.Kernel != "" && c.profile.HasDisk() != (c.Disk != ""):
		if c.Disk == "" {
			return nil, keyErr("disk", "image %q boots from a disk: give the prebuilt image's \"disk\" with \"kernel\" and \"initrd\"", c.Image)
		}
		return nil, keyErr("disk", "image %q has no disk; set \"image\" to the prebuilt image's profile", c.Image)
	case c.Kernel != "":
		paths := map[string]*string{"kernel": &c.Kernel, "initrd": &c.Initrd}
		if c.Disk != "" {
			paths["disk"] = &c.Disk
		}
		for key, p := range paths {
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
		c.MemoryMB = defaultMemoryMB[c.profile]
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
	key := "egress"
	switch {
	case c.Egress == "" && c.Network != "":
		c.Egress, key = c.Network, "network"
	case c.Network != "" && c.Network != c.Egress:
		return nil, keyErr("network", "%q contradicts \"egress\" %q (\"network\" is the old name of \"egress\": give one)", c.Network, c.Egress)
	}
	switch c.Egress {
	case "", "isolated":
		c.Egress, c.network = "isolated", qemuvm.NetworkIsolated
	case "open":
		c.network = qemuvm.NetworkOpen
	default:
		return nil, keyErr(key, "%q: want \"isolated\" or \"open\"", c.Egress)
	}
	c.Network = c.Egress
	ports := make(map[uint16]string)
	for i, a := range c.EgressAllow {
		ap, err := netip.ParseAddrPort(a)
		if err == nil {
			ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		}
		switch {
		case err != nil:
			return nil, keyErr("egress_allow", "[%d] %q: want IP:PORT, e.g. \"127.0.0.1:8929\" or \"[::1]:8929\": %v", i, a, err)
		case ap.Port() == 0 || ap.Addr().IsUnspecified() || ap.Addr().IsMulticast() || ap.Addr().Zone() != "":
			return nil, keyErr("egress_allow", "[%d] %q: want a host address and a port other than 0", i, a)
		case ports[ap.Port()] != "":
			return nil, keyErr("egress_allow", "[%d] %q: port %d is taken by %q (the guest sees both at %s:%d)",
				i, a, ap.Port(), ports[ap.Port()], image.GuestEgressAddr, ap.Port())
		}
		ports[ap.Port()] = a
		c.allow = append(c.allow, ap)
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
	if c.profile.HasDisk() || c.QEMUImg != "" {
		if c.QEMUImg == "" {
			c.QEMUImg = qemuvm.DefaultQEMUImg
		}
		if c.QEMUImg, err = exec.LookPath(c.QEMUImg); err != nil {
			return nil, keyErr("qemu_img", "%v (install Debian's qemu-utils: scripts/setup-vm.sh)", err)
		}
	}
	if len(c.allow) > 0 {
		if _, err := exec.LookPath(qemuvm.DefaultBusybox); err != nil {
			return nil, keyErr("egress_allow", "needs busybox on the host as the relay: %v (install Debian's busybox-static: scripts/setup-vm.sh)", err)
		}
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
		c.image = &image.Image{Profile: c.profile, Kernel: c.Kernel, Initrd: c.Initrd, Disk: c.Disk}
		return nil
	}
	start := time.Now()
	opts := image.Options{CacheDir: c.ImageCacheDir, KernelDeb: c.KernelDeb, Profile: c.profile}
	var (
		img *image.Image
		err error
	)
	if c.profile.HasDisk() {
		// Minutes to build, as root: never inside an Init call.
		img, err = image.Lookup(ctx, opts)
	} else {
		img, err = image.Build(ctx, opts)
	}
	if err != nil {
		if errors.Is(err, image.ErrMissing) || errors.Is(err, image.ErrNotBuilt) {
			return providers.Permanent(fmt.Errorf("settings key %q: %s image: %w", "image", c.profile, err))
		}
		return fmt.Errorf("%s image in %s: %w", c.profile, c.ImageCacheDir, err)
	}
	log.Info("base image", "profile", img.Profile, "kernel", img.KernelVersion, "hash", img.Hash, "cached", img.Cached,
		"took", time.Since(start).Round(time.Millisecond).String())
	c.image = img
	return nil
}
