package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers/fake"
)

// The faults a chaos trial injects besides the kill of `mayfly run`: each
// trial has one kind, seeded, and the table has a row per kind.
const (
	faultNone        = "none"
	faultPluginKill  = "plugin_kill"     // SIGKILL of the provider plugin process, twice
	faultProvider    = "provider"        // the fake provider fails 10 % of its calls (fake.ChaosSpec)
	faultSSHDrop     = "ssh_drop"        // every SSH connection to the instances severed, now and then
	faultCoordinator = "coordinator_5xx" // GitLab answers 503 to everything for a while
)

// sshProxy is a TCP proxy in front of the trial's SSH server: every fake
// instance's connect info points at it, and sever cuts every connection
// through it at once, as a network that drops them mid-stage.
type sshProxy struct {
	ln     net.Listener
	target string

	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	first   time.Time // the first connection accepted
	severed int       // connections cut by sever
	wg      sync.WaitGroup
}

func startSSHProxy(t testing.TB, target string) *sshProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &sshProxy{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(func() {
		ln.Close()
		p.sever()
		p.wg.Wait()
	})
	return p
}

func (p *sshProxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go func() { defer p.wg.Done(); p.pipe(c) }()
	}
}

func (p *sshProxy) pipe(c net.Conn) {
	u, err := net.DialTimeout("tcp", p.target, 10*time.Second)
	if err != nil {
		c.Close()
		return
	}
	p.mu.Lock()
	if p.first.IsZero() {
		p.first = time.Now()
	}
	p.conns[c], p.conns[u] = struct{}{}, struct{}{}
	p.mu.Unlock()
	done := make(chan struct{}, 2)
	cp := func(dst, src net.Conn) { _, _ = io.Copy(dst, src); dst.Close(); src.Close(); done <- struct{}{} }
	go cp(u, c)
	go cp(c, u)
	<-done
	<-done
	p.mu.Lock()
	delete(p.conns, c)
	delete(p.conns, u)
	p.mu.Unlock()
}

// sever cuts every connection through the proxy and returns how many.
func (p *sshProxy) sever() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for c := range p.conns {
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetLinger(0) // a reset, as a dropped path ends it
		}
		c.Close()
		n++
	}
	p.severed += n / 2
	return n / 2
}

func (p *sshProxy) firstAccepted() (time.Time, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.first, !p.first.IsZero()
}

func (p *sshProxy) port() int { return p.ln.Addr().(*net.TCPAddr).Port }

// killPlugins sends SIGKILL to the provider plugin processes of a running
// `mayfly run`, as soon as there is one: in its start-up handshake too,
// which the host answers by starting it again. It returns how many it
// killed.
func killPlugins(ctx context.Context, m *chaosManager) int {
	var pids []int
	waitFor(ctx, func() bool {
		pids = pluginChildren(m)
		return !m.running() || len(pids) > 0
	})
	n := 0
	for _, pid := range pids {
		if syscall.Kill(pid, syscall.SIGKILL) == nil {
			n++
		}
	}
	return n
}

// pluginChildren returns the pids of the provider plugin processes of a
// running `mayfly run`.
func pluginChildren(m *chaosManager) []int {
	if !m.running() {
		return nil
	}
	tasks, _ := filepath.Glob(filepath.Join("/proc", strconv.Itoa(m.cmd.Process.Pid), "task", "*", "children"))
	var pids []int
	for _, f := range tasks {
		b, _ := os.ReadFile(f)
		for _, c := range strings.Fields(string(b)) {
			cpid, err := strconv.Atoi(c)
			if err != nil {
				continue
			}
			comm, _ := os.ReadFile(filepath.Join("/proc", c, "comm"))
			if strings.HasPrefix(string(comm), "mayfly-plugin") {
				pids = append(pids, cpid)
			}
		}
	}
	return pids
}

// providerStates returns the state of every instance in the fake
// provider's state file ("unreadable" for a file that cannot be read).
func providerStates(dir string) map[string]string {
	b, err := os.ReadFile(filepath.Join(dir, "provider", "state.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var st struct {
		Instances []struct {
			ID    string `json:"id"`
			State string `json:"state"`
		} `json:"instances"`
	}
	if err == nil {
		err = json.Unmarshal(b, &st)
	}
	if err != nil {
		return map[string]string{"unreadable provider state: " + err.Error(): "unreadable"}
	}
	out := map[string]string{}
	for _, in := range st.Instances {
		out[in.ID] = in.State
	}
	return out
}

// providerFaults counts the faults the fake provider's chaos mode logged.
func providerFaults(dir string) int {
	b, _ := os.ReadFile(filepath.Join(dir, "provider", fake.FaultLogName))
	return bytes.Count(b, []byte("\n"))
}

// faultDriver injects a trial's fault at seeded moments while the trial
// runs; stop ends it and returns how many faults it injected.
type faultDriver struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	n      atomic.Int64
}

// at runs f after each delay (from now) until ctx ends, adding what f
// returns to the count.
func (d *faultDriver) at(ctx context.Context, delays []time.Duration, f func() int) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		start := time.Now()
		for _, at := range delays {
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Until(start.Add(at))):
			}
			d.n.Add(int64(f()))
		}
	}()
}

func (d *faultDriver) stop() int {
	d.cancel()
	d.wg.Wait()
	return int(d.n.Load())
}

// seededDelays returns n sorted delays in [lo, hi).
func seededDelays(rng *rand.Rand, n int, lo, hi time.Duration) []time.Duration {
	out := make([]time.Duration, n)
	for i := range out {
		out[i] = lo + time.Duration(rng.Int64N(int64(hi-lo)))
	}
	slices.Sort(out)
	return out
}

// outage makes the coordinator answer 503 to every runner API call for d.
func (c *chaosCoordinator) outage(d time.Duration) int {
	c.outageUntil.Store(time.Now().Add(d).UnixNano())
	return 0 // counted as served
}

// inOutage answers 503 during an outage and reports whether it did.
func (c *chaosCoordinator) inOutage(w http.ResponseWriter, r *http.Request) bool {
	if !strings.HasPrefix(r.URL.Path, "/api/v4/") || time.Now().UnixNano() >= c.outageUntil.Load() {
		return false
	}
	c.outageServed.Add(1)
	http.Error(w, "503 Service Unavailable (chaos outage)", http.StatusServiceUnavailable)
	return true
}

// statusRecorder notes the status a handler wrote.
type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (s *statusRecorder) WriteHeader(code int) {
	if s.code == 0 {
		s.code = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.code == 0 {
		s.code = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}
