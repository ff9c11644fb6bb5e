// Package qemuvm starts and stops one local qemu microVM booted from a mayfly
// base image (provisioner/image) with its own SSH identity, user-mode
// networking and SSH forwarded from a 127.0.0.1 port. Each VM keeps a state
// directory (pid file, metadata, console log) so a later process can find and
// stop VMs it did not start.
package qemuvm

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
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
)

// Defaults for Options.
const (
	DefaultMemoryMB    = 256
	DefaultCPUs        = 1
	DefaultBootTimeout = 90 * time.Second
	DefaultQEMU        = "qemu-system-x86_64"
)

// Options configure one VM. Name, StateDir, Kernel, Initrd and AuthorizedKeys are required.
type Options struct {
	// Name identifies the VM; it becomes the guest hostname (a DNS label).
	Name string
	// StateDir is the VM's own directory; it must not exist yet. Stop removes it.
	StateDir string
	// Kernel and Initrd are the base image (image.Image.Kernel and .Initrd).
	Kernel, Initrd string
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
	// GuestForwards are the only destinations an isolated guest can connect to.
	GuestForwards []GuestForward
	// QEMU is the qemu binary; default DefaultQEMU from PATH.
	QEMU string
	// Accel is "kvm" or "tcg"; empty picks kvm when /dev/kvm is usable, else tcg.
	Accel string
	// Labels are stored in the metadata file (e.g. the owning manager's identity).
	Labels map[string]string
	// Logger receives lifecycle events; default slog.Default().
	Logger *slog.Logger
}

// Network is a guest network policy. Both use qemu's user-mode network
// (slirp): the guest is 10.0.2.15 behind a NAT of its own (no VM shares an L2
// segment with another), and the only inbound path is the SSH forward bound
// to 127.0.0.1.
//
// What a guest can reach was measured with qemu 7.2 / libslirp 4.7
// (TestTwoVMs): slirp maps the gateway 10.0.2.2 to the host's 127.0.0.1, so
// with the default (open) policy a guest connecting to 10.0.2.2:PORT reaches
// any host loopback port — other VMs' SSH forwards and the manager. Packets
// a guest routes to 127.0.0.1 directly are dropped. libslirp can disable the
// loopback mapping (disable_host_loopback, used by slirp4netns) but qemu's
// -netdev user does not expose it, so "reach out but not the host" is not
// expressible in qemu flags alone: use NetworkIsolated with a GuestForward to
// an egress proxy that refuses loopback, link-local and private destinations,
// or NetworkOpen behind a host firewall rule on qemu's uid or cgroup.
type Network int

const (
	// NetworkIsolated (restrict=on): the guest can open no connection at all
	// (10.0.2.2:PORT is refused) except to its GuestForwards; the SSH forward
	// from the host still works. The default.
	NetworkIsolated Network = iota
	// NetworkOpen is slirp's default: the guest reaches whatever the host
	// reaches, INCLUDING every 127.0.0.1 port on the host through 10.0.2.2,
	// so other VMs' SSH forwards. Only for trusted guests or behind a host firewall.
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
// 10.0.2.0/24 that is not the gateway, e.g. 10.0.2.100:3128); each
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
	// ReadyAfter is the time from qemu start to the ready marker.
	ReadyAfter time.Duration `json:"ready_after_ns,omitempty"`

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
	for field, p := range map[string]string{"Kernel": o.Kernel, "Initrd": o.Initrd} {
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("vm %s options: %s: %w (run `mayfly image build`)", o.Name, field, err)
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
	if o.BootTimeout < 0 {
		return fmt.Errorf("vm %s options: BootTimeout %v is negative", o.Name, o.BootTimeout)
	}
	if o.Network != NetworkIsolated && o.Network != NetworkOpen {
		return fmt.Errorf("vm %s options: Network %v is unknown", o.Name, o.Network)
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
	if ip == nil || !guestNet.Contains(ip) || host == image.GuestGateway || host == image.GuestDNS || host == "10.0.2.15" {
		return fmt.Errorf("GuestAddr %q: want an unused address in 10.0.2.0/24 (not .2, .3 or .15)", f.GuestAddr)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("GuestAddr %q: bad port", f.GuestAddr)
	}
	if f.Command == "" || strings.ContainsAny(f.Command, ",\n") {
		return fmt.Errorf("Command %q: want a non-empty command without commas or newlines", f.Command)
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
// process: stop it with Stop.
func Start(ctx context.Context, opts Options) (*VM, error) {
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
		err = image.WriteInstanceInitrd(filepath.Join(opts.StateDir, initrdFile), opts.Initrd, id)
	}
	if err != nil {
		os.RemoveAll(opts.StateDir)
		return nil, fmt.Errorf("start vm %s: %w", opts.Name, err)
	}
	// A free port can be taken by someone else before qemu binds it; qemu
	// then exits at once with a hostfwd error and we try another port.
	const attempts = 3
	for attempt := 1; ; attempt++ {
		vm, err := start(ctx, opts, hostPub)
		var be *BootError
		if err != nil && attempt < attempts && errors.As(err, &be) && errors.Is(be, ErrExited) &&
			strings.Contains(be.Detail, "host forwarding rule") {
			opts.Logger.Warn("ssh forward port taken, retrying", "vm", opts.Name, "attempt", attempt)
			continue
		}
		if err != nil {
			os.RemoveAll(opts.StateDir)
		}
		return vm, err
	}
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
	netdev := "user,id=n0,ipv6=off,hostfwd=tcp:127.0.0.1:" + strconv.Itoa(sshPort) + "-:22"
	if o.Network == NetworkIsolated {
		netdev += ",restrict=on"
	}
	for _, f := range o.GuestForwards {
		netdev += ",guestfwd=tcp:" + f.GuestAddr + "-cmd:" + f.Command
	}
	return []string{
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
		"-append", "console=ttyS0 quiet panic=-1",
		"-netdev", netdev,
		// romfile= skips the iPXE option ROM: nothing boots from the network.
		"-device", "virtio-net-pci,netdev=n0,romfile=",
		"-no-reboot",
	}
}

func start(ctx context.Context, opts Options, hostPub ssh.PublicKey) (*VM, error) {
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
		Name:        opts.Name,
		StateDir:    opts.StateDir,
		PID:         cmd.Process.Pid,
		SSHAddr:     net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		HostKey:     hostPub,
		HostKeyLine: strings.TrimSpace(string(ssh.MarshalAuthorizedKey(hostPub))),
		Accel:       opts.Accel,
		Network:     opts.Network.String(),
		Labels:      opts.Labels,
		StartedAt:   started,
		log:         opts.Logger,
		exited:      make(chan struct{}),
	}
	go func() { // owned by vm: ends when qemu exits, which Stop guarantees
		_ = cmd.Wait()
		close(vm.exited)
	}()
	log := opts.Logger.With("vm", opts.Name, "pid", vm.PID)
	fail := func(cause error) (*VM, error) {
		after := time.Since(started)
		stopCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := vm.kill(stopCtx); err != nil {
			log.Error("kill vm after failed boot", "err", err)
		}
		detail := tail(filepath.Join(opts.StateDir, ConsoleFile), 15) + tail(filepath.Join(opts.StateDir, QEMULogFile), 5)
		log.Warn("vm boot failed", "cause", cause, "after", after)
		return nil, &BootError{Name: opts.Name, PID: vm.PID, Cause: cause, After: after, Detail: strings.TrimSpace(detail)}
	}
	if err := vm.writeState(); err != nil {
		return fail(err)
	}
	log.Info("vm starting", "ssh", vm.SSHAddr, "accel", opts.Accel, "network", opts.Network)

	watchdog := time.NewTimer(opts.BootTimeout)
	defer watchdog.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	console := filepath.Join(opts.StateDir, ConsoleFile)
	for {
		select {
		case <-ctx.Done():
			return fail(ctx.Err())
		case <-watchdog.C:
			return fail(ErrBootTimeout)
		case <-vm.exited:
			return fail(ErrExited)
		case <-tick.C:
		}
		b, _ := os.ReadFile(console)
		if bytes.Contains(b, []byte(image.FailedMarker)) {
			return fail(ErrGuestFailed)
		}
		if bytes.Contains(b, []byte(image.ReadyMarker)) {
			vm.ReadyAfter = time.Since(started)
			if err := vm.writeState(); err != nil {
				return fail(err)
			}
			log.Info("vm ready", "after", vm.ReadyAfter.Round(time.Millisecond))
			return vm, nil
		}
	}
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
