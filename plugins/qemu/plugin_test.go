package qemu_test

// These tests boot real qemu VMs: about six boots in all (four in the
// conformance kit, two in TestPluginVMs), because each costs some seconds
// of a CPU under software emulation.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
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
	"github.com/mayfly-ci/mayfly/plugins/qemu"
	"github.com/mayfly-ci/mayfly/plugins/qemu/qemuvm"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/conformance"
	"github.com/mayfly-ci/mayfly/providers/host"
	"github.com/mayfly-ci/mayfly/provisioner/image"
)

// bootTimeout is the plugin's boot_timeout in these tests: generous, as two
// emulated VMs share two loaded cores.
const bootTimeout = 60 * time.Second

// pluginBinary is the plugin built by TestMain.
var pluginBinary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "mayfly-plugin-qemu-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	pluginBinary = filepath.Join(dir, "mayfly-plugin-qemu")
	out, err := exec.Command("go", "build", "-o", pluginBinary, "./cmd/mayfly-plugin-qemu").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build the plugin: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// need skips the test when a prerequisite is missing, or fails it when CI=true.
func need(t testing.TB, what string, ok bool) {
	t.Helper()
	if ok {
		return
	}
	testenv.Missing(t, what+" is missing (run scripts/setup-vm.sh)")
}

// imageCacheDir is the repository's image cache (MAYFLY_CACHE_DIR overrides).
func imageCacheDir(t testing.TB) string {
	t.Helper()
	if dir := os.Getenv("MAYFLY_CACHE_DIR"); dir != "" {
		return dir
	}
	dir, _ := os.Getwd()
	for ; ; dir = filepath.Dir(dir) {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return filepath.Join(dir, image.DefaultCacheDir)
		}
		if dir == filepath.Dir(dir) {
			t.Fatal("no go.mod above the test directory")
		}
	}
}

var (
	imageOnce sync.Once
	testImg   *image.Image
	imageErr  error
)

// baseImage returns the base image, building it once, or skips the test.
func baseImage(t testing.TB) *image.Image {
	t.Helper()
	_, err := exec.LookPath(qemuvm.DefaultQEMU)
	need(t, "qemu-system-x86_64 (Debian package qemu-system-x86)", err == nil)
	imageOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		testImg, imageErr = image.Build(ctx, image.Options{CacheDir: imageCacheDir(t)})
	})
	if errors.Is(imageErr, image.ErrMissing) {
		need(t, imageErr.Error(), false)
	}
	if imageErr != nil {
		t.Fatal(imageErr)
	}
	return testImg
}

// logger shows the plugin's logs on stderr with -v, else only warnings.
func logger() *slog.Logger {
	level := slog.LevelWarn
	if testing.Verbose() {
		level = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}

// startPlugin starts the plugin binary through the real plugin host.
func startPlugin(t testing.TB) *host.Plugin {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := host.Start(ctx, host.Config{Name: "qemu", Path: pluginBinary, Logger: logger(),
		CallTimeout: 90 * time.Second, MinBackoff: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func settingsJSON(t testing.TB, m map[string]any) json.RawMessage {
	t.Helper()
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// stateDir returns a fresh state directory whose VMs are removed, and
// checked to have no qemu left, when the test ends (after the provider's own
// clean-up, which runs first).
func stateDir(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		groups, _ := os.ReadDir(dir)
		for _, g := range groups {
			vms, _ := os.ReadDir(filepath.Join(dir, g.Name()))
			for _, vm := range vms {
				p := filepath.Join(dir, g.Name(), vm.Name())
				t.Errorf("VM state %s left behind; removing it", p)
				if err := qemuvm.Remove(ctx, p); err != nil {
					t.Error(err)
				}
			}
		}
		assertNoQEMU(t, dir)
	})
	return dir
}

// assertNoQEMU fails if any live process's command line mentions dir.
func assertNoQEMU(t testing.TB, dir string) {
	t.Helper()
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && strings.Contains(string(b), dir) {
			t.Errorf("process %s still runs: %q", filepath.Dir(p), strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
}

// processGone reports whether pid names no live process (a zombie counts
// as gone: it runs nothing and holds no port).
func processGone(pid int) bool {
	if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
		return true
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	_, after, _ := strings.Cut(string(b), ") ")
	return strings.HasPrefix(after, "Z")
}

func TestConformance(t *testing.T) {
	img := baseImage(t)
	// groupDir is the state directory of the group of the fault case that
	// runs (the kit runs them one after the other).
	var groupDir string
	faultSettings := func(extra map[string]any) func(t *testing.T) json.RawMessage {
		return func(t *testing.T) json.RawMessage {
			dir := stateDir(t)
			groupDir = filepath.Join(dir, qemu.DefaultGroup)
			s := map[string]any{"state_dir": dir, "kernel": img.Kernel, "initrd": img.Initrd, "boot_timeout": bootTimeout.String()}
			maps.Copy(s, extra)
			return settingsJSON(t, s)
		}
	}
	// placeholder is the state directory of an instance the group counts
	// but that runs no VM: it fills max_instances without a boot.
	placeholder := func() string { return filepath.Join(groupDir, "mayfly-000000000000") }
	conformance.Run(t, func(t *testing.T) providers.Provider {
		return startPlugin(t)
	}, conformance.Options{
		Settings:        faultSettings(nil),
		InvalidSettings: json.RawMessage(`{"memroy_mb": 512}`),
		Faults: []conformance.Fault{
			{
				Name:     "MaxInstancesReached",
				Settings: faultSettings(map[string]any{"max_instances": 1}),
				Arm: func(t *testing.T) {
					if err := os.MkdirAll(placeholder(), 0o700); err != nil {
						t.Fatal(err)
					}
				},
				Disarm: func(t *testing.T) {
					if err := os.RemoveAll(placeholder()); err != nil {
						t.Fatal(err)
					}
				},
				Op: "create", Want: providers.KindQuotaExceeded, WantScope: "qemu/" + qemu.DefaultGroup,
			},
			{
				Name:     "StateDirUnreadable",
				Settings: faultSettings(nil),
				Arm: func(t *testing.T) {
					// A file where the group's directory was: List cannot read it.
					if err := os.RemoveAll(groupDir); err != nil {
						t.Fatal(err)
					}
					if err := os.WriteFile(groupDir, nil, 0o600); err != nil {
						t.Fatal(err)
					}
				},
				Disarm: func(t *testing.T) {
					if err := os.Remove(groupDir); err != nil {
						t.Fatal(err)
					}
				},
				Op: "list", Want: providers.KindTransient,
			},
		},
		// Instances must run within the boot timeout plus qemu's start.
		ReadyTimeout: bootTimeout + 15*time.Second,
		PollInterval: 250 * time.Millisecond,
		CallTimeout:  90 * time.Second,
		// Two concurrent creates: with the lifecycle's two, four boots.
		Concurrency: 2,
	})
}

// waitList polls List until cond holds or timeout passes.
func waitList(t testing.TB, p providers.Provider, timeout time.Duration, what string, cond func(map[string]providers.Instance) error) map[string]providers.Instance {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		list, err := p.List(ctx)
		cancel()
		m := map[string]providers.Instance{}
		for _, in := range list {
			m[in.ID] = in
		}
		if err == nil {
			if err = cond(m); err == nil {
				return m
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("waiting %v for %s: %v", timeout, what, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func running(ids ...string) func(map[string]providers.Instance) error {
	return func(m map[string]providers.Instance) error {
		for _, id := range ids {
			in, ok := m[id]
			switch {
			case !ok:
				return fmt.Errorf("%s not listed", id)
			case in.State == providers.StateFailed:
				return fmt.Errorf("%s failed: %s", id, in.Reason)
			case in.State != providers.StateRunning:
				return fmt.Errorf("%s is %s", id, in.State)
			}
		}
		return nil
	}
}

// sshRun runs command on the instance described by ci, pinning its host key.
func sshRun(t testing.TB, ci providers.ConnectInfo, command string) (string, error) {
	t.Helper()
	signer, err := ssh.ParsePrivateKey(ci.PrivateKey)
	if err != nil {
		t.Fatalf("private key of %s: %v", ci.ID, err)
	}
	hostKey, _, _, _, err := ssh.ParseAuthorizedKey([]byte(ci.HostKey))
	if err != nil {
		t.Fatalf("host key of %s: %v", ci.ID, err)
	}
	cfg := &ssh.ClientConfig{
		User:              ci.Username,
		Auth:              []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback:   ssh.FixedHostKey(hostKey),
		HostKeyAlgorithms: []string{hostKey.Type()},
		Timeout:           20 * time.Second,
	}
	client, err := ssh.Dial("tcp", net.JoinHostPort(ci.Address, strconv.Itoa(ci.Port)), cfg)
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

// hostListener stands for the manager: a service on the host's loopback
// that counts its connections.
type hostListener struct {
	net.Listener
	accepted atomic.Int32
	wg       sync.WaitGroup
}

func newHostListener(t *testing.T) *hostListener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := &hostListener{Listener: l}
	h.wg.Go(func() { // ends when Close (in t.Cleanup) makes Accept fail
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			h.accepted.Add(1)
			c.Close()
		}
	})
	t.Cleanup(func() { l.Close(); h.wg.Wait() })
	return h
}

// TestPluginVMs drives two VMs through the plugin binary and the host:
// the plugin is killed while they boot, the restarted plugin adopts them
// from the state directory; then SSH with the ConnectInfo, isolation between
// the VMs and from the host's loopback, the forward bound to 127.0.0.1 only,
// Heartbeat, and Delete leaving no qemu process and no state.
func TestPluginVMs(t *testing.T) {
	baseImage(t)
	state := stateDir(t)
	p := startPlugin(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// image_cache_dir (not kernel/initrd) so that Init resolves the image
	// itself, on each start of the plugin; the image is cached by now.
	info, err := p.Init(ctx, settingsJSON(t, map[string]any{
		"state_dir": state, "image_cache_dir": imageCacheDir(t), "boot_timeout": bootTimeout.String(),
		"group": "e2e", "max_instances": 2,
	}))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(info.ID, "/e2e") || info.MaxSize != 2 {
		t.Errorf("Info = %+v, want ID ending /e2e and MaxSize 2", info)
	}
	labels := map[string]string{providers.LabelManager: "test-manager", providers.LabelRunner: "e2e"}
	ids, err := p.Create(ctx, 2, labels)
	if err != nil || len(ids) != 2 {
		t.Fatalf("Create(2) = %v, %v", ids, err)
	}
	// max_instances: a third instance does not fit.
	if more, err := p.Create(ctx, 1, labels); len(more) != 0 || err == nil {
		t.Errorf("Create beyond max_instances = %v, %v; want a quota error", more, err)
	} else if scope, ok := providers.IsQuotaExceeded(err); !ok || scope != "qemu/e2e" {
		t.Errorf("Create beyond max_instances: %v, want quota exceeded in qemu/e2e", err)
	}

	// Wait until both qemu processes run (ConnectInfo answers), then kill
	// the plugin; the host restarts it and runs Init again.
	deadline := time.Now().Add(30 * time.Second)
	for _, id := range ids {
		for {
			_, err := p.ConnectInfo(ctx, id)
			if err == nil {
				break
			}
			if !providers.IsTransient(err) || time.Now().After(deadline) {
				t.Fatalf("ConnectInfo(%s) while starting: %v", id, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	list, err := p.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range list {
		t.Logf("before the plugin restart: %s is %s", in.ID, in.State)
	}
	oldPID := p.PID()
	if err := syscall.Kill(oldPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for p.PID() == 0 || p.PID() == oldPID {
		if time.Now().After(deadline) {
			t.Fatal("the plugin was not restarted")
		}
		time.Sleep(20 * time.Millisecond)
	}

	m := waitList(t, p, bootTimeout+15*time.Second, "both VMs to run under the restarted plugin", running(ids...))
	for _, id := range ids {
		if !m[id].HasLabels(labels) {
			t.Errorf("%s labels %v after restart, want %v", id, m[id].Labels, labels)
		}
	}
	if len(m) != 2 {
		t.Errorf("List after restart = %v, want exactly the two VMs", m)
	}

	// SSH with the ConnectInfo of the restarted plugin: key and pinned host key.
	cis := make([]providers.ConnectInfo, 2)
	pids := make([]int, 2)
	for i, id := range ids {
		ci, err := p.ConnectInfo(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if err := ci.Validate(); err != nil {
			t.Fatal(err)
		}
		if ci.Address != "127.0.0.1" || ci.Protocol != providers.ProtocolSSH || ci.OS != "linux" ||
			ci.Arch != "amd64" || ci.Username != "root" || ci.HostKey == "" {
			t.Errorf("ConnectInfo(%s) = %+v", id, ci)
		}
		cis[i] = ci
		out, err := sshRun(t, ci, "echo ok")
		if err != nil || out != "ok\n" {
			t.Fatalf("%s: echo ok = %q, %v", id, out, err)
		}
		if err := p.Heartbeat(ctx, id); err != nil {
			t.Errorf("Heartbeat(%s): %v", id, err)
		}
		vm, err := qemuvm.Open(filepath.Join(state, "e2e", id))
		if err != nil {
			t.Fatal(err)
		}
		pids[i] = vm.PID
		// The key files are for the plugin's user only.
		for _, f := range []string{qemu.ClientKeyFile, "initrd.gz"} {
			if fi, err := os.Stat(filepath.Join(vm.StateDir, f)); err != nil || fi.Mode().Perm() != 0o600 {
				t.Errorf("%s/%s: %v, mode %v; want 0600", id, f, err, fi.Mode().Perm())
			}
		}

		// The SSH forward, and every other listening socket of this qemu,
		// is bound to 127.0.0.1: nothing but the host's loopback reaches it.
		addrs, err := qemuvm.ListeningTCP(vm.PID)
		if err != nil {
			t.Fatal(err)
		}
		wantAddr := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(ci.Port))
		found := false
		for _, a := range addrs {
			if !a.Addr().IsLoopback() {
				t.Errorf("%s: qemu pid %d listens on %v, beyond the loopback", id, vm.PID, a)
			}
			found = found || a == wantAddr
		}
		if !found {
			t.Errorf("%s: qemu pid %d listens on %v, not on the forward %v", id, vm.PID, addrs, wantAddr)
		}
	}
	// Each VM presents its own host key: pinning A's key against B fails.
	wrong := cis[1]
	wrong.HostKey = cis[0].HostKey
	if _, err := sshRun(t, wrong, "true"); err == nil || !strings.Contains(err.Error(), "host key") {
		t.Errorf("SSH to %s pinning %s's host key: %v, want a host key mismatch", ids[1], ids[0], err)
	}

	// Isolation, tried from inside VM A with busybox nc: slirp maps
	// 10.0.2.2 to the host's loopback, where B's forward and the manager
	// listen. Both must be refused.
	manager := newHostListener(t)
	for _, c := range []struct{ name, port string }{
		{"B's SSH forward", strconv.Itoa(cis[1].Port)},
		{"a host loopback service", strconv.Itoa(manager.Addr().(*net.TCPAddr).Port)},
	} {
		out, _ := sshRun(t, cis[0], fmt.Sprintf("nc -w 3 %s %s </dev/null 2>&1 | head -c 200", image.GuestGateway, c.port))
		t.Logf("from A to %s (%s:%s): %q", c.name, image.GuestGateway, c.port, strings.TrimSpace(out))
		if !strings.Contains(out, "refused") {
			t.Errorf("from A to %s: %q, want connection refused", c.name, out)
		}
		if strings.Contains(out, "SSH-") {
			t.Errorf("from A, %s answered: %q", c.name, out)
		}
	}
	if n := manager.accepted.Load(); n != 0 {
		t.Errorf("the host loopback service accepted %d connections from a VM", n)
	}

	// Delete: no qemu process and no state are left, and it is idempotent.
	deleted, err := p.Delete(ctx, ids)
	if err != nil || len(deleted) != 2 {
		t.Fatalf("Delete(%v) = %v, %v", ids, deleted, err)
	}
	for i, id := range ids {
		if !processGone(pids[i]) {
			t.Errorf("%s: qemu pid %d still runs after Delete", id, pids[i])
		}
		if _, err := os.Stat(filepath.Join(state, "e2e", id)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: state dir still exists: %v", id, err)
		}
		if _, err := p.ConnectInfo(ctx, id); !providers.IsNotFound(err) {
			t.Errorf("ConnectInfo(%s) after Delete: %v, want not found", id, err)
		}
	}
	if list, err := p.List(ctx); err != nil || len(list) != 0 {
		t.Errorf("List after Delete = %v, %v; want empty", list, err)
	}
	if again, err := p.Delete(ctx, ids); err != nil || len(again) != 2 {
		t.Errorf("second Delete = %v, %v", again, err)
	}
	assertNoQEMU(t, state)
}

// TestBootFailures checks that a VM that never becomes ready is listed
// failed with a reason and has no qemu left, in process (no plugin host):
// a bogus kernel (qemu exits at once) and a boot timeout too short for
// the real image.
func TestBootFailures(t *testing.T) {
	img := baseImage(t)
	dir := t.TempDir()
	bogus := filepath.Join(dir, "bogus-vmlinuz")
	if err := os.WriteFile(bogus, []byte("this is not a kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name       string
		settings   map[string]any
		wantReason string
	}{
		{"bogus kernel", map[string]any{"kernel": bogus, "initrd": img.Initrd}, "exited"},
		{"boot timeout", map[string]any{"kernel": img.Kernel, "initrd": img.Initrd, "boot_timeout": "1s"}, "boot timeout"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			state := stateDir(t)
			tt.settings["state_dir"] = state
			p := qemu.New(slog.New(slog.NewTextHandler(io.Discard, nil)))
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			defer p.Shutdown(ctx)
			if _, err := p.Init(ctx, settingsJSON(t, tt.settings)); err != nil {
				t.Fatal(err)
			}
			ids, err := p.Create(ctx, 1, map[string]string{"k": "v"})
			if err != nil || len(ids) != 1 {
				t.Fatalf("Create(1) = %v, %v", ids, err)
			}
			id := ids[0]
			m := waitList(t, p, 30*time.Second, "the instance to fail", func(m map[string]providers.Instance) error {
				if in := m[id]; in.State != providers.StateFailed {
					return fmt.Errorf("%s is %q", id, in.State)
				}
				return nil
			})
			in := m[id]
			t.Logf("%s: failed: %s", tt.name, in.Reason)
			if !strings.Contains(in.Reason, tt.wantReason) {
				t.Errorf("reason %q does not say %q", in.Reason, tt.wantReason)
			}
			if in.Labels["k"] != "v" {
				t.Errorf("labels of the failed instance: %v", in.Labels)
			}
			// List may report the passed deadline a moment before the boot
			// watcher has killed qemu.
			if vm, err := qemuvm.Open(filepath.Join(state, qemu.DefaultGroup, id)); err == nil {
				for deadline := time.Now().Add(10 * time.Second); !processGone(vm.PID) && time.Now().Before(deadline); {
					time.Sleep(50 * time.Millisecond)
				}
				if !processGone(vm.PID) {
					t.Errorf("qemu pid %d of the failed instance still runs 10 s after it was listed failed", vm.PID)
				}
			}
			assertNoQEMU(t, state)
			if err := p.Heartbeat(ctx, id); err == nil {
				t.Error("Heartbeat of a failed instance succeeded")
			}
			if deleted, err := p.Delete(ctx, ids); err != nil || len(deleted) != 1 {
				t.Fatalf("Delete = %v, %v", deleted, err)
			}
			if list, err := p.List(ctx); err != nil || len(list) != 0 {
				t.Errorf("List after Delete = %v, %v", list, err)
			}
		})
	}
}

// TestNotInitialised checks calls before Init and after Shutdown.
func TestNotInitialised(t *testing.T) {
	p := qemu.New(nil)
	ctx := context.Background()
	if _, err := p.List(ctx); !providers.IsPermanent(err) {
		t.Errorf("List before Init: %v, want a permanent error", err)
	}
	if err := p.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Create(ctx, 1, nil); !errors.Is(err, providers.ErrClosed) {
		t.Errorf("Create after Shutdown: %v, want ErrClosed", err)
	}
	if _, err := p.Init(ctx, nil); !errors.Is(err, providers.ErrClosed) {
		t.Errorf("Init after Shutdown: %v, want ErrClosed", err)
	}
}
