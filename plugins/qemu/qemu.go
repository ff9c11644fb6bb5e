// Package qemu is mayfly's provider of local microVMs: each instance is one
// qemu-system-x86_64 process (KVM when /dev/kvm is usable, software
// emulation otherwise) booted from a base image of provisioner/image (the
// "image" setting: busybox, debian or debian-docker), on a user-mode
// network of its own with SSH forwarded from a free 127.0.0.1 port, and
// egress limited to the "egress_allow" host endpoints unless "egress" is
// "open". The binary in cmd/mayfly-plugin-qemu serves it as a plugin.
//
// Each instance has a state directory, StateDir/Group/<id>, that holds all
// there is to know about it: qemu's pid and the VM's metadata (SSH address,
// pinned host key, labels, boot deadline, readiness or failure), its console
// log, its initrd (with its SSH host key), its copy-on-write disk overlay
// (Debian images) and the SSH client key the plugin generated for it. A restarted plugin therefore lists, serves and deletes
// the instances an earlier process started, and enforces their boot
// deadline.
//
// Keys: the plugin generates an ed25519 client key and an ed25519 host key
// per instance. The client's public half is the guest's only
// authorized_keys entry; the host key is baked into the instance's initrd
// and its public half is pinned in ConnectInfo.HostKey, so no client ever
// trusts on first use. Both private keys are stored in the instance's state
// directory (directory 0700, files 0600, readable only by the plugin's
// user) rather than only in memory, because a restarted plugin must still
// answer ConnectInfo for instances already handed to jobs; they are deleted
// with the instance.
package qemu

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/plugins/qemu/qemuvm"
	"github.com/mayfly-ci/mayfly/providers"
)

// Files the plugin keeps in an instance's state directory, besides qemuvm's.
const (
	// ClientKeyFile is the PEM (OpenSSH) private key to log in as root.
	ClientKeyFile = "client_key"
	// LabelsFile holds the instance's labels as a JSON object.
	LabelsFile = "labels.json"
)

// MaxCreatePerCall bounds n in one Create call.
const MaxCreatePerCall = 100

// Version is the plugin's version, reported in Info; when empty the main
// module's version from the build info is used.
var Version = ""

// idPrefix starts every instance id; the rest is random hex.
const idPrefix = "mayfly-"

var idRE = regexp.MustCompile(`^` + idPrefix + `[0-9a-f]{12}$`)

// Provider implements providers.Provider with local qemu VMs.
type Provider struct {
	log    *slog.Logger
	ctx    context.Context // ends with Shutdown; parent of every boot watcher
	cancel context.CancelFunc
	wg     sync.WaitGroup // boot watchers

	mu     sync.Mutex
	cfg    *config
	closed bool
	boots  map[string]*boot // instances whose boot this process is watching
}

var _ providers.Provider = (*Provider)(nil)

// boot is an instance this process is starting or watching boot.
type boot struct {
	id      string
	dir     string
	labels  map[string]string
	created time.Time
	cancel  context.CancelFunc
	done    chan struct{} // closed when the watcher has returned
	// failed is why qemu could not be started (no state directory is left).
	failed string
}

// New returns an uninitialised provider logging to log (default slog.Default()).
func New(log *slog.Logger) *Provider {
	if log == nil {
		log = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Provider{log: log, ctx: ctx, cancel: cancel, boots: make(map[string]*boot)}
}

// Init implements providers.Provider. It may be called again, also on a
// fresh process after a restart: it then adopts the boots an earlier process
// left unfinished, so their deadline is enforced.
func (p *Provider) Init(ctx context.Context, settings json.RawMessage) (providers.Info, error) {
	if p.isClosed() {
		return providers.Info{}, providers.Permanent(fmt.Errorf("init: %w", providers.ErrClosed))
	}
	c, err := parseSettings(settings)
	if err != nil {
		return providers.Info{}, fmt.Errorf("init: %w", err)
	}
	if err := c.resolveImage(ctx, p.log); err != nil {
		return providers.Info{}, fmt.Errorf("init: %w", err)
	}
	if err := os.MkdirAll(c.groupDir, 0o700); err != nil {
		return providers.Info{}, providers.Permanent(fmt.Errorf("init: settings key %q: %w", "state_dir", err))
	}
	p.mu.Lock()
	p.cfg = c
	p.mu.Unlock()
	adopted := p.adopt(c)
	host, _ := os.Hostname()
	info := providers.Info{ID: "qemu/" + host + "/" + c.Group, MaxSize: c.MaxInstances, Version: version()}
	p.log.Info("qemu provider ready", "group", c.Group, "state_dir", c.groupDir, "image", c.profile, "accel", c.accel,
		"egress", c.Egress, "egress_allow", c.EgressAllow, "memory_mb", c.MemoryMB, "cpus", c.CPUs, "boot_timeout", time.Duration(c.BootTimeout).String(),
		"adopted_boots", adopted)
	return info, nil
}

// adopt watches the boots of VMs in the group directory that an earlier
// process started and did not see finish, and returns how many.
func (p *Provider) adopt(c *config) int {
	vms, _, err := qemuvm.List(c.groupDir)
	if err != nil {
		p.log.Warn("list instances to adopt", "err", err)
		return 0
	}
	n := 0
	for _, vm := range vms {
		id := filepath.Base(vm.StateDir)
		if !idRE.MatchString(id) {
			continue
		}
		if cond, _ := vm.Check(); cond != qemuvm.Booting {
			continue
		}
		vm.SetLogger(p.log)
		p.mu.Lock()
		if _, ok := p.boots[id]; ok || p.closed {
			p.mu.Unlock()
			continue
		}
		b := p.newBootLocked(id, vm.StateDir, vm.Labels, vm.StartedAt)
		ctx := p.bootCtx(b)
		p.wg.Add(1)
		p.mu.Unlock()
		go p.watch(ctx, b, nil, vm)
		n++
	}
	return n
}

func (p *Provider) newBootLocked(id, dir string, labels map[string]string, created time.Time) *boot {
	b := &boot{id: id, dir: dir, labels: maps.Clone(labels), created: created, done: make(chan struct{})}
	p.boots[id] = b
	return b
}

func (p *Provider) bootCtx(b *boot) context.Context {
	ctx, cancel := context.WithCancel(p.ctx)
	b.cancel = cancel
	return ctx
}

func version() string {
	if Version != "" {
		return Version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "devel"
}

func (p *Provider) isClosed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closed
}

// config returns the current configuration, or why there is none.
func (p *Provider) config(op string) (*config, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.configLocked(op)
}

func (p *Provider) configLocked(op string) (*config, error) {
	switch {
	case p.closed:
		return nil, providers.Permanent(fmt.Errorf("%s: %w", op, providers.ErrClosed))
	case p.cfg == nil:
		return nil, providers.Permanent(fmt.Errorf("%s: provider not initialised (call Init first)", op))
	}
	return p.cfg, nil
}

// Create implements providers.Provider. It returns the new ids at once;
// each VM boots in the background (listed creating, then running, or failed
// with a reason if it is not ready within boot_timeout). Beyond
// max_instances it creates what fits and returns a quota error.
func (p *Provider) Create(ctx context.Context, n int, labels map[string]string) ([]string, error) {
	switch {
	case n < 0:
		return nil, providers.InvalidArgument(fmt.Errorf("create: n = %d is negative", n))
	case n > MaxCreatePerCall:
		return nil, providers.InvalidArgument(fmt.Errorf("create: n = %d is above %d per call", n, MaxCreatePerCall))
	case n == 0:
		return nil, nil
	}
	labelsJSON, err := json.Marshal(labels)
	if err != nil {
		return nil, providers.InvalidArgument(fmt.Errorf("create: labels: %w", err))
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	c, err := p.configLocked("create")
	if err != nil {
		return nil, err
	}
	want := n
	if c.MaxInstances > 0 {
		have, err := p.countLocked(c)
		if err != nil {
			return nil, fmt.Errorf("create: %w", err)
		}
		n = max(0, min(n, c.MaxInstances-have))
	}
	ids := make([]string, 0, n)
	for range n {
		id, key, err := newInstanceKey()
		if err != nil {
			return ids, fmt.Errorf("create: %w", err)
		}
		dir := filepath.Join(c.groupDir, id)
		b := p.newBootLocked(id, dir, labels, time.Now())
		opts := qemuvm.Options{
			Name:        id,
			StateDir:    dir,
			Kernel:      c.image.Kernel,
			Initrd:      c.image.Initrd,
			Disk:        c.image.Disk,
			EgressAllow: c.allow,
			QEMUImg:     c.QEMUImg,
			MemoryMB:    c.MemoryMB,
			CPUs:        c.CPUs,
			BootTimeout: time.Duration(c.BootTimeout),
			Network:     c.network,
			QEMU:        c.QEMU,
			Accel:       c.accel,
			Labels:      maps.Clone(labels),
			Logger:      p.log,
			Files:       map[string][]byte{ClientKeyFile: key.pem, LabelsFile: labelsJSON},

			AuthorizedKeys: []ssh.PublicKey{key.pub},
		}
		bctx := p.bootCtx(b)
		p.wg.Add(1)
		go p.watch(bctx, b, &opts, nil)
		ids = append(ids, id)
	}
	p.log.Info("creating instances", "ids", ids, "labels", labels)
	if len(ids) < want {
		scope := "qemu/" + c.Group
		return ids, providers.QuotaExceeded(scope, fmt.Errorf("create %d: max_instances %d reached, created %d", want, c.MaxInstances, len(ids)))
	}
	return ids, nil
}

// countLocked counts the group's instances: state directories and boots
// whose directory may not exist yet.
func (p *Provider) countLocked(c *config) (int, error) {
	entries, err := os.ReadDir(c.groupDir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return 0, err
	}
	seen := make(map[string]bool)
	for _, e := range entries {
		if e.IsDir() && idRE.MatchString(e.Name()) {
			seen[e.Name()] = true
		}
	}
	for id, b := range p.boots {
		if filepath.Dir(b.dir) == c.groupDir {
			seen[id] = true
		}
	}
	return len(seen), nil
}

type instanceKey struct {
	pem []byte
	pub ssh.PublicKey
}

// newInstanceKey returns a fresh instance id and SSH client key.
func newInstanceKey() (string, instanceKey, error) {
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		return "", instanceKey{}, err
	}
	id := idPrefix + hex.EncodeToString(b)
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return "", instanceKey{}, fmt.Errorf("client key for %s: %w", id, err)
	}
	block, err := ssh.MarshalPrivateKey(priv, "mayfly "+id)
	if err != nil {
		return "", instanceKey{}, fmt.Errorf("client key for %s: %w", id, err)
	}
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		return "", instanceKey{}, fmt.Errorf("client key for %s: %w", id, err)
	}
	return id, instanceKey{pem: pem.EncodeToMemory(block), pub: sshPub}, nil
}

// watch starts the VM (when opts is set) or adopts it (vm), and waits for
// it to be ready. A boot that fails leaves the VM killed and its state
// directory saying why, for List; ctx ending (Delete, Shutdown) leaves the
// VM as it is.
func (p *Provider) watch(ctx context.Context, b *boot, opts *qemuvm.Options, vm *qemuvm.VM) {
	defer p.wg.Done()
	defer close(b.done)
	log := p.log.With("instance", b.id)
	if vm == nil {
		var err error
		vm, err = qemuvm.Launch(ctx, *opts)
		if err != nil {
			if ctx.Err() != nil {
				p.forget(b)
				return
			}
			reason := err.Error()
			if be, ok := errors.AsType[*qemuvm.BootError](err); ok {
				reason = be.Reason
			}
			log.Error("instance failed to start", "err", err)
			p.mu.Lock()
			b.failed = reason
			p.mu.Unlock()
			return
		}
	}
	err := vm.WaitReady(ctx)
	switch {
	case err == nil:
		log.Info("instance ready", "after", vm.ReadyAfter.Round(time.Millisecond).String(), "ssh", vm.SSHAddr)
	case ctx.Err() != nil:
		log.Debug("stopped watching boot", "reason", context.Cause(ctx))
	default:
		log.Warn("instance boot failed", "err", err)
	}
	p.forget(b)
}

// forget drops b from the boots this process watches.
func (p *Provider) forget(b *boot) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.boots[b.id] == b {
		delete(p.boots, b.id)
	}
}

// Delete implements providers.Provider: it stops each instance's qemu
// process group and removes its state directory. Unknown ids succeed.
func (p *Provider) Delete(ctx context.Context, ids []string) ([]string, error) {
	c, err := p.config("delete")
	if err != nil {
		return nil, err
	}
	var (
		deleted []string
		errs    []error
	)
	for _, id := range ids {
		if !idRE.MatchString(id) { // never one of ours
			deleted = append(deleted, id)
			continue
		}
		if err := p.deleteOne(ctx, c, id); err != nil {
			errs = append(errs, fmt.Errorf("delete instance %s: %w", id, err))
			continue
		}
		deleted = append(deleted, id)
	}
	if len(errs) > 0 {
		return deleted, providers.Transient(errors.Join(errs...))
	}
	return deleted, nil
}

func (p *Provider) deleteOne(ctx context.Context, c *config, id string) error {
	dir := filepath.Join(c.groupDir, id)
	p.mu.Lock()
	b := p.boots[id]
	p.mu.Unlock()
	if b != nil {
		b.cancel()
		select {
		case <-b.done:
		case <-ctx.Done():
			return fmt.Errorf("wait for its boot to stop: %w", ctx.Err())
		}
		p.forget(b)
		dir = b.dir
	}
	_, statErr := os.Stat(dir)
	if err := qemuvm.Remove(ctx, dir); err != nil {
		return err
	}
	if statErr == nil || b != nil {
		p.log.Info("instance deleted", "instance", id)
	}
	return nil
}

// List implements providers.Provider: every instance in the group's state
// directory, plus those still being started. Running means qemu lives and
// the guest printed its ready marker (SSH listens); a VM whose qemu died, or
// that missed its boot deadline, is failed with a reason (and its qemu is
// killed).
func (p *Provider) List(ctx context.Context) ([]providers.Instance, error) {
	c, err := p.config("list")
	if err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(c.groupDir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, providers.Transient(fmt.Errorf("list: %w", err))
	}
	p.mu.Lock()
	boots := make(map[string]*boot, len(p.boots))
	failed := make(map[string]string, len(p.boots))
	for id, b := range p.boots {
		if filepath.Dir(b.dir) == c.groupDir { // not of a group set by an earlier Init
			boots[id], failed[id] = b, b.failed
		}
	}
	p.mu.Unlock()

	var list []providers.Instance
	seen := make(map[string]bool)
	for _, e := range entries {
		id := e.Name()
		if !e.IsDir() || !idRE.MatchString(id) {
			continue
		}
		seen[id] = true
		b := boots[id]
		in, err := p.instance(ctx, filepath.Join(c.groupDir, id), b != nil)
		if err != nil {
			return nil, providers.Transient(fmt.Errorf("list: instance %s: %w", id, err))
		}
		if in.Labels == nil && b != nil {
			in.Labels, in.CreatedAt = maps.Clone(b.labels), b.created
		}
		list = append(list, in)
	}
	for id, b := range boots {
		if seen[id] {
			continue
		}
		in := providers.Instance{ID: id, State: providers.StateCreating, Labels: maps.Clone(b.labels), CreatedAt: b.created}
		if failed[id] != "" {
			in.State, in.Reason = providers.StateFailed, failed[id]
		}
		list = append(list, in)
	}
	slices.SortFunc(list, func(a, b providers.Instance) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return list, nil
}

// instance describes the VM in dir. watched says this process is starting
// or watching its boot.
func (p *Provider) instance(ctx context.Context, dir string, watched bool) (providers.Instance, error) {
	id := filepath.Base(dir)
	vm, err := qemuvm.Open(dir)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			return providers.Instance{}, err
		}
		// No metadata yet: being started, or left so by a process that died.
		in := providers.Instance{ID: id, State: providers.StateCreating}
		if b, err := os.ReadFile(filepath.Join(dir, LabelsFile)); err == nil {
			_ = json.Unmarshal(b, &in.Labels)
		}
		if fi, err := os.Stat(dir); err == nil {
			in.CreatedAt = fi.ModTime()
		}
		if !watched {
			in.State, in.Reason = providers.StateFailed, "incomplete state directory (no metadata): the plugin stopped while starting it"
		}
		return in, nil
	}
	in := providers.Instance{ID: id, Labels: vm.Labels, CreatedAt: vm.StartedAt}
	cond, reason := vm.Check()
	switch cond {
	case qemuvm.Ready:
		in.State = providers.StateRunning
	case qemuvm.Booting:
		in.State = providers.StateCreating
	case qemuvm.Failed:
		in.State, in.Reason = providers.StateFailed, reason
		if !watched && vm.Running() { // a boot deadline nobody enforced
			vm.SetLogger(p.log)
			kctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err := vm.Fail(kctx, reason)
			cancel()
			if err != nil {
				p.log.Warn("kill failed instance", "instance", id, "err", err)
			}
		}
	}
	return in, nil
}

// open finds instance id, or returns a not-found error.
func (p *Provider) open(op, id string) (*qemuvm.VM, error) {
	c, err := p.config(op)
	if err != nil {
		return nil, err
	}
	if !idRE.MatchString(id) {
		return nil, providers.NotFound(id)
	}
	vm, err := qemuvm.Open(filepath.Join(c.groupDir, id))
	if err == nil {
		return vm, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s %s: %w", op, id, err)
	}
	p.mu.Lock()
	b := p.boots[id]
	var failed string
	if b != nil {
		failed = b.failed
	}
	p.mu.Unlock()
	switch {
	case b == nil:
		return nil, providers.NotFound(id)
	case failed != "":
		return nil, providers.Permanent(fmt.Errorf("%s %s: instance failed to start: %s", op, id, failed))
	}
	return nil, providers.Transient(fmt.Errorf("%s %s: instance is starting, its qemu is not up yet", op, id))
}

// ConnectInfo implements providers.Provider. The address is known as soon
// as qemu runs, before the guest is ready.
func (p *Provider) ConnectInfo(ctx context.Context, id string) (providers.ConnectInfo, error) {
	vm, err := p.open("connect info", id)
	if err != nil {
		return providers.ConnectInfo{}, err
	}
	key, err := os.ReadFile(filepath.Join(vm.StateDir, ClientKeyFile))
	if err != nil {
		return providers.ConnectInfo{}, fmt.Errorf("connect info %s: client key: %w", id, err)
	}
	host, portStr, err := net.SplitHostPort(vm.SSHAddr)
	if err != nil {
		return providers.ConnectInfo{}, fmt.Errorf("connect info %s: ssh address %q: %w", id, vm.SSHAddr, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return providers.ConnectInfo{}, fmt.Errorf("connect info %s: ssh address %q: %w", id, vm.SSHAddr, err)
	}
	return providers.ConnectInfo{
		ID:         id,
		Address:    host,
		Port:       port,
		Protocol:   providers.ProtocolSSH,
		OS:         "linux",
		Arch:       "amd64",
		Username:   "root",
		PrivateKey: key,
		HostKey:    vm.HostKeyLine,
	}, nil
}

// bannerTimeout bounds Heartbeat's SSH banner read.
const bannerTimeout = 5 * time.Second

// Heartbeat implements providers.Provider: the instance is healthy when its
// qemu runs, the guest was ready, and its SSH server answers with a banner
// through the forward (qemu accepts on the forward even when the guest is
// dead, so a TCP connect alone proves nothing).
func (p *Provider) Heartbeat(ctx context.Context, id string) error {
	vm, err := p.open("heartbeat", id)
	if err != nil {
		return err
	}
	switch cond, reason := vm.Check(); cond {
	case qemuvm.Booting:
		return fmt.Errorf("heartbeat %s: instance is still booting", id)
	case qemuvm.Failed:
		return fmt.Errorf("heartbeat %s: instance failed: %s", id, reason)
	}
	if err := sshBanner(ctx, vm.SSHAddr); err != nil {
		return fmt.Errorf("heartbeat %s: %w", id, err)
	}
	return nil
}

// sshBanner connects to addr and reads the SSH server's version line.
func sshBanner(ctx context.Context, addr string) error {
	ctx, cancel := context.WithTimeout(ctx, bannerTimeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	deadline, _ := ctx.Deadline()
	if err := conn.SetDeadline(deadline); err != nil {
		return err
	}
	buf := make([]byte, 0, 256)
	tmp := make([]byte, 256)
	for !strings.Contains(string(buf), "\n") && len(buf) < 255 {
		n, err := conn.Read(tmp)
		buf = append(buf, tmp[:n]...)
		if err != nil {
			return fmt.Errorf("read ssh banner from %s: %w (got %q)", addr, err, buf)
		}
	}
	if !strings.HasPrefix(string(buf), "SSH-") {
		return fmt.Errorf("ssh banner from %s: got %q, want SSH-", addr, buf)
	}
	return nil
}

// Shutdown implements providers.Provider: it stops the boot watchers and
// leaves every VM running (the fleet deletes them; a later process adopts
// unfinished boots). Later calls fail with providers.ErrClosed.
func (p *Provider) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.cancel()
	done := make(chan struct{})
	go func() { // ends when the watchers have seen the cancellation
		p.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("shutdown: boot watchers still running: %w", ctx.Err())
	}
}
