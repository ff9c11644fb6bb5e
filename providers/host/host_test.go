package host_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/host"
	"github.com/mayfly-ci/mayfly/providers/plugintest"
)

var pluginBinary string

func TestMain(m *testing.M) {
	plugintest.Main(m, "github.com/mayfly-ci/mayfly/providers/fake/cmd/mayfly-plugin-fake", &pluginBinary)
}

// recorder is a slog.Handler keeping every record, for assertions.
type recorder struct {
	mu      *sync.Mutex
	records *[]slog.Record
	attrs   []slog.Attr
}

func newRecorder() *recorder {
	return &recorder{mu: &sync.Mutex{}, records: &[]slog.Record{}}
}

func (r *recorder) Enabled(context.Context, slog.Level) bool { return true }

func (r *recorder) Handle(_ context.Context, rec slog.Record) error {
	rec = rec.Clone()
	rec.AddAttrs(r.attrs...)
	r.mu.Lock()
	defer r.mu.Unlock()
	*r.records = append(*r.records, rec)
	return nil
}

func (r *recorder) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &recorder{mu: r.mu, records: r.records, attrs: append(slices.Clone(r.attrs), attrs...)}
}

func (r *recorder) WithGroup(string) slog.Handler { return r }

// find returns the attributes of the first record whose message contains
// msg, or nil.
func (r *recorder) find(msg string) map[string]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, rec := range *r.records {
		if !strings.Contains(rec.Message, msg) {
			continue
		}
		attrs := map[string]string{"level": rec.Level.String()}
		rec.Attrs(func(a slog.Attr) bool {
			attrs[a.Key] = a.Value.String()
			return true
		})
		return attrs
	}
	return nil
}

func start(t *testing.T, cfg host.Config) *host.Plugin {
	t.Helper()
	if cfg.Path == "" && cfg.Name == "" {
		cfg.Path = pluginBinary
	}
	if cfg.Name == "" {
		cfg.Name = "fake"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.CallTimeout == 0 {
		cfg.CallTimeout = 15 * time.Second
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	p, err := host.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

func settingsJSON(t *testing.T, s map[string]any) json.RawMessage {
	t.Helper()
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func callCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// processGone reports whether pid no longer names a live process (a zombie
// counts as gone: it has been killed and only awaits reaping).
func processGone(pid int) bool {
	if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
		return true
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	fields := strings.Fields(string(b))
	return len(fields) > 2 && fields[2] == "Z"
}

// TestKillDuringCreate kills the plugin with SIGKILL while a Create is in
// flight: the call fails with a transient error, the host restarts the
// plugin, List shows the instances the dead process recorded, and all of
// them can be deleted.
func TestKillDuringCreate(t *testing.T) {
	stateDir := t.TempDir()
	rec := newRecorder()
	p := start(t, host.Config{Logger: slog.New(rec), MinBackoff: 50 * time.Millisecond, PollInterval: 20 * time.Millisecond})
	labels := map[string]string{providers.LabelManager: "m1", providers.LabelRunner: "r1"}
	_, err := p.Init(callCtx(t), settingsJSON(t, map[string]any{"state_dir": stateDir, "create_delay": "1m"}))
	if err != nil {
		t.Fatalf("Init: %v", err)
	}
	oldPID := p.PID()

	type result struct {
		ids []string
		err error
	}
	done := make(chan result, 1)
	go func() {
		ids, err := p.Create(callCtx(t), 3, labels)
		done <- result{ids, err}
	}()

	// The fake records the instances, then sleeps create_delay: wait until
	// they are listed, so the Create is certainly in flight.
	var listed []providers.Instance
	deadline := time.Now().Add(10 * time.Second)
	for len(listed) < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("in-flight Create never recorded its instances; listed %v", listed)
		}
		time.Sleep(10 * time.Millisecond)
		if listed, err = p.List(callCtx(t)); err != nil {
			t.Fatalf("List during Create: %v", err)
		}
	}
	select {
	case r := <-done:
		t.Fatalf("Create returned before the kill: %v, %v", r.ids, r.err)
	default:
	}

	if err := syscall.Kill(oldPID, syscall.SIGKILL); err != nil {
		t.Fatalf("kill plugin: %v", err)
	}
	var r result
	select {
	case r = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("in-flight Create did not fail after the plugin was killed")
	}
	if r.err == nil {
		t.Fatalf("in-flight Create succeeded (%v) although the plugin was killed", r.ids)
	}
	if !providers.IsTransient(r.err) {
		t.Errorf("in-flight Create error %q has kind %s, want transient", r.err, providers.KindOf(r.err))
	}

	// The next call waits for the restarted process and sees the instances
	// from the state directory.
	list, err := p.List(callCtx(t))
	if err != nil {
		t.Fatalf("List after restart: %v", err)
	}
	if got := p.Restarts(); got != 1 {
		t.Errorf("Restarts() = %d, want 1", got)
	}
	if pid := p.PID(); pid == 0 || pid == oldPID {
		t.Errorf("PID after restart = %d, old %d", pid, oldPID)
	}
	if !processGone(oldPID) {
		t.Errorf("killed plugin process %d still alive", oldPID)
	}
	var ids []string
	for _, in := range list {
		if !in.HasLabels(labels) {
			t.Errorf("instance %s lost its labels: %v", in.ID, in.Labels)
		}
		ids = append(ids, in.ID)
	}
	if len(ids) != 3 {
		t.Fatalf("List after restart = %v, want the 3 instances of the interrupted Create", list)
	}
	if rec.find("plugin process exited unexpectedly") == nil {
		t.Error("no log record about the unexpected exit")
	}

	deleted, err := p.Delete(callCtx(t), ids)
	if err != nil || len(deleted) != 3 {
		t.Fatalf("Delete(%v) = %v, %v", ids, deleted, err)
	}
	list, err = p.List(callCtx(t))
	if err != nil {
		t.Fatalf("List after delete: %v", err)
	}
	if len(list) != 0 {
		t.Errorf("instances leaked after delete: %v", list)
	}
}

// TestCallsWaitForRestart shows a call made while the plugin is down waits
// for the restart, and one whose context ends first fails transiently.
func TestCallsWaitForRestart(t *testing.T) {
	p := start(t, host.Config{MinBackoff: 300 * time.Millisecond, PollInterval: 10 * time.Millisecond})
	if _, err := p.Init(callCtx(t), settingsJSON(t, map[string]any{"state_dir": t.TempDir()})); err != nil {
		t.Fatalf("Init: %v", err)
	}
	pid := p.PID()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for p.PID() == pid {
		if time.Now().After(deadline) {
			t.Fatal("host did not notice the plugin's death")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// Down now, for at least MinBackoff.
	short, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
	defer cancel()
	_, err := p.List(short)
	if !providers.IsTransient(err) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("List with short deadline while down: %v (kind %s), want transient deadline", err, providers.KindOf(err))
	}
	if _, err := p.List(callCtx(t)); err != nil {
		t.Errorf("List waiting for restart: %v", err)
	}
	if p.Restarts() != 1 {
		t.Errorf("Restarts() = %d, want 1", p.Restarts())
	}
}

// TestRepeatedCrashesBackOff kills the plugin repeatedly; each restart
// waits longer than the one before.
func TestRepeatedCrashesBackOff(t *testing.T) {
	rec := newRecorder()
	p := start(t, host.Config{Logger: slog.New(rec), MinBackoff: 20 * time.Millisecond, PollInterval: 5 * time.Millisecond})
	for i := range 3 {
		pid := p.PID()
		if pid == 0 {
			if _, err := p.List(callCtx(t)); err != nil {
				t.Fatal(err)
			}
			pid = p.PID()
		}
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		// A call racing the kill may meet the dead connection; it must fail
		// transiently, and the next call must reach the restarted plugin.
		if _, err := p.List(callCtx(t)); err != nil && !providers.IsTransient(err) {
			t.Fatalf("List racing crash %d: %v, want transient", i+1, err)
		}
		if _, err := p.List(callCtx(t)); err != nil {
			t.Fatalf("List after crash %d: %v", i+1, err)
		}
	}
	if p.Restarts() != 3 {
		t.Errorf("Restarts() = %d, want 3", p.Restarts())
	}
	rec.mu.Lock()
	var delays []time.Duration
	for _, r := range *rec.records {
		if r.Message != "restarting plugin" {
			continue
		}
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == "in" {
				delays = append(delays, a.Value.Duration())
			}
			return true
		})
	}
	rec.mu.Unlock()
	want := []time.Duration{20 * time.Millisecond, 40 * time.Millisecond, 80 * time.Millisecond}
	if !slices.Equal(delays, want) {
		t.Errorf("restart delays = %v, want %v", delays, want)
	}
}

// TestPluginLogsReachHost checks that the plugin's slog records arrive in
// the host's logger with their level, attributes and the plugin name.
func TestPluginLogsReachHost(t *testing.T) {
	rec := newRecorder()
	p := start(t, host.Config{Logger: slog.New(rec)})
	dir := t.TempDir()
	if _, err := p.Init(callCtx(t), settingsJSON(t, map[string]any{"state_dir": dir})); err != nil {
		t.Fatalf("Init: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	var attrs map[string]string
	for attrs == nil && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		attrs = rec.find("fake provider initialised")
	}
	if attrs == nil {
		t.Fatal("the plugin's log record never reached the host logger")
	}
	if attrs["plugin"] != "fake" || attrs["level"] != "INFO" || attrs["state_dir"] != dir {
		t.Errorf("plugin log record attrs = %v, want plugin=fake level=INFO state_dir=%s", attrs, dir)
	}
}

// TestShutdownLeavesNothing checks that Shutdown ends the process and the
// host's goroutines, and that later calls fail with ErrClosed.
func TestShutdownLeavesNothing(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := host.Start(ctx, host.Config{Name: "fake", Path: pluginBinary, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Init(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Create(ctx, 1, nil); err != nil {
		t.Fatal(err)
	}
	pid := p.PID()
	if err := p.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if !processGone(pid) {
		t.Errorf("plugin process %d alive after Shutdown", pid)
	}
	_, err = p.List(ctx)
	if !errors.Is(err, providers.ErrClosed) || !providers.IsPermanent(err) {
		t.Errorf("List after Shutdown: %v, want permanent ErrClosed", err)
	}
	if err := p.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// TestStartFailures checks the errors for binaries that are not plugins.
func TestStartFailures(t *testing.T) {
	dir := t.TempDir()
	notPlugin := filepath.Join(dir, "mayfly-plugin-notplugin")
	if err := os.WriteFile(notPlugin, []byte("#!/bin/sh\necho hello\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		cfg  host.Config
		want string
	}{
		{"missing", host.Config{Name: "nosuch", Dirs: []string{dir}}, "looked in"},
		{"not a plugin", host.Config{Name: "notplugin", Dirs: []string{dir}, StartTimeout: 5 * time.Second}, notPlugin},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.cfg.Logger = slog.New(slog.DiscardHandler)
			p, err := host.Start(t.Context(), tt.cfg)
			if err == nil {
				p.Close()
				t.Fatal("Start succeeded")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Start error %q lacks %q", err, tt.want)
			}
		})
	}
}

// A plugin whose process dies before its handshake is started again, a
// bounded number of times: one killed at the wrong moment does not stop
// the manager, one that always dies fails Start.
func TestStartRetriesAPluginThatDiesBeforeItsHandshake(t *testing.T) {
	tests := []struct {
		name      string
		deaths    int // starts that die before the handshake
		wantStart bool
		wantRuns  int
	}{
		{"dies once", 1, true, 2},
		{"dies four times", 4, true, 5},
		{"always dies", 100, false, 5},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			runs := filepath.Join(dir, "runs")
			wrapper := filepath.Join(dir, "mayfly-plugin-flaky")
			script := fmt.Sprintf("#!/bin/sh\necho run >> %q\nif [ \"$(wc -l < %q)\" -le %d ]; then kill -9 $$; fi\nexec %q \"$@\"\n", runs, runs, tt.deaths, pluginBinary)
			if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
				t.Fatal(err)
			}
			rec := newRecorder()
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			p, err := host.Start(ctx, host.Config{Path: wrapper, Name: "flaky", Logger: slog.New(rec), CallTimeout: 15 * time.Second})
			if p != nil {
				defer p.Close()
			}
			if (err == nil) != tt.wantStart {
				t.Fatalf("Start: %v, want success %v", err, tt.wantStart)
			}
			b, _ := os.ReadFile(runs)
			if got := strings.Count(string(b), "run"); got != tt.wantRuns {
				t.Errorf("plugin started %d times, want %d", got, tt.wantRuns)
			}
			if !tt.wantStart {
				if !strings.Contains(err.Error(), "exited before its handshake") {
					t.Errorf("Start error %q does not say the process exited", err)
				}
				return
			}
			if rec.find("plugin exited during its start; starting it again") == nil {
				t.Error("no warning logged for the start that died")
			}
			if _, err := p.Init(callCtx(t), settingsJSON(t, map[string]any{})); err != nil {
				t.Errorf("Init after the retried start: %v", err)
			}
		})
	}
}

// A plugin that died just before Init (its death not yet noticed) is
// initialised once it has been restarted, instead of failing Init: the
// manager's start must not end because one plugin process was killed.
func TestInitRetriedOnARestartedPlugin(t *testing.T) {
	p := start(t, host.Config{MinBackoff: 50 * time.Millisecond, PollInterval: 2 * time.Second})
	pid := p.PID()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !processGone(pid) {
		if time.Now().After(deadline) {
			t.Fatal("plugin process still there 5s after SIGKILL")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if _, err := p.Init(callCtx(t), settingsJSON(t, map[string]any{"state_dir": t.TempDir()})); err != nil {
		t.Fatalf("Init on a plugin killed before it: %v", err)
	}
	if p.Restarts() != 1 || p.PID() == pid {
		t.Errorf("Restarts() = %d, PID %d (killed %d): want one restart", p.Restarts(), p.PID(), pid)
	}
}
