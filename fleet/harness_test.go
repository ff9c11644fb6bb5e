package fleet

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"

	"github.com/mayfly-ci/mayfly/fleet/fleettest"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/fake"
	"github.com/mayfly-ci/mayfly/schedule"
)

func TestMain(m *testing.M) {
	code := m.Run()
	cleanupPlugin()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			os.Stderr.WriteString("goleak: " + err.Error() + "\n")
			code = 1
		}
	}
	os.Exit(code)
}

// testLogger discards logs unless MAYFLY_TEST_LOG is set.
func testLogger() *slog.Logger {
	if os.Getenv("MAYFLY_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// call is one recorded provider call.
type call struct {
	op  string
	at  time.Time
	n   int      // create: instances asked for
	ids []string // delete: ids asked for; create: ids returned
	err error
}

// recProvider wraps the fake provider and records Create and Delete calls
// with the fleet clock's time.
type recProvider struct {
	*fake.Fake
	clk *fleettest.Clock

	mu    sync.Mutex
	calls []call
}

func (r *recProvider) Create(ctx context.Context, n int, labels map[string]string) ([]string, error) {
	ids, err := r.Fake.Create(ctx, n, labels)
	r.record(call{op: OpCreate, at: r.clk.Now(), n: n, ids: ids, err: err})
	return ids, err
}

func (r *recProvider) Delete(ctx context.Context, ids []string) ([]string, error) {
	done, err := r.Fake.Delete(ctx, ids)
	r.record(call{op: OpDelete, at: r.clk.Now(), n: len(ids), ids: slices.Clone(ids), err: err})
	return done, err
}

func (r *recProvider) List(ctx context.Context) ([]providers.Instance, error) {
	list, err := r.Fake.List(ctx)
	r.record(call{op: OpList, at: r.clk.Now(), err: err})
	return list, err
}

func (r *recProvider) record(c call) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, c)
}

// callsOf returns the recorded calls of op.
func (r *recProvider) callsOf(op string) []call {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []call
	for _, c := range r.calls {
		if c.op == op {
			out = append(out, c)
		}
	}
	return out
}

// harness runs a Fleet against the fake provider on a fake clock.
type harness struct {
	t      testing.TB
	clk    *fleettest.Clock
	prov   *recProvider
	cfg    Config
	f      *Fleet
	reg    *prometheus.Registry
	cancel context.CancelFunc
	done   chan error
}

// newHarness makes a fleet with cfg over a fake provider made with opts.
// Unset cfg fields get test values; the clock starts at t0 unless cfg.Clock
// is a *fleettest.Clock.
func newHarness(t testing.TB, cfg Config, opts fake.Options) *harness {
	t.Helper()
	clk, ok := cfg.Clock.(*fleettest.Clock)
	if !ok {
		clk = fleettest.NewClock(t0)
	}
	h := &harness{t: t, clk: clk, reg: prometheus.NewRegistry()}
	if opts.Now == nil {
		opts.Now = clk.Now
	}
	if cfg.Provider == nil {
		fk, err := fake.New(opts)
		if err != nil {
			t.Fatal(err)
		}
		h.prov = &recProvider{Fake: fk, clk: clk}
		cfg.Provider = h.prov
	}
	if cfg.Name == "" {
		cfg.Name = "linux"
	}
	if cfg.ManagerID == "" {
		cfg.ManagerID = "mgr-1"
	}
	if cfg.JournalPath == "" {
		cfg.JournalPath = filepath.Join(t.TempDir(), "journal")
	}
	cfg.Clock = clk
	if cfg.Logger == nil {
		cfg.Logger = testLogger()
	}
	// Calls go out at once unless a test is about batching them.
	if cfg.CreateBatchWindow == 0 {
		cfg.CreateBatchWindow = -1
	}
	if cfg.DeleteBatchWindow == 0 {
		cfg.DeleteBatchWindow = -1
	}
	if cfg.Registerer == nil {
		cfg.Registerer = h.reg
	}
	h.cfg = cfg
	f, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	h.f = f
	return h
}

// idlePolicy is a schedule with one constant policy.
func idlePolicy(p schedule.Policy) schedule.Schedule { return schedule.Schedule{Default: p} }

// start runs the fleet and waits until it settles.
func (h *harness) start() {
	h.t.Helper()
	h.startNoSettle()
	h.settle()
}

// startNoSettle runs the fleet.
func (h *harness) startNoSettle() {
	h.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	h.done = make(chan error, 1)
	go func() { h.done <- h.f.Run(ctx) }()
	h.t.Cleanup(h.stop)
}

// providers0 is the fake's zero options, for harnesses whose provider is
// not the in-process fake.
func providers0() fake.Options { return fake.Options{} }

// stop ends Run and waits for it.
func (h *harness) stop() {
	h.t.Helper()
	if h.cancel == nil {
		return
	}
	h.cancel()
	h.cancel = nil
	select {
	case err := <-h.done:
		if err != nil {
			h.t.Errorf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		h.t.Fatal("Run did not return within 10s of cancel")
	}
}

// settle waits (in wall time, bounded) until the fleet has nothing to do
// but wait for the clock.
func (h *harness) settle() {
	h.t.Helper()
	deadline := time.Now().Add(30 * time.Second) // a plugin restart takes >10s on a loaded machine
	for i := 0; i < 200 && !h.f.Settled(); i++ {
		runtime.Gosched() // most waits are a goroutine hand-off
	}
	for !h.f.Settled() {
		if time.Now().After(deadline) {
			if os.Getenv("MAYFLY_TEST_STACKS") != "" {
				pprof.Lookup("goroutine").WriteTo(os.Stderr, 1)
			}
			h.t.Fatalf("fleet did not settle within 30s; status %+v", h.f.Status().Counts)
		}
		time.Sleep(50 * time.Microsecond)
	}
}

// advance moves the clock by d in steps of at most step, settling after
// each.
func (h *harness) advance(d, step time.Duration) {
	h.t.Helper()
	end := h.clk.Now().Add(d)
	for h.clk.Now().Before(end) {
		next := h.clk.Now().Add(step)
		if next.After(end) {
			next = end
		}
		h.clk.AdvanceTo(next)
		h.settle()
	}
}

// until advances the clock in steps until cond holds, failing after limit
// of fake time.
func (h *harness) until(limit, step time.Duration, what string, cond func() bool) {
	h.t.Helper()
	end := h.clk.Now().Add(limit)
	for !cond() {
		if os.Getenv("MAYFLY_TEST_LOG") != "" {
			next, _ := h.clk.Next()
			h.t.Logf("until %s: now %v next timer %v pending %d busy %d", what, h.clk.Now(), next, h.clk.Pending(), h.f.busy.Load())
		}
		if !h.clk.Now().Before(end) {
			h.t.Fatalf("%s: not reached within %v of fake time; counts %v", what, limit, h.f.Status().Counts)
		}
		h.advance(step, step)
	}
}

// count returns the fleet's instances in state s.
func (h *harness) count(s State) int {
	return h.f.Status().Counts[s.String()]
}

// providerIDs returns the ids the fake provider holds in state st ("" any).
func (h *harness) providerIDs(st providers.State) []string {
	var ids []string
	for _, in := range h.prov.Instances() {
		if st == "" || in.State == st {
			ids = append(ids, in.ID)
		}
	}
	return ids
}

// acquire takes an instance, failing the test if none comes within 5s of
// wall time.
func (h *harness) acquire() *Lease {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	l, err := h.f.Acquire(ctx)
	if err != nil {
		h.t.Fatalf("Acquire: %v", err)
	}
	h.settle()
	return l
}

func newClock(at time.Time) *fleettest.Clock { return fleettest.NewClock(at) }

// cleanupPlugin removes the plugin binary built by the plugin tests.
var cleanupPlugin = func() {}
