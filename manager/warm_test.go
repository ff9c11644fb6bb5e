package manager_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/fleet"
	"github.com/mayfly-ci/mayfly/manager"
	"github.com/mayfly-ci/mayfly/manager/config"
	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/fake"
	"github.com/mayfly-ci/mayfly/provisioner"
	"github.com/mayfly-ci/mayfly/schedule"
	"github.com/mayfly-ci/mayfly/vmexec"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

// proxy relays TCP connections to a backend the test can change, and can
// cut the connections it relays: one per instance, so that the test can
// break an instance's warm connection or put another server behind it.
type proxy struct {
	ln net.Listener

	mu       sync.Mutex
	backend  string
	conns    []net.Conn
	accepted int
}

func newProxy(t *testing.T, backend string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, backend: backend}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return // closed at cleanup
			}
			p.mu.Lock()
			backend := p.backend
			p.accepted++
			p.mu.Unlock()
			up, err := net.DialTimeout("tcp", backend, 5*time.Second)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, up)
			p.mu.Unlock()
			wg.Add(2)
			go func() { defer wg.Done(); io.Copy(up, c); up.Close() }()
			go func() { defer wg.Done(); io.Copy(c, up); c.Close() }()
		}
	}()
	t.Cleanup(func() { ln.Close(); p.cut(); wg.Wait() })
	return p
}

// cut closes every relayed connection.
func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

func (p *proxy) retarget(backend string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.backend = backend
}

func (p *proxy) connections() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accepted
}

// warmEnv is a coordinator, a real fleet on the in-process fake provider
// whose instances each reach one real dropbear through their own proxy,
// with the provisioner keeping a warm connection per idle instance, and a
// manager.
type warmEnv struct {
	srv     *coordinator.Server
	fleet   *fleet.Fleet
	server  *sshtest.Server
	mu      sync.Mutex
	proxies map[string]*proxy
}

func newWarmEnv(t *testing.T, idle int) *warmEnv {
	t.Helper()
	e := &warmEnv{server: sshtest.Run(t, sshtest.Dropbear), proxies: map[string]*proxy{}}
	srv, err := coordinator.New(coordinator.Config{Logger: slog.New(slog.DiscardHandler), TraceUpdateInterval: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = srv.Serve(ctx, ln) }()
	if _, err := srv.RegisterRunner(coordinator.RunnerOptions{RegistrationToken: srv.RegistrationToken(), RunUntagged: true, Token: runnerToken}); err != nil {
		t.Fatal(err)
	}
	e.srv = srv
	fk, err := fake.New(fake.Options{ConnectInfo: func(id string) (providers.ConnectInfo, error) {
		p := e.proxy(t, id)
		port := p.ln.Addr().(*net.TCPAddr).Port
		return providers.ConnectInfo{ID: id, Address: "127.0.0.1", Port: port, Protocol: providers.ProtocolSSH, OS: "linux", Arch: "amd64",
			Username: e.server.User, PrivateKey: e.server.ClientKeyPEM, HostKey: e.server.HostKey}, nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	e.fleet, err = fleet.New(fleet.Config{
		Name: "warm", ManagerID: "warm-test", Provider: fk,
		Schedule: schedule.Schedule{Default: schedule.Policy{IdleCount: idle}},
		Limits:   fleet.Limits{ListIntervalBooting: 50 * time.Millisecond}, JournalPath: filepath.Join(t.TempDir(), "journal"),
		Provisioner: &provisioner.Ready{Timeout: 10 * time.Second, Command: "test -d /proc", Logger: log},
		Logger:      log,
	})
	if err != nil {
		t.Fatal(err)
	}
	wg.Add(1)
	go func() { defer wg.Done(); _ = e.fleet.Run(ctx) }()
	rc := config.Runner{
		Name: "warm", URL: "http://" + ln.Addr().String(), Token: runnerToken, RequestConcurrency: 1,
		OutputLimitKB: 4096, Executor: "instance", Shell: "sh", BuildsDir: filepath.Join(t.TempDir(), "builds"), MaxJobTimeout: time.Hour,
		Fleet: config.Fleet{Connector: config.Connector{OS: "linux", Arch: "amd64"}},
	}
	m, err := manager.New(manager.Options{
		Config: &config.Config{Concurrent: 1, CheckInterval: 50 * time.Millisecond, Runners: []config.Runner{rc}},
		Fleets: map[string]manager.Fleet{"warm": manager.FromFleet(e.fleet, func(ctx context.Context, ci providers.ConnectInfo) (vmexec.Executor, error) {
			return provisioner.Connect(ctx, ci, 5*time.Second, log)
		})},
		Logger: log, TraceInterval: 50 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	wg.Add(1)
	go func() { defer wg.Done(); _ = m.Run(ctx) }()
	t.Cleanup(func() { cancel(); wg.Wait() })
	deadline := time.Now().Add(30 * time.Second)
	for e.fleet.Available() < idle {
		if time.Now().After(deadline) {
			t.Fatalf("%d idle instances not ready within 30s", idle)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return e
}

func (e *warmEnv) proxy(t *testing.T, id string) *proxy {
	e.mu.Lock()
	defer e.mu.Unlock()
	p := e.proxies[id]
	if p == nil {
		p = newProxy(t, e.server.Addr)
		e.proxies[id] = p
	}
	return p
}

// idleIDs returns the idle instances, oldest first (the next taken first).
func (e *warmEnv) idleIDs() []string {
	var ids []string
	for _, in := range e.fleet.Status().Instances {
		if in.State == fleet.StateIdle {
			ids = append(ids, in.ID)
		}
	}
	return ids
}

// runJob queues one job and waits for its end.
func (e *warmEnv) runJob(t *testing.T) coordinator.JobRecord {
	t.Helper()
	_, err := e.srv.Apply(&coordinator.PipelineFile{Projects: []coordinator.ProjectSpec{{
		Name: "app",
		Pipelines: []coordinator.PipelineSpec{{Variables: []coordinator.VariableSpec{{Key: "GIT_STRATEGY", Value: "none"}},
			Jobs: []coordinator.JobSpec{{Name: "build", Script: []string{"echo built"}}}}},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := e.srv.WaitAllFinished(ctx); err != nil {
		t.Fatal(err)
	}
	jobs := e.srv.Jobs()
	return jobs[len(jobs)-1]
}

// A job takes its instance's warm connection: no new connection is made.
// One that died while the instance was idle is replaced before the job
// uses it, on the same instance.
func TestWarmConnection(t *testing.T) {
	e := newWarmEnv(t, 1)
	id := e.idleIDs()[0]
	p := e.proxy(t, id)
	if n := p.connections(); n != 1 {
		t.Fatalf("%d connections to the idle instance, want the one warm connection", n)
	}
	j := e.runJob(t)
	if j.Status != "success" || !strings.Contains(string(j.Trace), "via "+id+"...") {
		t.Fatalf("job %s on the wrong instance or failed:\n%s", j.Status, j.Trace)
	}
	if n := p.connections(); n != 1 {
		t.Errorf("%d connections for the job, want the warm one only", n)
	}

	// Break the warm connection of the next idle instance.
	deadline := time.Now().Add(30 * time.Second)
	for len(e.idleIDs()) == 0 || e.idleIDs()[0] == id {
		if time.Now().After(deadline) {
			t.Fatal("no new idle instance")
		}
		time.Sleep(10 * time.Millisecond)
	}
	id2 := e.idleIDs()[0]
	p2 := e.proxy(t, id2)
	p2.cut()
	j = e.runJob(t)
	if j.Status != "success" || !strings.Contains(string(j.Trace), "via "+id2+"...") {
		t.Fatalf("job %s, want success on %s:\n%s", j.Status, id2, j.Trace)
	}
	if n := p2.connections(); n != 2 {
		t.Errorf("%d connections to %s, want the warm one and one redial", n, id2)
	}
}

// A host key that changed while the instance was idle is refused: the job
// never runs there, the instance is discarded, and the job runs on another.
func TestWarmConnectionHostKeyChanged(t *testing.T) {
	e := newWarmEnv(t, 1)
	victim := e.idleIDs()[0]                     // idle first, so taken first
	impostor := sshtest.Run(t, sshtest.Dropbear) // another host key (and another authorized key)
	p := e.proxy(t, victim)
	p.retarget(impostor.Addr)
	p.cut()
	e.fleet.SetSchedule(schedule.Schedule{Default: schedule.Policy{IdleCount: 2}})
	deadline := time.Now().Add(30 * time.Second)
	for e.fleet.Available() < 2 {
		if time.Now().After(deadline) {
			t.Fatal("a second instance did not become idle")
		}
		time.Sleep(10 * time.Millisecond)
	}
	var other string
	for _, id := range e.idleIDs() {
		if id != victim {
			other = id
		}
	}
	j := e.runJob(t)
	if j.Status != "success" || !strings.Contains(string(j.Trace), "via "+other+"...") {
		t.Fatalf("job %s, want success on %s:\n%s", j.Status, other, j.Trace)
	}
	if !strings.Contains(string(j.Trace), "The VM "+victim+" cannot be reached; taking another one") {
		t.Errorf("the trace does not say the first VM was replaced:\n%s", j.Trace)
	}
	if strings.Contains(impostor.Log(), "auth succeeded") {
		t.Errorf("the client authenticated to a server with another host key:\n%s", impostor.Log())
	}
	deadline = time.Now().Add(30 * time.Second)
	for {
		found := false
		for _, in := range e.fleet.Status().Instances {
			if in.ID == victim && in.State != fleet.StateDeleting {
				found = true
			}
		}
		if !found {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the instance with the changed host key was not deleted: %+v", e.fleet.Status().Instances)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
