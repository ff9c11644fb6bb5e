package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/coordinator"
)

// The chaos suite's machinery: a coordinator whose artifact uploads and
// final updates can be slowed and watched, and `mayfly run` as a process
// the suite kills with SIGKILL and starts again on the same state dir.

// chaosCoordinator is the built-in coordinator, serving the trial's
// projects and their pipelines, behind a handler that
// slows artifact uploads and final job updates by slow and notes when the
// first of each began, so that a kill can land while one is in flight.
type chaosCoordinator struct {
	srv *coordinator.Server
	url string

	slow         time.Duration
	uploadSeen   atomic.Int64 // unix nanos of the first upload request
	finalSeen    atomic.Int64 // unix nanos of the first final update
	requestSeen  atomic.Int64 // unix nanos of the first job request
	jobServed    atomic.Int64 // unix nanos of the first job handed out (201)
	traceSeen    atomic.Int64 // unix nanos of the first trace upload (PATCH) past the first
	tracePatches atomic.Int64
	// an outage: every runner API call until then is answered 503
	outageUntil  atomic.Int64
	outageServed atomic.Int64
	hs           *http.Server
	serveClosed  chan struct{}
}

// startChaosCoordinator starts the trial's coordinator. Its stuck-job
// clean-up fails a running job no runner call touched for
// stuck (every applied call touches: stricter than GitLab's 15-minute
// granularity, never kinder to a live manager).
func startChaosCoordinator(t testing.TB, token string, projects []string, slow, stuck time.Duration) *chaosCoordinator {
	t.Helper()
	srv, err := coordinator.New(coordinator.Config{Logger: slog.New(slog.DiscardHandler), TraceUpdateInterval: time.Second, StateDir: t.TempDir(),
		StuckJobTimeout: stuck, StuckJobTouch: -1})
	if err != nil {
		t.Fatal(err)
	}
	// The clean-up sweeps every second here (Serve's sweep runs every
	// twelfth of the timeout): a job lost at pick-up ends soon after it.
	sweepCtx, stopSweep := context.WithCancel(context.Background())
	sweepDone := make(chan struct{})
	go func() {
		defer close(sweepDone)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-sweepCtx.Done():
				return
			case <-tick.C:
				srv.DropStuckJobs()
			}
		}
	}()
	t.Cleanup(func() { stopSweep(); <-sweepDone })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &chaosCoordinator{srv: srv, url: "http://" + ln.Addr().String(), slow: slow, serveClosed: make(chan struct{})}
	c.hs = &http.Server{Handler: c, ReadHeaderTimeout: 30 * time.Second}
	go func() { defer close(c.serveClosed); _ = c.hs.Serve(ln) }()
	t.Cleanup(func() { c.hs.Close(); <-c.serveClosed; srv.Close() })
	if _, err := srv.RegisterRunner(coordinator.RunnerOptions{RegistrationToken: srv.RegistrationToken(), RunUntagged: true, Token: token}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var srcs []coordinator.ProjectSource
	for _, p := range projects {
		srcs = append(srcs, coordinator.ProjectSource{Dir: p})
	}
	res, err := srv.AddProjects(ctx, srcs)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res {
		if r.Pipeline == nil {
			t.Fatalf("no pipeline for the chaos project %s: %s", r.Project.Path, r.NoPipeline)
		}
	}
	return c
}

// ServeHTTP slows and notes artifact uploads and final updates (a PUT of
// a job with a state other than running), then lets the coordinator
// answer.
func (c *chaosCoordinator) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if c.inOutage(w, r) {
		return
	}
	p := r.URL.Path
	if r.Method == http.MethodPost && p == "/api/v4/jobs/request" {
		c.requestSeen.CompareAndSwap(0, time.Now().UnixNano())
		rec := &statusRecorder{ResponseWriter: w}
		c.srv.ServeHTTP(rec, r)
		if rec.code == http.StatusCreated {
			c.jobServed.CompareAndSwap(0, time.Now().UnixNano())
		}
		return
	}
	if r.Method == http.MethodPatch && strings.HasSuffix(p, "/trace") && c.tracePatches.Add(1) > 1 {
		c.traceSeen.CompareAndSwap(0, time.Now().UnixNano())
	}
	if strings.HasPrefix(p, "/api/v4/jobs/") {
		var seen *atomic.Int64
		switch {
		case r.Method == http.MethodPost && strings.HasSuffix(p, "/artifacts"):
			seen = &c.uploadSeen
		case r.Method == http.MethodPut && strings.Count(p, "/") == 4 && c.isFinal(r):
			seen = &c.finalSeen
		}
		if seen != nil {
			seen.CompareAndSwap(0, time.Now().UnixNano())
			select {
			case <-time.After(c.slow):
			case <-r.Context().Done():
				return
			}
		}
	}
	c.srv.ServeHTTP(w, r)
}

// isFinal reports whether a PUT /jobs/:id reports an end (reading the body
// and putting it back).
func (c *chaosCoordinator) isFinal(r *http.Request) bool {
	b, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		return false
	}
	r.Body = io.NopCloser(bytes.NewReader(b))
	return bytes.Contains(b, []byte(`"state":"success"`)) || bytes.Contains(b, []byte(`"state":"failed"`))
}

// seenAt returns when the first request noted in v came, if any.
func seenAt(v *atomic.Int64) (time.Time, bool) {
	n := v.Load()
	return time.Unix(0, n), n != 0
}

// chaosBinaries builds mayfly, the fake and qemu plugins and the job
// helper into one directory, once per test binary, in two parallel builds.
var (
	chaosBinOnce sync.Once
	chaosBinDir  string
	chaosBinErr  error
)

func chaosBinaries(t *testing.T) string {
	t.Helper()
	chaosBinOnce.Do(func() {
		dir, err := os.MkdirTemp("", "mayfly-chaos-bin-")
		if err != nil {
			chaosBinErr = err
			return
		}
		chaosBinDir = dir
		mayfly := exec.Command("go", "build", "-o", dir+"/", "github.com/mayfly-ci/mayfly/cmd/mayfly",
			"github.com/mayfly-ci/mayfly/providers/fake/cmd/mayfly-plugin-fake", "github.com/mayfly-ci/mayfly/plugins/qemu/cmd/mayfly-plugin-qemu")
		helper := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", filepath.Join(dir, "mayfly-helper-linux-amd64"), "github.com/mayfly-ci/mayfly/cmd/mayfly-helper")
		helper.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
		errs := make(chan error, 2)
		for _, cmd := range []*exec.Cmd{mayfly, helper} {
			go func() {
				if out, err := cmd.CombinedOutput(); err != nil {
					errs <- fmt.Errorf("%v: %v\n%s", cmd.Args, err, out)
					return
				}
				errs <- nil
			}()
		}
		chaosBinErr = errors.Join(<-errs, <-errs)
	})
	if chaosBinErr != nil {
		t.Fatal(chaosBinErr)
	}
	return chaosBinDir
}

// chaosManager is one `mayfly run` process of a trial.
type chaosManager struct {
	cmd     *exec.Cmd
	started time.Time
	log     *lockedBuffer
	exited  chan struct{}
	err     error // the exit, once exited is closed
}

// startChaosManager starts mayfly run on cfgPath with the trial's state dir.
func startChaosManager(t testing.TB, binDir, cfgPath, stateDir, id string) *chaosManager {
	t.Helper()
	m := &chaosManager{log: &lockedBuffer{}, exited: make(chan struct{})}
	m.cmd = exec.Command(filepath.Join(binDir, "mayfly"), "run", "--config", cfgPath,
		"--plugin-dir", binDir, "--helper-dir", binDir, "--state-dir", stateDir, "--manager-id", id)
	m.cmd.Stderr = m.log
	m.cmd.WaitDelay = 5 * time.Second
	m.started = time.Now()
	if err := m.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { m.err = m.cmd.Wait(); close(m.exited) }()
	t.Cleanup(func() { _ = m.cmd.Process.Kill(); <-m.exited })
	return m
}

// kill ends the process with SIGKILL and waits for it.
func (m *chaosManager) kill() {
	_ = m.cmd.Process.Kill()
	<-m.exited
}

// drain sends SIGQUIT and waits up to within for the exit; it reports
// whether the process exited cleanly.
func (m *chaosManager) drain(within time.Duration) error {
	// A SIGQUIT before the handler is set would end the process outright.
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	waitFor(ctx, func() bool { return !m.running() || strings.Contains(m.log.String(), `"runner manager started"`) })
	_ = m.cmd.Process.Signal(syscall.SIGQUIT)
	select {
	case <-m.exited:
		return m.err
	case <-time.After(within):
		m.kill()
		return fmt.Errorf("no exit within %v of SIGQUIT", within)
	}
}

// running reports whether the process still runs.
func (m *chaosManager) running() bool {
	select {
	case <-m.exited:
		return false
	default:
		return true
	}
}

// waitFor polls cond every 20 ms until it holds or ctx ends.
func waitFor(ctx context.Context, cond func() bool) bool {
	for {
		if cond() {
			return true
		}
		select {
		case <-ctx.Done():
			return cond()
		case <-time.After(20 * time.Millisecond):
		}
	}
}
