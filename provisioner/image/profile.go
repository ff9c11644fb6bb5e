package image

import (
	"fmt"
	"slices"
	"strings"
)

// Profile names what a base image holds. The qemu plugin's "image" setting
// and `mayfly image build --profile` take these names.
type Profile string

// The image profiles.
const (
	// ProfileBusybox is the default and the fastest to boot: a Debian kernel
	// and an initramfs with busybox and dropbear, nothing else. For jobs
	// that need only a POSIX shell.
	ProfileBusybox Profile = "busybox"
	// ProfileDebian is a Debian rootfs (bash, git, ca-certificates, curl,
	// OpenSSH's sshd) on a virtio-blk disk, booted by a tiny init without
	// systemd. Each VM gets its own copy-on-write overlay of the disk.
	ProfileDebian Profile = "debian"
	// ProfileDebianDocker is ProfileDebian plus Docker Engine from Debian's
	// packages (docker.io, containerd, runc), started at boot; the VM is
	// ready when `docker info` would answer.
	ProfileDebianDocker Profile = "debian-docker"
)

// Profiles lists the profiles, the default first.
var Profiles = []Profile{ProfileBusybox, ProfileDebian, ProfileDebianDocker}

// ParseProfile returns the profile named s; "" is ProfileBusybox.
func ParseProfile(s string) (Profile, error) {
	if s == "" {
		return ProfileBusybox, nil
	}
	if p := Profile(s); slices.Contains(Profiles, p) {
		return p, nil
	}
	names := make([]string, len(Profiles))
	for i, p := range Profiles {
		names[i] = fmt.Sprintf("%q", p)
	}
	return "", fmt.Errorf("image profile %q: want one of %s", s, strings.Join(names, ", "))
}

// HasDisk reports whether VMs of the profile boot from a disk image
// (Image.Disk) rather than from the initramfs alone.
func (p Profile) HasDisk() bool { return p == ProfileDebian || p == ProfileDebianDocker }

// HasDocker reports whether the profile runs Docker Engine.
func (p Profile) HasDocker() bool { return p == ProfileDebianDocker }

// debianPackages are installed on top of mmdebstrap's minbase variant (which
// brings apt, dpkg, coreutils, grep, sed, tar, gzip, util-linux, …).
var debianPackages = []string{
	"bash", "ca-certificates", "curl", "git", "iproute2", "kmod", "openssh-server",
	"procps", "tini", "xz-utils",
}

// dockerPackages are added by ProfileDebianDocker: Debian's Docker Engine
// (iptables comes with it).
var dockerPackages = []string{"docker.io", "containerd", "runc"}

// packages returns the Debian packages of the profile, sorted.
func (p Profile) packages() []string {
	pkgs := slices.Clone(debianPackages)
	if p.HasDocker() {
		pkgs = append(pkgs, dockerPackages...)
	}
	slices.Sort(pkgs)
	return pkgs
}
