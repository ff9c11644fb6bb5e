package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/plugins/gce/gcefake"
	"github.com/mayfly-ci/mayfly/providers/plugintest"
	"github.com/mayfly-ci/mayfly/vmexec/winrm/wsmantest"
)

// buildPlugin builds a plugin command into dir.
func buildPlugin(t testing.TB, dir, pkg string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := plugintest.Build(dir, pkg); err != nil {
		t.Fatal(err)
	}
}

// startCoordinator serves the built-in coordinator on 127.0.0.1 with the
// pipeline applied and a runner registered with token.
func startCoordinator(t testing.TB, token, pipelineYAML string) (*coordinator.Server, string) {
	t.Helper()
	srv, err := coordinator.New(coordinator.Config{Logger: slog.New(slog.DiscardHandler), TraceUpdateInterval: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); <-done })
	if _, err := srv.RegisterRunner(coordinator.RunnerOptions{RegistrationToken: srv.RegistrationToken(), RunUntagged: true, Token: token}); err != nil {
		t.Fatal(err)
	}
	pipeline, err := coordinator.ParsePipelineFile("cloud-e2e.yaml", []byte(pipelineYAML))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Apply(pipeline); err != nil {
		t.Fatal(err)
	}
	return srv, "http://" + ln.Addr().String()
}

// listenLoopback listens on port of a random address in 127.0.0.0/8. The
// cloud plugins report fixed ports (22 for SSH, 5986 for WinRM), so the
// local server playing the instances needs an address of its own on which
// that port is free; binding a port below 1024 needs root.
func listenLoopback(t *testing.T, port int) net.Listener {
	t.Helper()
	var lastErr error
	for range 20 {
		ip := fmt.Sprintf("127.%d.%d.%d", 10+rand.IntN(240), rand.IntN(256), 1+rand.IntN(254))
		ln, err := net.Listen("tcp", net.JoinHostPort(ip, fmt.Sprint(port)))
		if err == nil {
			t.Cleanup(func() { ln.Close() })
			return ln
		}
		lastErr = err
	}
	t.Fatalf("no free loopback address for port %d: %v", port, lastErr)
	return nil
}

// forward relays every connection accepted on ln to target until the test
// ends.
func forward(t *testing.T, ln net.Listener, target string) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return // ln closed at cleanup
			}
			up, err := net.DialTimeout("tcp", target, 5*time.Second)
			if err != nil {
				c.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, c, up)
			mu.Unlock()
			wg.Add(2)
			go func() { defer wg.Done(); _, _ = io.Copy(up, c); closeWrite(up) }()
			go func() { defer wg.Done(); _, _ = io.Copy(c, up); closeWrite(c) }()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
}

func closeWrite(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
}

// runUntilDone runs mayfly run with cfg until every job of srv finished, then
// drains it and waits for it to stop.
func runUntilDone(t testing.TB, srv *coordinator.Server, dir, pluginDir, cfg string, within time.Duration) string {
	t.Helper()
	return managerRun{dir: dir, pluginDir: pluginDir, cfg: cfg, within: within}.untilDone(t, srv)
}

// managerRun is one mayfly run against a coordinator: its config (written
// to dir), plugins and job helpers, how long its jobs may take, and what
// the test does while they run.
type managerRun struct {
	dir, pluginDir, helperDir, cfg string
	within                         time.Duration
	// during runs once the manager started (e.g. it applies a second
	// pipeline when a job of the first finished); an error fails the test.
	during func(ctx context.Context) error
}

// untilDone runs the manager until every job of srv finished (after
// during returned), then drains it, waits for it to stop and returns its
// log.
func (r managerRun) untilDone(t testing.TB, srv *coordinator.Server) string {
	t.Helper()
	cfgPath := filepath.Join(r.dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(r.cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), r.within+time.Minute)
	defer cancel()
	drain := make(chan struct{})
	done := make(chan error, 1)
	logs := &cloudLog{}
	go func() {
		done <- runManager(ctx, drain, runFlags{config: cfgPath, pluginDir: r.pluginDir, helperDir: r.helperDir, stateDir: filepath.Join(r.dir, "state"), managerID: "e2e"}, io.Discard, logs)
	}()
	waitCtx, stopWait := context.WithTimeout(ctx, r.within)
	defer stopWait()
	err := error(nil)
	if r.during != nil {
		err = r.during(waitCtx)
	}
	if err == nil {
		err = srv.WaitAllFinished(waitCtx)
	}
	if err != nil {
		select {
		case err := <-done:
			t.Fatalf("mayfly run ended early: %v\n%s", err, logs.String())
		default:
		}
		cancel()
		<-done
		t.Fatalf("jobs did not finish: %v\nmanager log:\n%s", err, logs.String())
	}
	close(drain)
	if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
		t.Fatalf("mayfly run: %v\n%s", err, logs.String())
	}
	return logs.String()
}

// cloudLog is a goroutine-safe log sink.
type cloudLog struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *cloudLog) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *cloudLog) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// callsPerJob formats API call counts and their total per job.
func callsPerJob(calls map[string]int, jobs int) (string, float64) {
	total := 0
	var parts []string
	for k, n := range calls {
		total += n
		parts = append(parts, fmt.Sprintf("%s=%d", k, n))
	}
	sort.Strings(parts)
	return strings.Join(parts, " "), float64(total) / float64(jobs)
}

// windowsPipeline is the pipeline of the Windows fleet end-to-end tests:
// two PowerShell jobs, checked by checkWindowsTransport.
const windowsPipeline = `
projects:
  - name: win
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: none}]
        jobs:
          - {name: win-one, script: ["Write-Output hello"]}
          - {name: win-two, script: ["Write-Output hello"]}
`

// checkWindowsTransport checks what the Windows end-to-end tests prove
// about a job, against the WS-Management test server: the manager reached
// the instance over WinRM (every command powershell -EncodedCommand, the
// instance-ready command exiting 0), ran the job's first stage there, and
// the stage's output and its failure reached GitLab (the trace upload and
// the final update). No PowerShell runs here (Debian has no pwsh): the
// stage runs under sh and fails with sh's syntax error, so nothing in these
// tests shows the generated PowerShell script works; README's Windows
// section lists what has never run under real PowerShell.
func checkWindowsTransport(t *testing.T, jobs []coordinator.JobRecord, commands []wsmantest.CommandInfo) {
	t.Helper()
	if len(jobs) != 2 {
		t.Errorf("%d jobs at the coordinator, want 2", len(jobs))
	}
	for _, j := range jobs {
		trace := string(j.Trace)
		// The stage ran on the WinRM server (sh's parse error of the
		// PowerShell stage is in the trace) and the failure was reported.
		if j.Status != "failed" || !strings.Contains(strings.ToLower(trace), "syntax error") {
			t.Errorf("job %s: %s %q, want failed with sh's syntax error for the PowerShell stage in the trace:\n%s", j.Name, j.Status, j.FailureReason, trace)
		}
		if !strings.Contains(trace, "Preparing environment") {
			t.Errorf("job %s: no prepare section in the trace:\n%s", j.Name, trace)
		}
	}
	// Every command came as powershell -EncodedCommand over WinRM: the
	// ready commands and the stages.
	var ready, stages int
	for _, c := range commands {
		if !strings.HasPrefix(strings.ToLower(c.CommandLine), "powershell ") || !strings.Contains(c.CommandLine, "-EncodedCommand") {
			t.Errorf("command %q is not powershell -EncodedCommand", c.CommandLine)
		}
		if c.Exited && c.ExitCode == 0 {
			ready++
		} else {
			stages++
		}
	}
	if ready < len(jobs) || stages < len(jobs) {
		t.Errorf("%d commands exited 0 (ready commands) and %d did not (stages); want at least %d of each", ready, stages, len(jobs))
	}
}

// gceCredentials writes the gcefake's service-account key for the fake at
// apiURL and returns its path: the gce plugin authenticates against the
// fake as it does against Google.
func gceCredentials(t *testing.T, apiURL, project string) string {
	t.Helper()
	key, err := gcefake.ServiceAccountKey(apiURL, project)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "gce-service-account.json")
	if err := os.WriteFile(path, key, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
