// Package dockertest starts a private Docker Engine for tests: Debian's
// dockerd (package docker.io), run as root with its own data root, exec
// root, pid file, config file and API socket, so it shares nothing with a
// Docker Engine the machine may run and several tests can run their own at
// once.
//
// The daemon is a small "machine" of its own: it runs in private network,
// PID and mount namespaces (unshare), so that its bridges, containerd,
// shims, containers and mounts die with it and never meet the host's (nor
// the host's iptables rules: a FORWARD policy of DROP left by another
// Docker Engine would cut its containers off each other). A veth pair
// joins it to the host: the host side is HostIP, the daemon's side
// GuestIP, the way a qemu VM sees its host at 10.0.2.2. A test runs the
// machine's SSH server there (sshtest.RunIn with NetNS and GuestIP), serves
// what the machine needs (a registry, git) on HostIP, and the daemon
// trusts HostIP as a plain-HTTP registry. dockerd never touches iptables
// (--iptables=false, --ip-masq=false) and has no default bridge
// (--bridge=none): containers join only networks that tests make internal,
// so no container reaches beyond the test.
package dockertest

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/internal/testenv"

	"github.com/docker/docker/client"
)

const (
	dockerdPath  = "/usr/sbin/dockerd"
	unsharePath  = "/usr/bin/unshare"
	startTimeout = 90 * time.Second
	stopTimeout  = 30 * time.Second
)

// Require skips the test when dockerd, unshare or root privileges are
// missing, and fails it instead when the environment variable CI is "true".
func Require(t testing.TB) {
	t.Helper()
	if msg := missing(); msg != "" {
		testenv.Missing(t, msg)
	}
}

// missing says what the machine lacks to run a test daemon, or "".
func missing() string {
	var miss []string
	if os.Geteuid() != 0 {
		miss = append(miss, "root")
	}
	for _, p := range []string{dockerdPath, unsharePath, "/usr/bin/containerd", "/usr/sbin/runc"} {
		if _, err := os.Stat(p); err != nil {
			miss = append(miss, p)
		}
	}
	if len(miss) == 0 {
		return ""
	}
	return "a test Docker Engine needs " + strings.Join(miss, ", ") + " (Debian package docker.io; scripts/setup.sh installs it)"
}

// Daemon is one running test dockerd.
type Daemon struct {
	// Dir holds everything the daemon keeps; removed by Stop.
	Dir string
	// Socket is the path of its API socket.
	Socket string
	// HostIP is the host's end of the veth pair to the daemon's network
	// namespace, GuestIP the daemon's end (a /30 of 10.64.0.0/10).
	HostIP, GuestIP string
	// NetNS is the path of the daemon's network namespace.
	NetNS string

	cmd     *exec.Cmd
	exited  chan struct{}
	log     lockedBuffer
	once    sync.Once
	stopErr error
}

// Run starts a daemon for the test and stops it at cleanup, failing the
// test when it cannot start. It calls Require first.
func Run(t testing.TB) *Daemon {
	t.Helper()
	Require(t)
	d, err := Start(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Stop(); err != nil {
			t.Error(err)
		}
	})
	return d
}

// Start starts a daemon in a new temporary directory and waits until it
// answers. The caller must Stop it.
func Start(ctx context.Context) (*Daemon, error) {
	if msg := missing(); msg != "" {
		return nil, errors.New(msg)
	}
	// Short paths: containerd's sockets live under the exec root and a
	// Unix socket path has at most 107 bytes.
	dir, err := os.MkdirTemp("", "mfdk-")
	if err != nil {
		return nil, err
	}
	d := &Daemon{Dir: dir, Socket: filepath.Join(dir, "docker.sock"), exited: make(chan struct{})}
	cfg := filepath.Join(dir, "daemon.json")
	if err := os.WriteFile(cfg, []byte("{}\n"), 0o600); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	hostIP, guestIP, err := pickSubnet()
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	d.HostIP, d.GuestIP = hostIP.String(), guestIP.String()
	args := []string{"--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--propagation", "private",
		"/bin/sh", "-c", `ip link set lo up && exec "$@"`, "sh",
		dockerdPath,
		"--insecure-registry", d.HostIP + "/32",
		"--config-file", cfg,
		"--data-root", filepath.Join(dir, "data"),
		"--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "dockerd.pid"),
		"--host", "unix://" + d.Socket,
		"--iptables=false", "--ip-masq=false", "--ip-forward=false", "--bridge=none",
		"--userland-proxy=false", "--storage-driver", "overlay2",
		"--log-level", "warn",
	}
	d.cmd = exec.Command(unsharePath, args...)
	d.cmd.Stdout, d.cmd.Stderr = &d.log, &d.log
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("start dockerd: %w", err)
	}
	go func() { _ = d.cmd.Wait(); close(d.exited) }() // ends when dockerd exits (Stop)
	if err := d.link(); err != nil {
		d.Stop()
		return nil, err
	}

	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	c, err := d.Client()
	if err != nil {
		d.Stop()
		return nil, err
	}
	defer c.Close()
	for {
		pctx, pcancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := c.Ping(pctx)
		pcancel()
		if err == nil {
			return d, nil
		}
		select {
		case <-d.exited:
			log := d.Log()
			d.Stop()
			return nil, fmt.Errorf("dockerd exited before answering: %s", log)
		case <-ctx.Done():
			log := d.Log()
			d.Stop()
			return nil, fmt.Errorf("dockerd did not answer on %s within %s: %v: %s", d.Socket, startTimeout, err, log)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// link finds the daemon's namespace and joins it to the host with a veth
// pair.
func (d *Daemon) link() error {
	var pid int
	for range 100 {
		if kids := children(d.cmd.Process.Pid); len(kids) > 0 {
			pid = kids[0]
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if pid == 0 {
		return fmt.Errorf("dockerd's namespace did not start: %s", d.Log())
	}
	d.NetNS = fmt.Sprintf("/proc/%d/ns/net", pid)
	var rnd [3]byte
	_, _ = crand.Read(rnd[:])
	host, guest := fmt.Sprintf("mfdk%xh", rnd), fmt.Sprintf("mfdk%xg", rnd)
	steps := [][]string{
		{"ip", "link", "add", host, "type", "veth", "peer", "name", guest, "netns", strconv.Itoa(pid)},
		{"ip", "addr", "add", d.HostIP + "/30", "dev", host},
		{"ip", "link", "set", host, "up"},
		{"nsenter", "--net=" + d.NetNS, "ip", "addr", "add", d.GuestIP + "/30", "dev", guest},
		{"nsenter", "--net=" + d.NetNS, "ip", "link", "set", guest, "up"},
	}
	for _, st := range steps {
		if out, err := exec.Command(st[0], st[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %v: %s", strings.Join(st, " "), err, out)
		}
	}
	return nil
}

// pickSubnet picks a /30 in 10.64.0.0/10 that no address of the host's
// is in: its first address for the host, its second for the daemon.
func pickSubnet() (net.IP, net.IP, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, nil, err
	}
	for range 50 {
		var b [3]byte
		_, _ = crand.Read(b[:])
		base := net.IPv4(10, 64+b[0]%64, b[1], b[2]&^3)
		sub := &net.IPNet{IP: base, Mask: net.CIDRMask(30, 32)}
		free := true
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok && (sub.Contains(n.IP) || n.Contains(base)) {
				free = false
			}
		}
		if free {
			b4 := base.To4()
			return net.IPv4(b4[0], b4[1], b4[2], b4[3]+1), net.IPv4(b4[0], b4[1], b4[2], b4[3]+2), nil
		}
	}
	return nil, nil, errors.New("no free /30 in 10.64.0.0/10 for the test daemon")
}

// Client returns an API client on the daemon's socket.
func (d *Daemon) Client() (*client.Client, error) {
	return client.NewClientWithOpts(client.WithHost("unix://"+d.Socket), client.WithAPIVersionNegotiation())
}

// Log returns what dockerd wrote so far.
func (d *Daemon) Log() string { return d.log.String() }

// Stop stops the daemon and everything it started (its namespaces take
// its bridges and the veth pair along) and removes its directory.
func (d *Daemon) Stop() error {
	d.once.Do(func() {
		var errs []error
		if d.cmd.Process != nil {
			// dockerd (unshare's child, PID 1 of the namespace) stops
			// its containers on SIGTERM; the namespace takes whatever is
			// left when it exits.
			for _, pid := range children(d.cmd.Process.Pid) {
				_ = syscall.Kill(pid, syscall.SIGTERM)
			}
			select {
			case <-d.exited:
			case <-time.After(stopTimeout):
				_ = syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
				<-d.exited
				errs = append(errs, fmt.Errorf("dockerd did not stop within %s after SIGTERM: killed", stopTimeout))
			}
		}
		if err := os.RemoveAll(d.Dir); err != nil {
			errs = append(errs, fmt.Errorf("remove the test daemon's directory: %w", err))
		}
		d.stopErr = errors.Join(errs...)
	})
	return d.stopErr
}

// children returns the child processes of pid.
func children(pid int) []int {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	if err != nil {
		return nil
	}
	var out []int
	for _, f := range strings.Fields(string(data)) {
		if n, err := strconv.Atoi(f); err == nil {
			out = append(out, n)
		}
	}
	return out
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
