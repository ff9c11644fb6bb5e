package fleet

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/host"
	"github.com/mayfly-ci/mayfly/schedule"
)

// Plugin replies are input too (issue 19): the fake plugin, run through
// the real plugin host, answers with hostile replies, and the fleet stays
// bounded, logs what is wrong and keeps working.

// hostilePlugin starts the fake plugin process through the plugin host
// with the "hostile" settings given and calls bounded by callTimeout.
func hostilePlugin(t *testing.T, hostile map[string]any, callTimeout time.Duration) *host.Plugin {
	t.Helper()
	// Generous: the machine may be loaded (the plugin starts in well
	// under a second on a quiet one).
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	p, err := host.Start(ctx, host.Config{Path: fakePlugin(t), Name: "fake", Logger: slog.New(slog.DiscardHandler), CallTimeout: callTimeout,
		StartTimeout: time.Minute})
	if err != nil {
		t.Fatalf("start plugin: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	settings, _ := json.Marshal(map[string]any{"state_dir": t.TempDir(), "hostile": hostile})
	if _, err := p.Init(ctx, settings); err != nil {
		t.Fatalf("init plugin: %v", err)
	}
	return p
}

// logCounter is a slog handler that counts records by level and keeps
// the messages of the warnings and errors.
type logCounter struct {
	mu     sync.Mutex
	counts map[slog.Level]int
	msgs   map[string]int
}

func newLogCounter() *logCounter {
	return &logCounter{counts: map[slog.Level]int{}, msgs: map[string]int{}}
}

func (c *logCounter) Enabled(context.Context, slog.Level) bool { return true }
func (c *logCounter) Handle(_ context.Context, r slog.Record) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.counts[r.Level]++
	if r.Level >= slog.LevelWarn {
		var b strings.Builder
		b.WriteString(r.Message)
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == "error" {
				b.WriteString(": " + a.Value.String())
			}
			return true
		})
		c.msgs[b.String()]++
	}
	return nil
}
func (c *logCounter) WithAttrs([]slog.Attr) slog.Handler { return c }
func (c *logCounter) WithGroup(string) slog.Handler      { return c }

func (c *logCounter) warnings() (n int, msgs map[string]int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n = c.counts[slog.LevelWarn] + c.counts[slog.LevelError]
	msgs = map[string]int{}
	for k, v := range c.msgs {
		msgs[k] = v
	}
	return n, msgs
}

// heapMiB returns the live heap after a collection, in MiB.
func heapMiB() float64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return float64(m.HeapAlloc) / (1 << 20)
}

// A plugin whose every list holds 100k made-up instances with the fleet's
// own labels: the fleet still builds its pool and hands out instances,
// its memory and its logging stay bounded.
func TestHostilePluginHugeList(t *testing.T) {
	const extra = 100_000
	before := heapMiB()
	p := hostilePlugin(t, map[string]any{"list_extra": extra,
		"list_labels": map[string]string{providers.LabelManager: "mgr-1", providers.LabelRunner: "linux"}},
		2*time.Minute) // a 100k-entry List takes about 3s through the host on a quiet machine, several times that on a loaded one
	listStart := time.Now()
	list, err := p.List(context.Background())
	if err != nil || len(list) != extra {
		t.Fatalf("List: %d instances, %v; want %d", len(list), err, extra)
	}
	listTook := time.Since(listStart)
	list = nil
	logs := newLogCounter()
	h := newHarness(t, Config{Provider: p, Schedule: idlePolicy(schedule.Policy{IdleCount: 2}), OrphanGrace: time.Second,
		Logger: slog.New(logs)}, providers0())
	start := time.Now()
	h.startNoSettle()
	// Each list takes seconds of wall time (more under -race): advance the
	// fake clock only once the fleet has settled, waiting up to a minute.
	step := func() {
		h.clk.Advance(5 * time.Second)
		for deadline := time.Now().Add(time.Minute); !h.f.Settled() && time.Now().Before(deadline); {
			time.Sleep(10 * time.Millisecond)
		}
	}
	for i := 0; h.f.Available() < 2; i++ {
		if i == 120 {
			t.Fatalf("no pool of 2 after 10m of fake time beside the made-up list: %v", h.f.Status().Counts)
		}
		step()
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l, err := h.f.Acquire(ctx)
	if err != nil {
		t.Fatalf("Acquire: %v", err)
	}
	l.Release(JobSucceeded)
	for range 36 { // 3 more minutes: a few more lists
		step()
	}
	took := time.Since(start)
	after := heapMiB()
	n, msgs := logs.warnings()
	lists := fmt.Sprintf("%v of fake time", h.clk.Now().Sub(t0))
	t.Logf("100k-entry lists (one List call through the host: %v): pool ready, one job done and %s in %v of wall time; live heap %.1f MiB before, %.1f MiB after; %d warnings: %v",
		listTook.Round(10*time.Millisecond), lists, took.Round(100*time.Millisecond), before, after, n, msgs)
	if books := len(h.f.Status().Instances); books > maxListIntake+10 {
		t.Errorf("the books hold %d instances, want at most the intake bound %d and the pool", books, maxListIntake)
	}
	if after-before > 64 {
		t.Errorf("live heap grew by %.1f MiB, want at most 64 MiB", after-before)
	}
	if n > 100 {
		t.Errorf("%d warnings, want a bounded few per list: %v", n, msgs)
	}
	h.stop()
}

// A plugin whose connect info points at the cloud's metadata address: no
// instance becomes ready or is handed out, each is failed with a warning
// that names the address, deleted, and creation backs off.
func TestHostilePluginConnectAddress(t *testing.T) {
	p := hostilePlugin(t, map[string]any{"connect_address": "169.254.169.254"}, 20*time.Second)
	logs := newLogCounter()
	h := newHarness(t, Config{Provider: p, Schedule: idlePolicy(schedule.Policy{IdleCount: 2}), Logger: slog.New(logs)}, providers0())
	h.startNoSettle()
	h.advance(5*time.Minute, 5*time.Second)
	n, msgs := logs.warnings()
	named := 0
	for m, c := range msgs {
		if strings.Contains(m, `address "169.254.169.254"`) && strings.Contains(m, "link-local") {
			named += c
		}
	}
	st := h.f.Status()
	t.Logf("connect info at 169.254.169.254: %d instances failed with the address named in 5m of fake time; books %v; %d warnings: %v", named, st.Counts, n, msgs)
	if named == 0 {
		t.Errorf("no warning names the refused address: %v", msgs)
	}
	if h.f.Available() != 0 || st.Counts[StateAcquired.String()] != 0 {
		t.Errorf("an instance with a link-local address became ready: %v", st.Counts)
	}
	if named > 40 {
		t.Errorf("%d instances failed in 5 minutes: creation does not back off", named)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if l, err := h.f.Acquire(ctx); err == nil {
		t.Errorf("acquired %s, whose address is link-local", l.ID())
	}
	h.stop()
}

// A plugin that never answers List, Create or ConnectInfo: every call
// ends at the host's call timeout, the fleet logs it, answers its status
// at once meanwhile, and stops when asked.
func TestHostilePluginNeverAnswers(t *testing.T) {
	const callTimeout = 2 * time.Second
	p := hostilePlugin(t, map[string]any{"hang": []string{"list", "create", "connect_info"}}, callTimeout)
	start := time.Now()
	_, err := p.List(context.Background())
	took := time.Since(start)
	if err == nil || took > 10*callTimeout {
		t.Fatalf("List of a plugin that never answers: %v after %v, want an error at the call timeout %v", err, took, callTimeout)
	}
	t.Logf("List of a plugin that never answers: %v after %v", err, took.Round(10*time.Millisecond))

	logs := newLogCounter()
	h := newHarness(t, Config{Provider: p, Schedule: idlePolicy(schedule.Policy{IdleCount: 2}), Logger: slog.New(logs)}, providers0())
	h.startNoSettle()
	var slowest time.Duration
	for i := 0; i < 40; i++ { // 8s of wall time: several calls time out
		s := time.Now()
		_ = h.f.Status()
		slowest = max(slowest, time.Since(s))
		h.clk.Advance(5 * time.Second)
		time.Sleep(200 * time.Millisecond)
	}
	n, msgs := logs.warnings()
	t.Logf("fleet over a plugin that never answers: slowest status %v; %d warnings: %v", slowest.Round(time.Microsecond), n, msgs)
	if n == 0 {
		t.Errorf("no warning about the calls that timed out")
	}
	if slowest > time.Second {
		t.Errorf("the fleet's status took %v while the plugin hung", slowest)
	}
	if h.f.Available() != 0 {
		t.Errorf("%d instances available from a plugin that never answers", h.f.Available())
	}
	stopped := time.Now()
	h.stop()
	t.Logf("stopped in %v", time.Since(stopped).Round(10*time.Millisecond))
}

// A plugin that answers every call slowly, just within the call timeout:
// the fleet still builds its pool and hands out an instance, and its
// status answers at once meanwhile.
func TestHostilePluginSlow(t *testing.T) {
	const slow = 1500 * time.Millisecond
	p := hostilePlugin(t, map[string]any{"slow": slow.String()}, 2*time.Second)
	logs := newLogCounter()
	h := newHarness(t, Config{Provider: p, Schedule: idlePolicy(schedule.Policy{IdleCount: 2}), Logger: slog.New(logs)}, providers0())
	start := time.Now()
	h.startNoSettle()
	var slowest time.Duration
	for i := 0; h.f.Available() < 2; i++ {
		if i == 300 { // a minute of wall time
			t.Fatalf("no pool of 2 from a slow plugin after %v: %v", time.Since(start), h.f.Status().Counts)
		}
		s := time.Now()
		_ = h.f.Status()
		slowest = max(slowest, time.Since(s))
		h.clk.Advance(time.Second)
		time.Sleep(200 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l, err := h.f.Acquire(ctx)
	if err != nil {
		t.Fatalf("Acquire: %v", err)
	}
	l.Release(JobSucceeded)
	n, msgs := logs.warnings()
	t.Logf("plugin answering every call in %v: pool of 2 and a job's instance after %v of wall time; slowest status %v; %d warnings: %v",
		slow, time.Since(start).Round(100*time.Millisecond), slowest.Round(time.Microsecond), n, msgs)
	if slowest > time.Second {
		t.Errorf("the fleet's status took %v while the plugin was slow", slowest)
	}
	stopped := time.Now()
	h.stop()
	t.Logf("stopped in %v", time.Since(stopped).Round(10*time.Millisecond))
}
