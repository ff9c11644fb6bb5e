package qemuvm

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/internal/testenv"
	"github.com/mayfly-ci/mayfly/provisioner/image"
)

// need skips the test when a prerequisite is missing, or fails it when CI=true.
func need(t *testing.T, what string, ok bool) {
	t.Helper()
	if ok {
		return
	}
	testenv.Missing(t, what+" is missing (run scripts/setup-vm.sh)")
}

// testImage returns the base image from the repository cache, building it if needed.
func testImage(t *testing.T) *image.Image {
	t.Helper()
	_, err := exec.LookPath(DefaultQEMU)
	need(t, "qemu-system-x86_64 (Debian package qemu-system-x86)", err == nil)
	cache := os.Getenv("MAYFLY_CACHE_DIR")
	if cache == "" {
		dir, _ := os.Getwd()
		for ; ; dir = filepath.Dir(dir) {
			if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
				break
			}
			if dir == filepath.Dir(dir) {
				t.Fatal("no go.mod above the test directory")
			}
		}
		cache = filepath.Join(dir, image.DefaultCacheDir)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	img, err := image.Build(ctx, image.Options{CacheDir: cache})
	if errors.Is(err, image.ErrMissing) {
		need(t, err.Error(), false)
	}
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func newSigner(t *testing.T) ssh.Signer {
	t.Helper()
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s, err := ssh.NewSignerFromKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// gone reports that no process with pid, and none in its process group, exists.
func gone(pid int) bool {
	return errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) && errors.Is(syscall.Kill(-pid, 0), syscall.ESRCH)
}

// run runs one command on vm over SSH with the host key pinned.
func run(t *testing.T, vm *VM, signer ssh.Signer, command string) (string, error) {
	t.Helper()
	client, err := ssh.Dial("tcp", vm.SSHAddr, vm.SSHConfig(signer, 15*time.Second))
	if err != nil {
		return "", err
	}
	defer client.Close()
	timer := time.AfterFunc(60*time.Second, func() { client.Close() })
	defer timer.Stop()
	sess, err := client.NewSession()
	if err != nil {
		return "", err
	}
	defer sess.Close()
	out, err := sess.CombinedOutput(command)
	return string(out), err
}

func TestOptionsValidation(t *testing.T) {
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinuz")
	initrd := filepath.Join(dir, "initrd.gz")
	for _, p := range []string{kernel, initrd} {
		if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	key := newSigner(t).PublicKey()
	valid := func() Options {
		return Options{Name: "vm-1", StateDir: filepath.Join(dir, "s"), Kernel: kernel, Initrd: initrd,
			AuthorizedKeys: []ssh.PublicKey{key}, Accel: "tcg"}
	}
	tests := []struct {
		name   string
		mutate func(*Options)
		want   string
	}{
		{"no name", func(o *Options) { o.Name = "" }, "Name is required"},
		{"no state dir", func(o *Options) { o.StateDir = "" }, "StateDir is required"},
		{"comma in state dir", func(o *Options) { o.StateDir = dir + "/a,b" }, "StateDir"},
		{"no kernel", func(o *Options) { o.Kernel = "" }, "Kernel is required"},
		{"missing kernel", func(o *Options) { o.Kernel = dir + "/nope" }, "Kernel"},
		{"missing initrd", func(o *Options) { o.Initrd = dir + "/nope" }, "Initrd"},
		{"tiny memory", func(o *Options) { o.MemoryMB = 16 }, "MemoryMB"},
		{"negative cpus", func(o *Options) { o.CPUs = -1 }, "CPUs"},
		{"negative timeout", func(o *Options) { o.BootTimeout = -time.Second }, "BootTimeout"},
		{"bad accel", func(o *Options) { o.Accel = "hvf" }, "Accel"},
		{"bad network", func(o *Options) { o.Network = 7 }, "Network"},
		{"forward to gateway", func(o *Options) {
			o.GuestForwards = []GuestForward{{GuestAddr: "10.0.2.1:80", Command: "true"}}
		}, "GuestForwards[0]"},
		{"forward to the egress address", func(o *Options) {
			o.GuestForwards = []GuestForward{{GuestAddr: "10.0.2.2:80", Command: "true"}}
		}, "GuestForwards[0]"},
		{"missing disk", func(o *Options) { o.Disk = dir + "/nope.img" }, "Disk"},
		{"comma in disk", func(o *Options) { o.Disk = dir + "/a,b.img" }, "Disk"},
		{"no qemu-img", func(o *Options) { o.Disk, o.QEMUImg = kernel, dir+"/no-qemu-img" }, "QEMUImg"},
		{"egress port twice", func(o *Options) {
			o.EgressAllow = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:80"), netip.MustParseAddrPort("127.0.0.2:80")}
		}, "EgressAllow[1]"},
		{"egress port 0", func(o *Options) {
			o.EgressAllow = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0")}
		}, "EgressAllow[0]"},
		{"egress to nowhere", func(o *Options) {
			o.EgressAllow = []netip.AddrPort{netip.MustParseAddrPort("0.0.0.0:80")}
		}, "EgressAllow[0]"},
		{"no relay", func(o *Options) {
			o.EgressAllow, o.Busybox = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:80")}, dir+"/no-busybox"
		}, "Busybox"},
		{"forward outside guest net", func(o *Options) {
			o.GuestForwards = []GuestForward{{GuestAddr: "192.168.1.1:80", Command: "true"}}
		}, "GuestForwards[0]"},
		{"forward without command", func(o *Options) {
			o.GuestForwards = []GuestForward{{GuestAddr: "10.0.2.100:80"}}
		}, "Command"},
		{"bad hostname", func(o *Options) { o.Name = "a_b" }, "Hostname"},
		{"no authorized keys", func(o *Options) { o.AuthorizedKeys = nil }, "AuthorizedKeys"},
		{"file with a path", func(o *Options) { o.Files = map[string][]byte{"../x": nil} }, "Files"},
		{"file clashing with metadata", func(o *Options) { o.Files = map[string][]byte{MetadataFile: nil} }, "Files"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := valid()
			tt.mutate(&o)
			vm, err := Start(context.Background(), o)
			if err == nil {
				vm.Stop(context.Background())
				t.Fatal("Start accepted invalid options")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want it to name %s", err, tt.want)
			}
			if _, serr := os.Stat(o.StateDir); serr == nil && o.StateDir != "" {
				t.Errorf("state dir %s left behind", o.StateDir)
			}
		})
	}
}

func TestArgs(t *testing.T) {
	o := Options{Name: "vm-1", StateDir: "/s/vm-1", Kernel: "/k", Initrd: "/i", MemoryMB: 256, CPUs: 1, Accel: "tcg",
		GuestForwards: []GuestForward{{GuestAddr: "10.0.2.100:3128", Command: "relay 3128"}},
		EgressAllow:   []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:8929"), netip.MustParseAddrPort("[::1]:5000")},
		Busybox:       "/bin/busybox"}
	args := strings.Join(o.Args(2222), " ")
	for _, want := range []string{
		"-M pc", "-accel tcg", "-cpu max", "-m 256", "-smp 1", "-no-reboot", "-nodefaults",
		"-serial file:/s/vm-1/console.log", "-initrd /s/vm-1/initrd.gz", "-kernel /k",
		"net=10.0.2.0/24,host=10.0.2.1,", "hostfwd=tcp:127.0.0.1:2222-:22", "restrict=on",
		"guestfwd=tcp:10.0.2.2:8929-cmd:/bin/busybox nc -w 10 127.0.0.1 8929",
		"guestfwd=tcp:10.0.2.2:5000-cmd:/bin/busybox nc -w 10 ::1 5000",
		"guestfwd=tcp:10.0.2.100:3128-cmd:relay 3128",
		"virtio-net-pci,netdev=n0",
	} {
		if !strings.Contains(args, want) {
			t.Errorf("args lack %q:\n%s", want, args)
		}
	}
	if strings.Contains(args, "hostfwd=tcp::") || strings.Contains(args, "0.0.0.0") {
		t.Errorf("a forward is bound beyond 127.0.0.1:\n%s", args)
	}
	if strings.Contains(args, "-drive") {
		t.Errorf("a disk without Options.Disk:\n%s", args)
	}
	o.Network, o.Accel, o.Disk = NetworkOpen, "kvm", "/images/disk.img"
	args = strings.Join(o.Args(2222), " ")
	if strings.Contains(args, "restrict=on") || !strings.Contains(args, "-cpu host") {
		t.Errorf("open/kvm args:\n%s", args)
	}
	// The VM writes to its own overlay in its state directory, never to the base disk.
	if !strings.Contains(args, "-drive file=/s/vm-1/disk.qcow2,if=none,id=d0,format=qcow2") ||
		!strings.Contains(args, "virtio-blk-pci,drive=d0") || strings.Contains(args, "/images/disk.img") {
		t.Errorf("disk args:\n%s", args)
	}
}

func TestBogusKernelExits(t *testing.T) {
	_, err := exec.LookPath(DefaultQEMU)
	need(t, "qemu-system-x86_64", err == nil)
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinuz")
	initrd := filepath.Join(dir, "initrd")
	os.WriteFile(kernel, []byte("this is not a kernel"), 0o644)
	os.WriteFile(initrd, []byte("nor an initrd"), 0o644)
	state := filepath.Join(dir, "vm")
	start := time.Now()
	_, err = Start(context.Background(), Options{Name: "bogus", StateDir: state, Kernel: kernel, Initrd: initrd,
		AuthorizedKeys: []ssh.PublicKey{newSigner(t).PublicKey()}, BootTimeout: 30 * time.Second})
	var be *BootError
	if !errors.As(err, &be) || !errors.Is(err, ErrExited) {
		t.Fatalf("err = %v, want a *BootError wrapping ErrExited", err)
	}
	t.Logf("bogus kernel: %v (in %v)", err, time.Since(start))
	if !strings.Contains(be.Detail, "qemu.log") {
		t.Errorf("detail lacks qemu's own output: %q", be.Detail)
	}
	if !gone(be.PID) {
		t.Errorf("qemu pid %d still exists", be.PID)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Errorf("state dir left behind: %v", err)
	}
}

// TestWatchdogKillsHungVM boots a real kernel whose /init never prints the
// ready marker; Start must give up at BootTimeout and kill qemu.
func TestWatchdogKillsHungVM(t *testing.T) {
	img := testImage(t)
	_, err := exec.LookPath("cpio")
	need(t, "cpio", err == nil)
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	os.MkdirAll(filepath.Join(root, "bin"), 0o755)
	bb, err := os.ReadFile("/bin/busybox")
	need(t, "/bin/busybox (busybox-static)", err == nil)
	os.WriteFile(filepath.Join(root, "bin/busybox"), bb, 0o755)
	os.WriteFile(filepath.Join(root, "init"), []byte("#!/bin/busybox sh\nexec /bin/busybox sleep 600\n"), 0o755)
	hung := filepath.Join(dir, "hung.cpio")
	cmd := exec.Command("sh", "-c", "find . | cpio -o -H newc --quiet > "+hung)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio: %v: %s", err, out)
	}

	const timeout = 12 * time.Second
	state := filepath.Join(dir, "vm")
	start := time.Now()
	_, err = Start(context.Background(), Options{Name: "hung", StateDir: state, Kernel: img.Kernel, Initrd: hung,
		AuthorizedKeys: []ssh.PublicKey{newSigner(t).PublicKey()}, BootTimeout: timeout})
	elapsed := time.Since(start)
	var be *BootError
	if !errors.As(err, &be) || !errors.Is(err, ErrBootTimeout) {
		t.Fatalf("err = %v, want a *BootError wrapping ErrBootTimeout", err)
	}
	if elapsed < timeout {
		t.Errorf("gave up after %v, before the %v bound", elapsed, timeout)
	}
	if !gone(be.PID) {
		t.Errorf("qemu pid %d still exists after the watchdog fired", be.PID)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Errorf("state dir left behind: %v", err)
	}
}

// listener accepts TCP connections on 127.0.0.1, counts them and answers a line.
type listener struct {
	net.Listener
	accepted atomic.Int32
	wg       sync.WaitGroup
}

func newListener(t *testing.T, reply string) *listener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return serve(t, l, reply)
}

// serve accepts on l until the test ends, answering each connection a line.
func serve(t *testing.T, l net.Listener, reply string) *listener {
	ln := &listener{Listener: l}
	ln.wg.Add(1)
	go func() { // stopped by Close in t.Cleanup
		defer ln.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			ln.accepted.Add(1)
			c.SetDeadline(time.Now().Add(5 * time.Second))
			fmt.Fprintln(c, reply)
			c.Close()
		}
	}()
	t.Cleanup(func() { l.Close(); ln.wg.Wait() })
	return ln
}

func (l *listener) port() int { return l.Addr().(*net.TCPAddr).Port }

// TestTwoVMs boots two VMs at once: A isolated (the default) with one
// allowed host endpoint and one guest forward, B with NetworkOpen and the
// same allowed endpoint. It checks SSH with pinned per-instance host keys,
// that keys are not shared, the egress rules from inside both guests (see
// checkEgress), and that Stop (also through Open, as a later process would)
// leaves no qemu process and no state.
func TestTwoVMs(t *testing.T) {
	img := testImage(t)
	_, err := exec.LookPath("busybox")
	need(t, "busybox on the host (guest-forward relay)", err == nil)
	root := t.TempDir()
	hostSvc := newListener(t, "HOST-SERVICE")  // a host loopback port nobody allowed
	allowed := newListener(t, "COORDINATOR")   // stands for the coordinator, allowed
	egress := newListener(t, "EGRESS-GATEWAY") // stands for an egress proxy
	outside := newOutsideHost(t, "OUTSIDE")    // beyond the host, and a link-local address
	allow := []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(allowed.port()))}

	signerA, signerB := newSigner(t), newSigner(t)
	opts := []Options{{
		Name: "vm-a", StateDir: filepath.Join(root, "vm-a"), Kernel: img.Kernel, Initrd: img.Initrd,
		AuthorizedKeys: []ssh.PublicKey{signerA.PublicKey()}, Labels: map[string]string{"manager": "test"},
		EgressAllow:   allow,
		GuestForwards: []GuestForward{{GuestAddr: "10.0.2.100:3128", Command: "busybox nc 127.0.0.1 " + strconv.Itoa(egress.port())}},
	}, {
		Name: "vm-b", StateDir: filepath.Join(root, "vm-b"), Kernel: img.Kernel, Initrd: img.Initrd,
		AuthorizedKeys: []ssh.PublicKey{signerB.PublicKey()}, Network: NetworkOpen, EgressAllow: allow,
	}}
	vms := make([]*VM, 2)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i := range opts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			vms[i], errs[i] = Start(ctx, opts[i])
		}()
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, vm := range vms {
			if vm != nil {
				vm.Stop(context.Background())
			}
		}
	})
	for i, err := range errs {
		if err != nil {
			t.Fatalf("start %s: %v", opts[i].Name, err)
		}
	}
	a, b := vms[0], vms[1]
	t.Logf("ready after %v (a) and %v (b), accel %s", a.ReadyAfter, b.ReadyAfter, a.Accel)

	// SSH works with the pinned host key, and the guest is the image's kernel.
	for _, c := range []struct {
		vm     *VM
		signer ssh.Signer
	}{{a, signerA}, {b, signerB}} {
		out, err := run(t, c.vm, c.signer, "echo ok")
		if err != nil || out != "ok\n" {
			t.Fatalf("%s: echo ok = %q, %v", c.vm.Name, out, err)
		}
		out, err = run(t, c.vm, c.signer, "uname -r; hostname")
		if want := img.KernelVersion + "\n" + c.vm.Name + "\n"; err != nil || out != want {
			t.Errorf("%s: uname -r; hostname = %q, %v; want %q", c.vm.Name, out, err, want)
		}
	}

	// Per-instance identity: different host keys, and neither VM accepts the
	// other's key or presents a key the client did not pin.
	if string(a.HostKey.Marshal()) == string(b.HostKey.Marshal()) {
		t.Fatal("both VMs have the same host key")
	}
	if _, err := run(t, b, signerA, "true"); err == nil || !strings.Contains(err.Error(), "unable to authenticate") {
		t.Errorf("vm-b accepted vm-a's client key: err = %v", err)
	}
	wrongPin := *b
	wrongPin.HostKey = a.HostKey
	if _, err := run(t, &wrongPin, signerB, "true"); err == nil || !strings.Contains(err.Error(), "host key") {
		t.Errorf("connecting to vm-b while pinning vm-a's host key: err = %v, want a host key mismatch", err)
	}

	checkEgress(t, egressSetup{
		isolated: a, isolatedSigner: signerA, open: b, openSigner: signerB,
		allowed: allowed, hostSvc: hostSvc, egress: egress, outside: outside,
	})

	// A later process finds the VMs through their state directories.
	found, partial, err := List(root)
	if err != nil || len(found) != 2 || len(partial) != 0 {
		t.Fatalf("List = %d vms, partial %v, %v; want 2", len(found), partial, err)
	}
	fb, err := Open(b.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	if fb.PID != b.PID || fb.SSHAddr != b.SSHAddr || string(fb.HostKey.Marshal()) != string(b.HostKey.Marshal()) {
		t.Errorf("Open = %+v, want the metadata of %+v", fb, b)
	}
	if !fb.Running() {
		t.Error("Open(vm-b).Running() = false")
	}
	if out, err := run(t, fb, signerB, "echo ok"); err != nil || out != "ok\n" {
		t.Errorf("SSH through the reopened VM: %q, %v", out, err)
	}

	// Stop: through the reopened handle for B (not our child: pid file path),
	// through the original handle for A.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, vm := range []*VM{fb, a} {
		if err := vm.Stop(ctx); err != nil {
			t.Fatalf("stop %s: %v", vm.Name, err)
		}
		// This test process is vm-b's parent, so its killed qemu stays a
		// zombie until the watcher started by Start reaps it (in a real later
		// process, init does). Wait for that before checking the pid.
		select {
		case <-b.exited:
		case <-time.After(5 * time.Second):
			t.Fatal("vm-b's qemu was not reaped after Stop through Open")
		}
		if !gone(vm.PID) {
			t.Errorf("%s: qemu pid %d still exists after Stop", vm.Name, vm.PID)
		}
		if _, err := os.Stat(vm.StateDir); !os.IsNotExist(err) {
			t.Errorf("%s: state dir still exists: %v", vm.Name, err)
		}
		if err := vm.Stop(ctx); err != nil {
			t.Errorf("%s: second Stop: %v", vm.Name, err)
		}
	}
	assertNoQEMU(t, root)
}

// assertNoQEMU fails if any process's command line mentions dir.
func assertNoQEMU(t *testing.T, dir string) {
	t.Helper()
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && strings.Contains(string(b), dir) {
			t.Errorf("process %s still runs: %q", filepath.Dir(p), strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
}

// egressSetup is what checkEgress probes: two booted VMs and the listeners
// they should or should not reach.
type egressSetup struct {
	isolated, open             *VM
	isolatedSigner, openSigner ssh.Signer
	allowed                    *listener    // allowed for both (EgressAllow)
	hostSvc                    *listener    // another host loopback port
	egress                     *listener    // behind the isolated VM's GuestForward
	outside                    *outsideHost // beyond the host; also a link-local address
}

// checkEgress proves the hosted firewall's rules from inside the guests,
// with busybox nc (bounded by -w) and nslookup (bounded by -timeout):
//   - isolated: the allowed endpoint answers at 10.0.2.2:PORT; the host's
//     other loopback ports (through either slirp address), the other VM's
//     SSH forward, a link-local address, a host outside and DNS all fail;
//   - open: the allowed endpoint answers too, and so do the outside host,
//     the link-local address and the host's loopback, so the isolated
//     failures are the policy's doing, not a broken test network.
func checkEgress(t *testing.T, s egressSetup) {
	t.Helper()
	_, openSSH, _ := net.SplitHostPort(s.open.SSHAddr)
	gw, eg := image.GuestGateway, image.GuestEgressAddr
	port := func(l *listener) string { return strconv.Itoa(l.port()) }
	outside := strconv.Itoa(s.outside.Port())
	checks := []struct {
		name  string
		open  bool // from the open VM, else from the isolated one
		addr  string
		reach string // substring of the answer; "" when the connection must fail
	}{
		{"isolated: the allowed endpoint", false, eg + ":" + port(s.allowed), "COORDINATOR"},
		{"isolated: its guest forward", false, "10.0.2.100:3128", "EGRESS-GATEWAY"},
		{"isolated: another host loopback port at 10.0.2.2", false, eg + ":" + port(s.hostSvc), ""},
		{"isolated: another host loopback port at slirp's address", false, gw + ":" + port(s.hostSvc), ""},
		{"isolated: the other VM's SSH forward at 10.0.2.2", false, eg + ":" + openSSH, ""},
		{"isolated: the other VM's SSH forward at slirp's address", false, gw + ":" + openSSH, ""},
		{"isolated: a link-local address", false, s.outside.LinkLocal.String() + ":" + outside, ""},
		{"isolated: a host outside", false, s.outside.Addr.String() + ":" + outside, ""},
		{"open: the allowed endpoint", true, eg + ":" + port(s.allowed), "COORDINATOR"},
		{"open: a host outside", true, s.outside.Addr.String() + ":" + outside, "OUTSIDE"},
		{"open: a link-local address", true, s.outside.LinkLocal.String() + ":" + outside, "OUTSIDE"},
		{"open: the host's loopback at slirp's address", true, gw + ":" + port(s.hostSvc), "HOST-SERVICE"},
	}
	before := s.hostSvc.accepted.Load()
	for _, c := range checks {
		vm, signer := s.isolated, s.isolatedSigner
		if c.open {
			vm, signer = s.open, s.openSigner
		}
		host, p, _ := net.SplitHostPort(c.addr)
		out, err := run(t, vm, signer, fmt.Sprintf("nc -w 3 %s %s </dev/null 2>&1 | head -c 200", host, p))
		out = strings.TrimSpace(out)
		t.Logf("%s (%s): %q", c.name, c.addr, out)
		switch {
		case err != nil:
			t.Errorf("%s: ssh: %v", c.name, err)
		case c.reach != "" && !strings.Contains(out, c.reach):
			t.Errorf("%s (%s): got %q, want %q", c.name, c.addr, out, c.reach)
		case c.reach == "" && !strings.Contains(out, "can't connect"):
			t.Errorf("%s (%s): got %q, want the connection to fail", c.name, c.addr, out)
		}
	}
	if n := s.hostSvc.accepted.Load() - before; n != 1 {
		t.Errorf("the unallowed host loopback service accepted %d connections, want only the open VM's", n)
	}
	if n := s.outside.listener.accepted.Load(); n != 2 {
		t.Errorf("the outside host accepted %d connections, want only the open VM's 2", n)
	}
	if n := s.egress.accepted.Load(); n != 1 {
		t.Errorf("the guest forward's listener accepted %d connections, want 1", n)
	}
	// DNS goes to slirp's resolver, which forwards to the host's: refused
	// in isolated mode (no answer at all), within the bound.
	start := time.Now()
	out, err := run(t, s.isolated, s.isolatedSigner, "nslookup -timeout=2 -retry=1 mayfly-egress-test.invalid "+image.GuestDNS+" 2>&1; echo status=$?")
	t.Logf("isolated: DNS through %s: %q in %v", image.GuestDNS, strings.TrimSpace(out), time.Since(start).Round(time.Millisecond))
	if err != nil || !strings.Contains(out, "timed out") || strings.Contains(out, "status=0") {
		t.Errorf("isolated: DNS answered or did not time out: %q, %v", out, err)
	}
}
