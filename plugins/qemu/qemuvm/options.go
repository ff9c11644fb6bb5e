package qemuvm

import (
	"crypto/ed25519"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/provisioner/image"
	"golang.org/x/crypto/ssh"
)

// Options configure one VM. Name, StateDir, Kernel, Initrd and AuthorizedKeys are required.
type Options struct {
	// Name identifies the VM; it becomes the guest hostname (a DNS label).
	Name string
	// StateDir is the VM's own directory; it must not exist yet. Stop removes it.
	StateDir string
	// Kernel and Initrd are the base image (image.Image.Kernel and .Initrd).
	Kernel, Initrd string
	// Disk is the base image's disk (image.Image.Disk, raw), or empty for an
	// image without one. It is only read: the VM boots from DiskFile, a
	// qcow2 overlay backed by it, made in its state directory.
	Disk string
	// AuthorizedKeys may log in to the guest as root.
	AuthorizedKeys []ssh.PublicKey
	// HostKey is the guest's SSH host key; generated when nil. Its public
	// half is in VM.HostKey before the guest boots, for pinning.
	HostKey ed25519.PrivateKey
	// MemoryMB and CPUs size the VM; defaults DefaultMemoryMB and DefaultCPUs.
	MemoryMB, CPUs int
	// BootTimeout bounds the wait for the guest's ready marker; default DefaultBootTimeout.
	BootTimeout time.Duration
	// Network is the guest's network policy; the zero value is NetworkIsolated.
	Network Network
	// EgressAllow are host endpoints the guest may connect to, whatever the
	// Network: the guest reaches each IP:PORT at image.GuestEgressAddr:PORT
	// (10.0.2.2:PORT) through a relay started per connection. Ports must
	// be distinct.
	EgressAllow []netip.AddrPort
	// GuestForwards are further destinations the guest can connect to, each
	// served by a command on the host.
	GuestForwards []GuestForward
	// KernelArgs are appended to DefaultKernelArgs on the kernel command line.
	KernelArgs string
	// QEMU is the qemu binary; default DefaultQEMU from PATH.
	QEMU string
	// QEMUImg makes the disk overlay; default DefaultQEMUImg from PATH.
	QEMUImg string
	// Busybox relays the guest's connections to EgressAllow endpoints
	// (busybox nc, which half-closes as a relay must); default
	// DefaultBusybox from PATH.
	Busybox string
	// Accel is "kvm" or "tcg"; empty picks kvm when /dev/kvm is usable, else tcg.
	Accel string
	// Labels are stored in the metadata file (e.g. the owning manager's identity).
	Labels map[string]string
	// Files are written into the state directory with mode 0600 before qemu
	// starts, e.g. what a later process needs to reach the VM. Keys are
	// plain file names that do not clash with the files qemuvm keeps there.
	Files map[string][]byte
	// Logger receives lifecycle events; default slog.Default().
	Logger *slog.Logger
}

// Network is a guest network policy. Both use qemu's user-mode network
// (slirp): the guest is 10.0.2.15 behind a NAT of its own (no VM shares an L2
// segment with another), and the only inbound path is the SSH forward bound
// to 127.0.0.1. slirp's own address, the guest's gateway, is moved from
// slirp's default 10.0.2.2 to image.GuestGateway (10.0.2.1), so that
// 10.0.2.2 carries only the Options.EgressAllow endpoints.
//
// What a guest can reach was measured with qemu 7.2 / libslirp 4.7
// (TestEgress): slirp maps its own address to the host's 127.0.0.1, so with
// NetworkOpen a guest connecting to 10.0.2.1:PORT reaches any host loopback
// port — other VMs' SSH forwards and the manager. libslirp can disable the
// loopback mapping (disable_host_loopback, used by slirp4netns) but qemu's
// -netdev user does not expose it, so "everything but the host" is not
// expressible in qemu flags alone: NetworkOpen is for trusted guests.
// NetworkIsolated is the hosted fleet's firewall: the allowed endpoints and
// nothing else.
type Network int

const (
	// NetworkIsolated (restrict=on): the guest can open no connection and
	// send no packet out (no DNS, no host loopback, no other VM, no
	// link-local address) except to its EgressAllow endpoints and
	// GuestForwards; the SSH forward from the host still works. The default.
	NetworkIsolated Network = iota
	// NetworkOpen is slirp's default: the guest reaches whatever the host
	// reaches (DNS through 10.0.2.3), INCLUDING every 127.0.0.1 port on the
	// host through 10.0.2.1, so other VMs' SSH forwards. Only for trusted
	// guests or behind a host firewall.
	NetworkOpen
)

// String returns the policy's name.
func (n Network) String() string {
	switch n {
	case NetworkIsolated:
		return "isolated"
	case NetworkOpen:
		return "open"
	}
	return "Network(" + strconv.Itoa(int(n)) + ")"
}

// GuestForward lets the guest connect to GuestAddr (an address in
// 10.0.2.0/24 that is not .1, .2, .3 or .15, e.g. 10.0.2.100:3128); each
// connection starts Command on the host with the connection on its stdin and
// stdout (qemu's guestfwd "cmd:"), e.g. a relay to an egress proxy that
// refuses loopback and private destinations.
type GuestForward struct {
	GuestAddr string
	Command   string
}

func (o *Options) validate() error {
	if o.Name == "" {
		return errors.New("vm options: Name is required")
	}
	if o.StateDir == "" {
		return fmt.Errorf("vm %s options: StateDir is required", o.Name)
	}
	abs, err := filepath.Abs(o.StateDir)
	if err != nil {
		return fmt.Errorf("vm %s options: StateDir: %w", o.Name, err)
	}
	o.StateDir = abs
	for field, p := range map[string]string{"StateDir": o.StateDir, "Kernel": o.Kernel, "Initrd": o.Initrd} {
		if p == "" {
			return fmt.Errorf("vm %s options: %s is required", o.Name, field)
		}
		if strings.ContainsAny(p, ",\n") {
			return fmt.Errorf("vm %s options: %s %q must not contain a comma or newline (qemu option syntax)", o.Name, field, p)
		}
	}
	paths := map[string]string{"Kernel": o.Kernel, "Initrd": o.Initrd}
	if o.Disk != "" {
		paths["Disk"] = o.Disk
	}
	for field, p := range paths {
		if strings.ContainsAny(p, ",\n") {
			return fmt.Errorf("vm %s options: %s %q must not contain a comma or newline (qemu option syntax)", o.Name, field, p)
		}
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("vm %s options: %s: %w (run `mayfly image build`)", o.Name, field, err)
		}
	}
	if o.Disk != "" {
		if o.QEMUImg == "" {
			o.QEMUImg = DefaultQEMUImg
		}
		if o.QEMUImg, err = exec.LookPath(o.QEMUImg); err != nil {
			return fmt.Errorf("vm %s options: QEMUImg: %w (install Debian's qemu-utils)", o.Name, err)
		}
	}
	if o.MemoryMB == 0 {
		o.MemoryMB = DefaultMemoryMB
	}
	if o.MemoryMB < 64 {
		return fmt.Errorf("vm %s options: MemoryMB %d is below 64", o.Name, o.MemoryMB)
	}
	if o.CPUs == 0 {
		o.CPUs = DefaultCPUs
	}
	if o.CPUs < 1 || o.CPUs > 64 {
		return fmt.Errorf("vm %s options: CPUs %d is outside 1..64", o.Name, o.CPUs)
	}
	if o.BootTimeout == 0 {
		o.BootTimeout = DefaultBootTimeout
	}
	if strings.ContainsAny(o.KernelArgs, "\n\x00") {
		return fmt.Errorf("vm %s options: KernelArgs %q must be one line", o.Name, o.KernelArgs)
	}
	if o.BootTimeout < 0 {
		return fmt.Errorf("vm %s options: BootTimeout %v is negative", o.Name, o.BootTimeout)
	}
	if o.Network != NetworkIsolated && o.Network != NetworkOpen {
		return fmt.Errorf("vm %s options: Network %v is unknown", o.Name, o.Network)
	}
	ports := make(map[uint16]int)
	for i, ap := range o.EgressAllow {
		if err := validEgress(ap); err != nil {
			return fmt.Errorf("vm %s options: EgressAllow[%d]: %w", o.Name, i, err)
		}
		if j, dup := ports[ap.Port()]; dup {
			return fmt.Errorf("vm %s options: EgressAllow[%d] %v: port %d is taken by EgressAllow[%d] %v (the guest sees both at %s:%d)",
				o.Name, i, ap, ap.Port(), j, o.EgressAllow[j], image.GuestEgressAddr, ap.Port())
		}
		ports[ap.Port()] = i
	}
	if len(o.EgressAllow) > 0 {
		if o.Busybox == "" {
			o.Busybox = DefaultBusybox
		}
		if o.Busybox, err = exec.LookPath(o.Busybox); err != nil {
			return fmt.Errorf("vm %s options: Busybox (the egress relay): %w (install Debian's busybox-static)", o.Name, err)
		}
		if strings.ContainsAny(o.Busybox, ", \n") {
			return fmt.Errorf("vm %s options: Busybox %q must not contain a comma, space or newline", o.Name, o.Busybox)
		}
	}
	for i, f := range o.GuestForwards {
		if err := f.validate(); err != nil {
			return fmt.Errorf("vm %s options: GuestForwards[%d]: %w", o.Name, i, err)
		}
	}
	if o.QEMU == "" {
		o.QEMU = DefaultQEMU
	}
	switch o.Accel {
	case "":
		o.Accel = DetectAccel()
	case "kvm", "tcg":
	default:
		return fmt.Errorf("vm %s options: Accel %q: want kvm or tcg", o.Name, o.Accel)
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	for name := range o.Files {
		if name == "" || name != filepath.Base(name) || name == "." || name == ".." || reservedFiles[name] ||
			strings.HasSuffix(name, ".tmp") {
			return fmt.Errorf("vm %s options: Files[%q]: want a plain file name other than %s", o.Name, name, reservedList())
		}
	}
	if o.HostKey == nil {
		if o.HostKey, err = image.NewHostKey(); err != nil {
			return fmt.Errorf("vm %s: %w", o.Name, err)
		}
	}
	if err := o.identity().Validate(); err != nil {
		return fmt.Errorf("vm %s options: %w", o.Name, err)
	}
	return nil
}

func (o *Options) identity() image.Identity {
	return image.Identity{Hostname: o.Name, HostKey: o.HostKey, AuthorizedKeys: o.AuthorizedKeys}
}

func (f GuestForward) validate() error {
	host, port, err := net.SplitHostPort(f.GuestAddr)
	if err != nil {
		return fmt.Errorf("GuestAddr %q: %w", f.GuestAddr, err)
	}
	ip := net.ParseIP(host)
	_, guestNet, _ := net.ParseCIDR("10.0.2.0/24")
	if ip == nil || !guestNet.Contains(ip) || host == image.GuestGateway || host == image.GuestEgressAddr ||
		host == image.GuestDNS || host == "10.0.2.15" {
		return fmt.Errorf("GuestAddr %q: want an unused address in 10.0.2.0/24 (not .1, .2, .3 or .15)", f.GuestAddr)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("GuestAddr %q: bad port", f.GuestAddr)
	}
	if f.Command == "" || strings.ContainsAny(f.Command, ",\n") {
		return fmt.Errorf("Command %q: want a non-empty command without commas or newlines", f.Command)
	}
	return nil
}

// validEgress checks one allowed host endpoint.
func validEgress(ap netip.AddrPort) error {
	switch {
	case !ap.IsValid() || ap.Addr().Zone() != "":
		return fmt.Errorf("%v: want IP:PORT", ap)
	case ap.Port() == 0:
		return fmt.Errorf("%v: port 0", ap)
	case ap.Addr().IsUnspecified() || ap.Addr().IsMulticast():
		return fmt.Errorf("%v: not a host address", ap)
	}
	return nil
}
