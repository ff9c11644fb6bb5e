// Package dockertest starts a private Docker Engine for tests: Debian's
// dockerd (package docker.io), run as root with its own data root, exec
// root, pid file, config file and API socket, so it shares nothing with a
// Docker Engine the machine may run and several tests can run their own at
// once.
//
// It runs in private PID and mount namespaces (unshare), so that its
// containerd, shims and containers die with it and its mounts never reach
// the host; it stays in the host's network namespace, so that a test's
// local SSH server reaches it and its containers as a VM's sshd reaches
// the VM's Docker Engine. It never touches iptables (--iptables=false,
// --ip-masq=false) and has no default bridge (--bridge=none): containers
// only join networks the test or the code under test makes, which tests
// make internal, so no container reaches beyond the test.
package dockertest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/docker/docker/api/types/network"
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
		if os.Getenv("CI") == "true" {
			t.Fatal(msg + "; failing because CI=true")
		}
		t.Skip(msg)
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
	args := []string{"--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--propagation", "private",
		dockerdPath,
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

// Client returns an API client on the daemon's socket.
func (d *Daemon) Client() (*client.Client, error) {
	return client.NewClientWithOpts(client.WithHost("unix://"+d.Socket), client.WithAPIVersionNegotiation())
}

// Log returns what dockerd wrote so far.
func (d *Daemon) Log() string { return d.log.String() }

// Stop removes the networks left on the daemon (their bridges live in the
// host's network namespace), stops it and everything it started, and
// removes its directory.
func (d *Daemon) Stop() error {
	d.once.Do(func() {
		var errs []error
		if err := d.removeNetworks(); err != nil {
			errs = append(errs, err)
		}
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

// removeNetworks stops every container and removes every network but the
// predefined ones, so that no bridge outlives the daemon.
func (d *Daemon) removeNetworks() error {
	select {
	case <-d.exited:
		return nil
	default:
	}
	ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
	defer cancel()
	c, err := d.Client()
	if err != nil {
		return err
	}
	defer c.Close()
	nets, err := c.NetworkList(ctx, network.ListOptions{})
	if err != nil {
		return fmt.Errorf("list the test daemon's networks: %w", err)
	}
	var errs []error
	for _, n := range nets {
		if n.Name == "none" || n.Name == "host" || n.Name == "bridge" {
			continue
		}
		ins, err := c.NetworkInspect(ctx, n.ID, network.InspectOptions{})
		if err == nil {
			for id := range ins.Containers {
				_ = c.NetworkDisconnect(ctx, n.ID, id, true)
			}
		}
		if err := c.NetworkRemove(ctx, n.ID); err != nil {
			errs = append(errs, fmt.Errorf("remove network %s: %w", n.Name, err))
		}
	}
	return errors.Join(errs...)
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
