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
	"errors"
	"fmt"
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
