// Package qemuvm starts and stops one local qemu microVM booted from a mayfly
// base image (provisioner/image) with its own SSH identity, user-mode
// networking and SSH forwarded from a 127.0.0.1 port. A Debian image's disk
// is never written: each VM boots from its own copy-on-write overlay of it.
// Each VM keeps a state directory (pid file, metadata, console log, disk
// overlay) so a later process can find and stop VMs it did not start.
package qemuvm

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/provisioner/image"
)

// Files in a VM's state directory.
const (
	PIDFile      = "qemu.pid"
	MetadataFile = "vm.json"
	ConsoleFile  = "console.log"
	QEMULogFile  = "qemu.log"
	initrdFile   = "initrd.gz"
	// DiskFile is the VM's copy-on-write overlay (qcow2) of Options.Disk.
	DiskFile = "disk.qcow2"
)

// reservedFiles are the state directory's own files, not allowed in Options.Files.
var reservedFiles = map[string]bool{PIDFile: true, MetadataFile: true, ConsoleFile: true, QEMULogFile: true, initrdFile: true, DiskFile: true}

func reservedList() string {
	names := slices.Sorted(maps.Keys(reservedFiles))
	return strings.Join(names, ", ")
}

// Defaults for Options.
const (
	DefaultMemoryMB    = 256
	DefaultCPUs        = 1
	DefaultBootTimeout = 90 * time.Second
	DefaultQEMU        = "qemu-system-x86_64"
	DefaultQEMUImg     = "qemu-img"
	DefaultBusybox     = "busybox"
)

// DefaultKernelArgs is the guest kernel's command line: the serial console
// (the ready marker), a quiet boot, and power-off on a panic (with
// -no-reboot qemu then exits at once).
const DefaultKernelArgs = "console=ttyS0 quiet panic=-1"

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

// VM is one started VM, or one found through its state directory.
type VM struct {
	// Name is Options.Name.
	Name string `json:"name"`
	// StateDir is the VM's state directory.
	StateDir string `json:"state_dir"`
	// PID is the qemu process (also its process group).
	PID int `json:"pid"`
	// SSHAddr is the host address forwarded to the guest's port 22, 127.0.0.1:port.
	SSHAddr string `json:"ssh_addr"`
	// HostKey is the guest's SSH host key, known before boot, to pin.
	HostKey ssh.PublicKey `json:"-"`
	// Accel is the accelerator in use, "kvm" or "tcg".
	Accel string `json:"accel"`
	// Network is the network policy.
	Network string `json:"network"`
	// Labels are Options.Labels.
	Labels map[string]string `json:"labels,omitempty"`
	// StartedAt is when qemu was started.
	StartedAt time.Time `json:"started_at"`
	// BootDeadline is when the guest must be ready (StartedAt plus
	// Options.BootTimeout); Check enforces it for VMs found with Open.
	BootDeadline time.Time `json:"boot_deadline"`
	// ReadyAfter is the time from qemu start to the ready marker.
	ReadyAfter time.Duration `json:"ready_after_ns,omitempty"`
	// FailReason is set when the boot failed (see Check).
	FailReason string `json:"fail_reason,omitempty"`

	HostKeyLine string `json:"host_key"` // authorized_keys form of HostKey

	log    *slog.Logger
	exited chan struct{} // closed when our own child exits; nil for a found VM
}

// Errors a BootError wraps.
var (
	// ErrBootTimeout: no ready marker within Options.BootTimeout.
	ErrBootTimeout = errors.New("boot timeout: no ready marker")
	// ErrExited: qemu exited before the guest was ready.
	ErrExited = errors.New("qemu exited before the guest was ready")
	// ErrGuestFailed: the guest's /init reported a failure.
	ErrGuestFailed = errors.New("guest init failed")
)

// BootError is returned by Start when the VM did not become ready. The VM has
// been killed and its state directory removed.
type BootError struct {
	Name  string
	PID   int   // the qemu process, already killed
	Cause error // ErrBootTimeout, ErrExited, ErrGuestFailed or the context's error
	After time.Duration
	// Reason is a one-line summary: the cause, the time, and the last line
	// qemu or the guest's /init printed (as VM.FailReason).
	Reason string
	// Detail is the tail of the console log and of qemu's own output.
	Detail string
}

func (e *BootError) Error() string {
	msg := fmt.Sprintf("boot vm %s: %v after %v", e.Name, e.Cause, e.After.Round(time.Millisecond))
	if e.Detail != "" {
		msg += ":\n" + e.Detail
	}
	return msg
}

// Unwrap returns the cause.
func (e *BootError) Unwrap() error { return e.Cause }

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

// DetectAccel returns "kvm" when /dev/kvm can be opened read-write, else "tcg".
func DetectAccel() string {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return "tcg"
	}
	f.Close()
	return "kvm"
}

// Start boots a VM and waits, at most Options.BootTimeout, for the guest to
// print image.ReadyMarker on its console (after dropbear listens). On any
// failure the VM is killed, its state directory removed, and the error is a
// *BootError (or an options error). The VM outlives ctx and the calling
// process: stop it with Stop. Start is Launch followed by WaitReady.
func Start(ctx context.Context, opts Options) (*VM, error) {
	vm, err := Launch(ctx, opts)
	if err != nil {
		return nil, err
	}
	if err := vm.WaitReady(ctx); err != nil {
		be, ok := errors.AsType[*BootError](err)
		if !ok { // ctx ended: WaitReady left the VM alone
			be = vm.failBoot(err)
		}
		_ = os.RemoveAll(vm.StateDir)
		return nil, be
	}
	return vm, nil
}

// Launch starts a VM's qemu process and returns as soon as qemu listens on
// the SSH forward, without waiting for the guest: call WaitReady for that,
// or Check from any process later. The boot deadline (now plus
// Options.BootTimeout) is recorded in the metadata. On failure nothing is
// left behind: the process is killed, the state directory removed, and the
// error is a *BootError (or an options error).
func Launch(ctx context.Context, opts Options) (*VM, error) {
	if err := opts.validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(opts.StateDir), 0o755); err != nil {
		return nil, fmt.Errorf("start vm %s: %w", opts.Name, err)
	}
	if err := os.Mkdir(opts.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("start vm %s: state dir: %w", opts.Name, err)
	}
	id := opts.identity()
	hostPub, err := id.HostPublicKey()
	if err == nil {
		err = writeFiles(opts.StateDir, opts.Files)
	}
	if err == nil {
		err = image.WriteInstanceInitrd(filepath.Join(opts.StateDir, initrdFile), opts.Initrd, id)
	}
	if err == nil && opts.Disk != "" {
		err = diskOverlay(ctx, opts)
	}
	if err != nil {
		os.RemoveAll(opts.StateDir)
		return nil, fmt.Errorf("start vm %s: %w", opts.Name, err)
	}
	// A free port can be taken by someone else before qemu binds it; qemu
	// then exits at once with a hostfwd error and we try another port.
	const attempts = 3
	for attempt := 1; ; attempt++ {
		vm, err := launch(ctx, opts, hostPub)
		if err != nil && attempt < attempts && errors.Is(err, ErrExited) {
			if be, ok := errors.AsType[*BootError](err); ok && strings.Contains(be.Detail, "host forwarding rule") {
				opts.Logger.Warn("ssh forward port taken, retrying", "vm", opts.Name, "attempt", attempt)
				continue
			}
		}
		if err != nil {
			os.RemoveAll(opts.StateDir)
		}
		return vm, err
	}
}

// diskOverlay makes the VM's copy-on-write overlay of the base disk.
func diskOverlay(ctx context.Context, opts Options) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	dst := filepath.Join(opts.StateDir, DiskFile)
	out, err := exec.CommandContext(ctx, opts.QEMUImg, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", opts.Disk, dst).CombinedOutput()
	if err != nil {
		return fmt.Errorf("disk overlay: %s create %s: %w: %s", opts.QEMUImg, dst, err, bytes.TrimSpace(out))
	}
	return os.Chmod(dst, 0o600)
}

// writeFiles writes Options.Files into the state directory, mode 0600.
func writeFiles(dir string, files map[string][]byte) error {
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return fmt.Errorf("write %s: %w", name, err)
		}
	}
	return nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Args returns the qemu command line (without the binary) for a VM whose SSH
// is forwarded from 127.0.0.1:sshPort. It is exported for inspection and docs.
func (o Options) Args(sshPort int) []string {
	cpu := "max"
	if o.Accel == "kvm" {
		cpu = "host"
	}
	netdev := "user,id=n0,ipv6=off,net=10.0.2.0/24,host=" + image.GuestGateway +
		",hostfwd=tcp:127.0.0.1:" + strconv.Itoa(sshPort) + "-:22"
	if o.Network == NetworkIsolated {
		netdev += ",restrict=on"
	}
	for _, ap := range o.EgressAllow {
		// One relay process per guest connection (slirp's "cmd:" forward).
		netdev += fmt.Sprintf(",guestfwd=tcp:%s:%d-cmd:%s nc -w 10 %s %d",
			image.GuestEgressAddr, ap.Port(), o.Busybox, ap.Addr().Unmap(), ap.Port())
	}
	for _, f := range o.GuestForwards {
		netdev += ",guestfwd=tcp:" + f.GuestAddr + "-cmd:" + f.Command
	}
	args := []string{
		"-name", "mayfly-" + o.Name,
		"-M", "pc",
		"-accel", o.Accel,
		"-cpu", cpu,
		"-m", strconv.Itoa(o.MemoryMB),
		"-smp", strconv.Itoa(o.CPUs),
		"-nodefaults", "-no-user-config",
		"-display", "none",
		"-monitor", "none",
		"-serial", "file:" + filepath.Join(o.StateDir, ConsoleFile),
		"-kernel", o.Kernel,
		"-initrd", filepath.Join(o.StateDir, initrdFile),
		"-append", strings.TrimSpace(DefaultKernelArgs + " " + o.KernelArgs),
		"-netdev", netdev,
		// romfile= skips the iPXE option ROM: nothing boots from the network.
		"-device", "virtio-net-pci,netdev=n0,romfile=",
		"-no-reboot",
	}
	if o.Disk != "" {
		// cache=unsafe: the overlay lives as long as the VM, so the guest's
		// flushes need not reach the host's disk.
		args = append(args,
			"-drive", "file="+filepath.Join(o.StateDir, DiskFile)+",if=none,id=d0,format=qcow2,cache=unsafe,discard=unmap",
			"-device", "virtio-blk-pci,drive=d0,romfile=")
	}
	return args
}

// launch starts qemu once and waits until it listens on the SSH forward.
func launch(ctx context.Context, opts Options, hostPub ssh.PublicKey) (*VM, error) {
	port, err := freePort()
	if err != nil {
		return nil, fmt.Errorf("start vm %s: pick ssh port: %w", opts.Name, err)
	}
	for _, f := range []string{ConsoleFile, QEMULogFile, PIDFile, MetadataFile} {
		os.Remove(filepath.Join(opts.StateDir, f)) // from a failed attempt
	}
	qlog, err := os.OpenFile(filepath.Join(opts.StateDir, QEMULogFile), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("start vm %s: %w", opts.Name, err)
	}
	defer qlog.Close()
	// Not exec.CommandContext: the VM must outlive ctx (and this process).
	cmd := exec.Command(opts.QEMU, opts.Args(port)...)
	cmd.Stdout, cmd.Stderr = qlog, qlog
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	started := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start vm %s: %w", opts.Name, err)
	}
	vm := &VM{
		Name:         opts.Name,
		StateDir:     opts.StateDir,
		PID:          cmd.Process.Pid,
		SSHAddr:      net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		HostKey:      hostPub,
		HostKeyLine:  strings.TrimSpace(string(ssh.MarshalAuthorizedKey(hostPub))),
		Accel:        opts.Accel,
		Network:      opts.Network.String(),
		Labels:       opts.Labels,
		StartedAt:    started,
		BootDeadline: started.Add(opts.BootTimeout),
		log:          opts.Logger,
		exited:       make(chan struct{}),
	}
	go func() { // owned by vm: ends when qemu exits, which Stop guarantees
		_ = cmd.Wait()
		close(vm.exited)
	}()
	if err := vm.writeState(); err != nil {
		return nil, vm.failBoot(err)
	}
	vm.log.Info("vm starting", "vm", vm.Name, "pid", vm.PID, "ssh", vm.SSHAddr, "accel", opts.Accel, "network", opts.Network.String())

	// qemu sets up its network backends, and so the forward, before it
	// loads the kernel; until it listens the SSH address is not usable.
	watchdog := time.NewTimer(opts.BootTimeout)
	defer watchdog.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	want := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(port))
	for {
		select {
		case <-ctx.Done():
			return nil, vm.failBoot(ctx.Err())
		case <-watchdog.C:
			return nil, vm.failBoot(ErrBootTimeout)
		case <-vm.exited:
			return nil, vm.failBoot(ErrExited)
		case <-tick.C:
		}
		addrs, err := ListeningTCP(vm.PID)
		if err == nil && slices.Contains(addrs, want) {
			return vm, nil
		}
	}
}

// WaitReady waits until the guest prints image.ReadyMarker, and records the
// time it took in the metadata. When the boot deadline passes first, qemu
// exits, or the guest reports a failure, WaitReady kills qemu, records the
// reason in the metadata (see Check) and returns a *BootError; the state
// directory stays for the caller to remove. When ctx ends first it returns
// ctx's error and leaves the VM alone (a later Check or WaitReady decides).
func (vm *VM) WaitReady(ctx context.Context) error {
	watchdog := time.NewTimer(time.Until(vm.BootDeadline))
	defer watchdog.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	exited := vm.exited
	if exited == nil { // found with Open: poll the process instead
		exited = make(chan struct{})
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-watchdog.C:
			return vm.failBoot(ErrBootTimeout)
		case <-exited:
			return vm.failBoot(ErrExited)
		case <-tick.C:
		}
		switch markers(vm.StateDir) {
		case markerFailed:
			return vm.failBoot(ErrGuestFailed)
		case markerReady:
			vm.ReadyAfter = time.Since(vm.StartedAt)
			if err := vm.writeState(); err != nil {
				return vm.failBoot(err)
			}
			vm.log.Info("vm ready", "vm", vm.Name, "pid", vm.PID, "after", vm.ReadyAfter.Round(time.Millisecond).String())
			return nil
		}
		if vm.exited == nil && !vm.Running() {
			return vm.failBoot(ErrExited)
		}
	}
}

type marker int

const (
	markerNone marker = iota
	markerReady
	markerFailed
)

// markers reports which boot marker the console log of the VM in dir holds.
func markers(dir string) marker {
	b, _ := os.ReadFile(filepath.Join(dir, ConsoleFile))
	switch {
	case bytes.Contains(b, []byte(image.FailedMarker)):
		return markerFailed
	case bytes.Contains(b, []byte(image.ReadyMarker)):
		return markerReady
	}
	return markerNone
}

// failBoot kills the VM after a failed boot, records why in its metadata and
// returns the error describing it.
func (vm *VM) failBoot(cause error) *BootError {
	after := time.Since(vm.StartedAt)
	stopCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := vm.kill(stopCtx); err != nil {
		vm.log.Error("kill vm after failed boot", "vm", vm.Name, "pid", vm.PID, "err", err)
	}
	detail := tail(filepath.Join(vm.StateDir, ConsoleFile), 15) + tail(filepath.Join(vm.StateDir, QEMULogFile), 5)
	vm.FailReason = fmt.Sprintf("%v after %v", cause, after.Round(time.Millisecond))
	if last := vm.lastOutput(); last != "" {
		vm.FailReason += ": " + last
	}
	if _, err := os.Stat(vm.StateDir); err == nil {
		if err := vm.writeState(); err != nil {
			vm.log.Warn("record failed boot", "vm", vm.Name, "err", err)
		}
	}
	vm.log.Warn("vm boot failed", "vm", vm.Name, "pid", vm.PID, "cause", cause, "after", after.Round(time.Millisecond).String())
	return &BootError{Name: vm.Name, PID: vm.PID, Cause: cause, After: after, Reason: vm.FailReason,
		Detail: strings.TrimSpace(detail)}
}

// lastOutput returns the last line /init or qemu printed, for a short
// failure reason.
func (vm *VM) lastOutput() string {
	for _, f := range []string{QEMULogFile, ConsoleFile} {
		b, _ := os.ReadFile(filepath.Join(vm.StateDir, f))
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		for i := len(lines) - 1; i >= 0; i-- {
			l := strings.TrimSpace(lines[i])
			if f == ConsoleFile && !strings.HasPrefix(l, "mayfly-init:") {
				continue
			}
			if l != "" {
				if len(l) > 200 {
					l = l[:200]
				}
				return l
			}
		}
	}
	return ""
}

// Condition is what a VM's metadata, process and console log say about it.
type Condition string

// Conditions reported by Check.
const (
	// Booting: qemu runs, the guest is not ready yet, the deadline is ahead.
	Booting Condition = "booting"
	// Ready: qemu runs and the guest printed the ready marker.
	Ready Condition = "ready"
	// Failed: the boot failed or timed out, or qemu is gone.
	Failed Condition = "failed"
)

// Check tells whether the VM is booting, ready or failed, and why it
// failed. It works on a VM found with Open, e.g. by a process that did not
// start it. A Failed VM whose qemu still runs (a passed boot deadline
// nobody enforced) should be stopped by the caller, e.g. with Fail.
func (vm *VM) Check() (Condition, string) {
	if vm.FailReason != "" {
		return Failed, vm.FailReason
	}
	running := vm.Running()
	switch m := markers(vm.StateDir); {
	case m == markerFailed:
		reason := ErrGuestFailed.Error()
		if last := vm.lastOutput(); last != "" {
			reason += ": " + last
		}
		return Failed, reason
	case (m == markerReady || vm.ReadyAfter > 0) && running:
		return Ready, ""
	case m == markerReady || vm.ReadyAfter > 0:
		return Failed, fmt.Sprintf("qemu (pid %d) exited after the guest was ready", vm.PID)
	case !running:
		reason := fmt.Sprintf("%v (pid %d)", ErrExited, vm.PID)
		if last := vm.lastOutput(); last != "" {
			reason += ": " + last
		}
		return Failed, reason
	case !vm.BootDeadline.IsZero() && time.Now().After(vm.BootDeadline):
		return Failed, fmt.Sprintf("%v by %s", ErrBootTimeout, vm.BootDeadline.Format(time.RFC3339))
	}
	return Booting, ""
}

// Fail kills the VM's qemu and records reason in its metadata, so that Check
// reports it failed from then on. The state directory stays.
func (vm *VM) Fail(ctx context.Context, reason string) error {
	if err := vm.kill(ctx); err != nil {
		return err
	}
	vm.FailReason = reason
	if err := vm.writeState(); err != nil {
		return fmt.Errorf("fail vm %s: %w", vm.Name, err)
	}
	vm.log.Warn("vm failed", "vm", vm.Name, "pid", vm.PID, "reason", reason)
	return nil
}

// writeState writes the pid file and the metadata file, each atomically.
func (vm *VM) writeState() error {
	meta, err := json.MarshalIndent(vm, "", "  ")
	if err != nil {
		return fmt.Errorf("vm %s metadata: %w", vm.Name, err)
	}
	for name, data := range map[string][]byte{
		PIDFile:      []byte(strconv.Itoa(vm.PID) + "\n"),
		MetadataFile: meta,
	} {
		p := filepath.Join(vm.StateDir, name)
		if err := os.WriteFile(p+".tmp", data, 0o600); err != nil {
			return fmt.Errorf("vm %s: %w", vm.Name, err)
		}
		if err := os.Rename(p+".tmp", p); err != nil {
			return fmt.Errorf("vm %s: %w", vm.Name, err)
		}
	}
	return nil
}

// tail returns the last n lines of a file, prefixed with its name.
func tail(p string, n int) string {
	b, err := os.ReadFile(p)
	if err != nil || len(bytes.TrimSpace(b)) == 0 {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "--- " + filepath.Base(p) + "\n" + strings.Join(lines, "\n") + "\n"
}

// Open finds the VM whose state directory is dir, e.g. one started by an
// earlier process, so that it can be stopped.
func Open(dir string) (*VM, error) {
	b, err := os.ReadFile(filepath.Join(dir, MetadataFile))
	if err != nil {
		return nil, fmt.Errorf("open vm %s: %w", dir, err)
	}
	vm := new(VM)
	if err := json.Unmarshal(b, vm); err != nil {
		return nil, fmt.Errorf("open vm %s: %s: %w", dir, MetadataFile, err)
	}
	if p, err := os.ReadFile(filepath.Join(dir, PIDFile)); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(p))); err == nil {
			vm.PID = pid
		}
	}
	if vm.PID <= 0 {
		return nil, fmt.Errorf("open vm %s: no valid pid", dir)
	}
	if vm.HostKeyLine != "" {
		if vm.HostKey, _, _, _, err = ssh.ParseAuthorizedKey([]byte(vm.HostKeyLine)); err != nil {
			return nil, fmt.Errorf("open vm %s: host key: %w", dir, err)
		}
	}
	vm.StateDir = dir
	vm.log = slog.Default()
	return vm, nil
}

// List opens every VM state directory directly under root. Directories
// without metadata (half-created or half-removed) are returned in partial.
func List(root string) (vms []*VM, partial []string, err error) {
	entries, err := os.ReadDir(root)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("list vms: %w", err)
	}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(root, e.Name())
		vm, err := Open(dir)
		if err != nil {
			partial = append(partial, dir)
			continue
		}
		vms = append(vms, vm)
	}
	return vms, partial, nil
}

// Running reports whether the VM's qemu process is alive.
func (vm *VM) Running() bool {
	if vm.exited != nil {
		select {
		case <-vm.exited:
			return false
		default:
			return true
		}
	}
	return vm.ours()
}

// ours reports whether PID is alive and is this VM's qemu (guards against a
// recycled pid): its command line names the state directory.
func (vm *VM) ours() bool {
	cmdline, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(vm.PID), "cmdline"))
	if err != nil || len(cmdline) == 0 { // gone, or a zombie
		return false
	}
	return bytes.Contains(cmdline, []byte(vm.StateDir+string(filepath.Separator)))
}

// Stop kills the VM's qemu process group, waits for it to exit and removes
// the state directory. It is safe to call more than once and on a VM found
// with Open; ctx bounds the wait.
func (vm *VM) Stop(ctx context.Context) error {
	if err := vm.kill(ctx); err != nil {
		return err
	}
	_, statErr := os.Stat(vm.StateDir)
	if err := os.RemoveAll(vm.StateDir); err != nil {
		return fmt.Errorf("stop vm %s: %w", vm.Name, err)
	}
	if statErr == nil {
		vm.log.Info("vm stopped", "vm", vm.Name, "pid", vm.PID)
	}
	return nil
}

// kill sends SIGKILL to the qemu process group and waits until it is gone.
func (vm *VM) kill(ctx context.Context) error {
	if vm.exited != nil { // our child: the group is ours, Wait reaps it
		_ = syscall.Kill(-vm.PID, syscall.SIGKILL)
		select {
		case <-vm.exited:
			return nil
		case <-ctx.Done():
			return fmt.Errorf("stop vm %s: pid %d did not exit: %w", vm.Name, vm.PID, ctx.Err())
		}
	}
	if !vm.ours() {
		return nil
	}
	if err := syscall.Kill(-vm.PID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("stop vm %s: kill %d: %w", vm.Name, vm.PID, err)
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for vm.ours() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("stop vm %s: pid %d did not exit: %w", vm.Name, vm.PID, ctx.Err())
		case <-tick.C:
		}
	}
	return nil
}

// SSHConfig returns an SSH client configuration for root on the VM that
// authenticates with signer and accepts only the VM's own host key.
func (vm *VM) SSHConfig(signer ssh.Signer, timeout time.Duration) *ssh.ClientConfig {
	return &ssh.ClientConfig{
		User:              "root",
		Auth:              []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback:   ssh.FixedHostKey(vm.HostKey),
		HostKeyAlgorithms: []string{vm.HostKey.Type()},
		Timeout:           timeout,
	}
}

// SetLogger sets the logger of a VM found with Open (default slog.Default()).
func (vm *VM) SetLogger(l *slog.Logger) {
	if l != nil {
		vm.log = l
	}
}

// Remove stops the VM whose state directory is dir and removes dir. Unlike
// Open followed by Stop it also handles a directory whose metadata was never
// written (a process that died while starting the VM): every qemu process
// whose command line names dir's console file is killed. A missing dir is
// not an error.
func Remove(ctx context.Context, dir string) error {
	dir = filepath.Clean(dir)
	if vm, err := Open(dir); err == nil {
		if err := vm.kill(ctx); err != nil {
			return err
		}
	}
	for _, pid := range processesUsing(dir) {
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("remove vm %s: kill %d: %w", dir, pid, err)
		}
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for len(processesUsing(dir)) > 0 {
		select {
		case <-ctx.Done():
			return fmt.Errorf("remove vm %s: processes still running: %w", dir, ctx.Err())
		case <-tick.C:
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove vm %s: %w", dir, err)
	}
	return nil
}

// processesUsing returns the live (non-zombie) qemu processes of the VM whose
// state directory is dir: those whose command line has its console file.
func processesUsing(dir string) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	needle := []byte("\x00file:" + filepath.Join(dir, ConsoleFile) + "\x00")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, needle) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// ListeningTCP returns the addresses on which process pid has listening TCP
// sockets, read from /proc (the sockets among its open files). It needs the
// right to read /proc/<pid>/fd: the same user, or root.
func ListeningTCP(pid int) ([]netip.AddrPort, error) {
	fdDir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
	fds, err := os.ReadDir(fdDir)
	if err != nil {
		return nil, fmt.Errorf("listening sockets of %d: %w", pid, err)
	}
	inodes := make(map[string]bool)
	for _, fd := range fds {
		link, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
		if err == nil && strings.HasPrefix(link, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]")] = true
		}
	}
	var addrs []netip.AddrPort
	for _, table := range []string{"tcp", "tcp6"} {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "net", table))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("listening sockets of %d: %w", pid, err)
		}
		found, err := parseProcNetTCP(b, inodes)
		if err != nil {
			return nil, fmt.Errorf("listening sockets of %d: %s: %w", pid, table, err)
		}
		addrs = append(addrs, found...)
	}
	return addrs, nil
}

// tcpListen is the st column value of a listening socket in /proc/net/tcp.
const tcpListen = "0A"

// parseProcNetTCP returns the local addresses of the listening sockets in a
// /proc/net/tcp or tcp6 table whose inode is in inodes.
func parseProcNetTCP(table []byte, inodes map[string]bool) ([]netip.AddrPort, error) {
	var addrs []netip.AddrPort
	lines := strings.Split(strings.TrimSpace(string(table)), "\n")
	for _, line := range lines[1:] { // the first line is the header
		f := strings.Fields(line)
		if len(f) < 10 || f[3] != tcpListen || !inodes[f[9]] {
			continue
		}
		ap, err := parseHexAddrPort(f[1])
		if err != nil {
			return nil, err
		}
		addrs = append(addrs, ap)
	}
	return addrs, nil
}

// parseHexAddrPort parses /proc/net/tcp's "0100007F:1F90": the address as
// 32-bit words in host (little-endian) byte order, the port big-endian.
func parseHexAddrPort(s string) (netip.AddrPort, error) {
	host, port, ok := strings.Cut(s, ":")
	if !ok || (len(host) != 8 && len(host) != 32) {
		return netip.AddrPort{}, fmt.Errorf("bad address %q", s)
	}
	raw, err := hex.DecodeString(host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("bad address %q: %w", s, err)
	}
	for i := 0; i < len(raw); i += 4 {
		raw[i], raw[i+1], raw[i+2], raw[i+3] = raw[i+3], raw[i+2], raw[i+1], raw[i]
	}
	p, err := strconv.ParseUint(port, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("bad port in %q: %w", s, err)
	}
	addr, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(addr.Unmap(), uint16(p)), nil
}
