package fleet

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/host"
	"github.com/mayfly-ci/mayfly/schedule"
)

var (
	pluginOnce sync.Once
	pluginBin  string
	pluginErr  error
)

// fakePlugin builds the fake provider plugin binary once per test run.
func fakePlugin(t *testing.T) string {
	t.Helper()
	pluginOnce.Do(func() {
		dir, err := os.MkdirTemp("", "mayfly-fleet-plugin-")
		if err != nil {
			pluginErr = err
			return
		}
		cleanupPlugin = func() { os.RemoveAll(dir) }
		pluginBin = filepath.Join(dir, "mayfly-plugin-fake")
		cmd := exec.Command("go", "build", "-o", pluginBin, "github.com/mayfly-ci/mayfly/providers/fake/cmd/mayfly-plugin-fake")
		out, err := cmd.CombinedOutput()
		if err != nil {
			pluginErr = &buildError{err: err, out: string(out)}
		}
	})
	if pluginErr != nil {
		t.Fatalf("build fake plugin: %v", pluginErr)
	}
	return pluginBin
}

type buildError struct {
	err error
	out string
}

func (e *buildError) Error() string { return e.err.Error() + "\n" + e.out }

// ourLive lists the plugin's instances with the fleet's labels that are
// not being deleted.
func ourLive(t *testing.T, p providers.Provider, labels map[string]string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	list, err := p.List(ctx)
	if err != nil {
		t.Fatalf("list plugin: %v", err)
	}
	var ids []string
	for _, in := range list {
		if in.HasLabels(labels) && in.State != providers.StateDeleting {
			ids = append(ids, in.ID)
		}
	}
	slices.Sort(ids)
	return ids
}

// TestPluginKilledMidCreateRecoversAndLeaksNothing runs the fleet against
// the fake provider in a real plugin process (go-plugin over gRPC), kills
// that process with SIGKILL while a Create call is in flight (the plugin
// has recorded the instances and not yet answered), and checks that the
// fleet recovers: the instances of the lost call are found by
// reconciliation and deleted as orphans, the pool is rebuilt, and after
// shutdown nothing with the fleet's labels is left.
func TestPluginKilledMidCreateRecoversAndLeaksNothing(t *testing.T) {
	bin := fakePlugin(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := host.Start(ctx, host.Config{
		Path: bin, Name: "fake", Logger: slog.New(slog.DiscardHandler),
		CallTimeout: 20 * time.Second, MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		PollInterval: 10 * time.Millisecond,
	})
	if err != nil {
		t.Fatalf("start plugin: %v", err)
	}
	defer p.Close()
	settings, _ := json.Marshal(map[string]any{"state_dir": t.TempDir(), "create_delay": "600ms"})
	if _, err := p.Init(ctx, settings); err != nil {
		t.Fatalf("init plugin: %v", err)
	}

	h := newHarness(t, Config{
		Provider: p, Schedule: idlePolicy(schedule.Policy{IdleCount: 3}),
		CreateBackoff: time.Second, OrphanGrace: 30 * time.Second, DeleteOnShutdown: true,
	}, providers0())
	labels := h.f.Labels()
	h.startNoSettle()

	// Wait until the plugin has recorded the instances of the first
	// Create call, which then sleeps before answering.
	deadline := time.Now().Add(15 * time.Second)
	var lost []string
	for len(lost) < 3 {
		if time.Now().After(deadline) {
			t.Fatal("the first Create call never reached the plugin")
		}
		time.Sleep(5 * time.Millisecond)
		lost = ourLive(t, p, labels)
	}
	pid := p.PID()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill plugin %d: %v", pid, err)
	}
	h.settle() // the Create call fails; the host restarts the plugin

	h.until(5*time.Minute, time.Second, "pool rebuilt without leaks", func() bool {
		if h.f.Available() != 3 {
			return false
		}
		var books []string
		for _, in := range h.f.Status().Instances {
			books = append(books, in.ID)
		}
		slices.Sort(books)
		return slices.Equal(books, ourLive(t, p, labels))
	})
	if p.Restarts() < 1 {
		t.Fatalf("plugin restarts = %d", p.Restarts())
	}
	live := ourLive(t, p, labels)
	for _, id := range lost {
		if contains(live, id) {
			t.Errorf("instance %s of the killed Create call still exists", id)
		}
	}
	if got := testutil.ToFloat64(h.f.m.deletions.WithLabelValues("linux", string(ReasonOrphan))); got != 3 {
		t.Errorf("deletions{orphan} = %v, want 3", got)
	}

	// A job runs on a pool instance after the restart, single use holds.
	l := h.acquire()
	if contains(lost, l.ID()) {
		t.Fatalf("handed out %s from the killed call", l.ID())
	}
	l.Release(JobSucceeded)
	h.settle()
	if contains(ourLive(t, p, labels), l.ID()) {
		t.Error("used instance not deleted")
	}

	// Kill it again while idle: the next calls wait for the restart.
	if err := syscall.Kill(p.PID(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	h.until(5*time.Minute, time.Second, "pool after second kill", func() bool { return h.f.Available() == 3 })

	h.stop()
	if left := ourLive(t, p, labels); len(left) != 0 {
		t.Fatalf("after shutdown the plugin still holds %v", left)
	}
}

// TestPluginLaunchReadiesWithoutListing runs the fleet against the fake
// provider plugin told to launch (it knows each instance's connect info at
// creation, as the plugin protocol's CreateResponse.instances carries): the
// pool becomes ready on the provisioner's word alone, with neither a list
// showing the instances running nor a ConnectInfo call; without launch the
// same pool needs both.
func TestPluginLaunchReadiesWithoutListing(t *testing.T) {
	bin := fakePlugin(t)
	for _, launch := range []bool{true, false} {
		t.Run(map[bool]string{true: "launch", false: "create"}[launch], func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			p, err := host.Start(ctx, host.Config{Path: bin, Name: "fake", Logger: slog.New(slog.DiscardHandler), CallTimeout: 20 * time.Second})
			if err != nil {
				t.Fatalf("start plugin: %v", err)
			}
			defer p.Close()
			// Launched instances are ready while the plugin's list still
			// says creating (on the wall clock; the fleet's is fake).
			boot := map[bool]string{true: "1h", false: "0s"}[launch]
			settings, _ := json.Marshal(map[string]any{"launch": launch, "boot_delay": boot})
			if _, err := p.Init(ctx, settings); err != nil {
				t.Fatalf("init plugin: %v", err)
			}
			h := newHarness(t, Config{Provider: p, Schedule: idlePolicy(schedule.Policy{IdleCount: 2}), DeleteOnShutdown: true}, providers0())
			h.start()
			h.until(time.Minute, 500*time.Millisecond, "pool ready", func() bool { return h.f.Available() == 2 })
			calls := h.f.api.Calls()
			lists, infos := calls[string(OpList)], calls[string(OpConnectInfo)]
			if launch && (lists != 1 || infos != 0) {
				t.Errorf("launched pool ready after %d lists and %d connect info calls, want only the start-up list and none", lists, infos)
			}
			if !launch && (lists < 2 || infos != 2) {
				t.Errorf("created pool ready after %d lists and %d connect info calls, want a list after the boot and 2", lists, infos)
			}
			h.stop()
		})
	}
}
