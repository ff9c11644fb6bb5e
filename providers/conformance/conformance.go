// Package conformance is a test suite every provider plugin must pass.
//
// A plugin's test runs it against the plugin binary through the real
// plugin host:
//
//	func TestConformance(t *testing.T) {
//		conformance.Run(t, func(t *testing.T) providers.Provider {
//			p, err := host.Start(ctx, host.Config{Path: binary})
//			if err != nil {
//				t.Fatal(err)
//			}
//			t.Cleanup(func() { p.Close() })
//			return p
//		}, conformance.Options{Settings: func(t *testing.T) json.RawMessage { ... }})
//	}
package conformance

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
)

// Options configure a conformance run.
type Options struct {
	// Settings returns the Init settings for one subtest, e.g. with a fresh
	// state directory. Required.
	Settings func(t *testing.T) json.RawMessage
	// InvalidSettings must make Init fail with a permanent or
	// invalid-argument error (e.g. an unknown key). Required, unless
	// NoInvalidSettings says why the plugin has none.
	InvalidSettings json.RawMessage
	// NoInvalidSettings is the reason a plugin accepts every settings
	// object; the subtest is then skipped with it.
	NoInvalidSettings string
	// Labels mark the instances the suite creates. The default is
	// mayfly-manager=conformance-<random> and mayfly-runner=conformance.
	Labels map[string]string
	// ReadyTimeout bounds the wait for created instances to run and for
	// deleted ones to leave List (default 2m).
	ReadyTimeout time.Duration
	// PollInterval is the pause between List calls while waiting (default
	// 100ms).
	PollInterval time.Duration
	// CallTimeout bounds every call (default 1m).
	CallTimeout time.Duration
	// Concurrency is the number of concurrent Create calls (default 4).
	Concurrency int
	// Faults are the typed-error cases. Required, unless NoFaults says why
	// the plugin cannot have them.
	Faults []Fault
	// NoFaults is the reason a plugin has no typed-error cases; the
	// subtest is then skipped with it.
	NoFaults string
}

// Fault is one typed-error case: under Settings (and after Arm), the next
// call of Op fails with an error of kind Want; after Disarm, the call
// after it succeeds.
type Fault struct {
	Name string
	// Settings returns Init settings that arm the fault.
	Settings func(t *testing.T) json.RawMessage
	// Arm, if set, arms the fault after Init, e.g. by changing what the
	// plugin reads on the host.
	Arm func(t *testing.T)
	// Disarm, if set, lifts the fault before the call that must succeed,
	// for faults that do not lift by themselves after one call (a quota
	// that is full until an instance goes).
	Disarm func(t *testing.T)
	// Op is "create", "delete" or "list".
	Op string
	// Want is the kind the error must have after crossing the boundary.
	Want providers.Kind
	// WantRetryAfter is the retry-after a rate limit must carry.
	WantRetryAfter time.Duration
	// WantScope is the scope a quota or capacity error must carry.
	WantScope string
}

func (o *Options) defaults(t *testing.T) {
	t.Helper()
	if o.Settings == nil {
		t.Fatal("conformance: Options.Settings is required")
	}
	if o.Labels == nil {
		b := make([]byte, 4)
		_, _ = rand.Read(b)
		o.Labels = map[string]string{
			providers.LabelManager: "conformance-" + hex.EncodeToString(b),
			providers.LabelRunner:  "conformance",
		}
	}
	if o.ReadyTimeout <= 0 {
		o.ReadyTimeout = 2 * time.Minute
	}
	if o.PollInterval <= 0 {
		o.PollInterval = 100 * time.Millisecond
	}
	if o.CallTimeout <= 0 {
		o.CallTimeout = time.Minute
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 4
	}
}

// Run runs the suite. newProvider returns a fresh, uninitialised provider
// for each subtest and arranges its own clean-up (e.g. host.Plugin.Close).
func Run(t *testing.T, newProvider func(t *testing.T) providers.Provider, opts Options) {
	opts.defaults(t)
	s := &suite{opts: opts, newProvider: newProvider}
	t.Run("Init", s.testInit)
	t.Run("InitInvalidSettings", s.testInitInvalid)
	t.Run("CreateListConnectDelete", s.testLifecycle)
	t.Run("CreateZeroAndNegative", s.testCreateEdges)
	t.Run("DeleteUnknownIsIdempotent", s.testDeleteUnknown)
	t.Run("UnknownInstanceNotFound", s.testNotFound)
	t.Run("ConcurrentCreates", s.testConcurrentCreates)
	t.Run("TypedErrors", s.testFaults)
	t.Run("Shutdown", s.testShutdown)
}

type suite struct {
	opts        Options
	newProvider func(t *testing.T) providers.Provider
}

func (s *suite) ctx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), s.opts.CallTimeout)
	t.Cleanup(cancel)
	return ctx
}

// start returns an initialised provider whose instances with our labels
// are deleted (and checked gone) when the test ends.
func (s *suite) start(t *testing.T, settings json.RawMessage) providers.Provider {
	t.Helper()
	p := s.newProvider(t)
	if _, err := p.Init(s.ctx(t), settings); err != nil {
		t.Fatalf("Init: %v", err)
	}
	t.Cleanup(func() { s.cleanup(t, p) })
	return p
}

// cleanup deletes every instance carrying our labels and fails the test
// if any is still listed after ReadyTimeout.
func (s *suite) cleanup(t *testing.T, p providers.Provider) {
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.ReadyTimeout)
	defer cancel()
	deadline := time.Now().Add(s.opts.ReadyTimeout)
	for attempt := 0; ; attempt++ {
		list, err := p.List(ctx)
		if err != nil {
			t.Errorf("cleanup: List: %v", err)
			return
		}
		var left []string
		for _, in := range list {
			if in.HasLabels(s.opts.Labels) && in.State != providers.StateGone {
				left = append(left, in.ID)
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("cleanup: instances still listed after %s: %v (leak)", s.opts.ReadyTimeout, left)
			return
		}
		if attempt%10 == 0 {
			if _, err := p.Delete(ctx, left); err != nil {
				t.Logf("cleanup: Delete %v: %v (retrying)", left, err)
			}
		}
		time.Sleep(s.opts.PollInterval)
	}
}

// waitList polls List until cond holds, failing the test after ReadyTimeout.
func (s *suite) waitList(t *testing.T, p providers.Provider, what string, cond func([]providers.Instance) error) []providers.Instance {
	t.Helper()
	deadline := time.Now().Add(s.opts.ReadyTimeout)
	for {
		ctx, cancel := context.WithTimeout(t.Context(), s.opts.CallTimeout)
		list, err := p.List(ctx)
		cancel()
		if err != nil {
			t.Fatalf("List while waiting for %s: %v", what, err)
		}
		for _, in := range list {
			if !in.State.Valid() {
				t.Fatalf("List: instance %s has invalid state %q", in.ID, in.State)
			}
		}
		err = cond(list)
		if err == nil {
			return list
		}
		if time.Now().After(deadline) {
			t.Fatalf("waiting %s for %s: %v", s.opts.ReadyTimeout, what, err)
		}
		time.Sleep(s.opts.PollInterval)
	}
}

func byID(list []providers.Instance) map[string]providers.Instance {
	m := make(map[string]providers.Instance, len(list))
	for _, in := range list {
		m[in.ID] = in
	}
	return m
}

// allRunning is a waitList condition: every id is listed running with our
// labels.
func (s *suite) allRunning(ids []string) func([]providers.Instance) error {
	return func(list []providers.Instance) error {
		m := byID(list)
		for _, id := range ids {
			in, ok := m[id]
			switch {
			case !ok:
				return fmt.Errorf("instance %s not listed", id)
			case in.State == providers.StateFailed, in.State == providers.StateGone, in.State == providers.StateDeleting:
				return fmt.Errorf("instance %s is %s (%s), want running", id, in.State, in.Reason)
			case in.State != providers.StateRunning:
				return fmt.Errorf("instance %s is %s", id, in.State)
			}
		}
		return nil
	}
}

// allGone is a waitList condition: no id is listed (or only as gone).
func allGone(ids []string) func([]providers.Instance) error {
	return func(list []providers.Instance) error {
		m := byID(list)
		for _, id := range ids {
			if in, ok := m[id]; ok && in.State != providers.StateGone {
				return fmt.Errorf("instance %s still listed as %s", id, in.State)
			}
		}
		return nil
	}
}

func (s *suite) testInit(t *testing.T) {
	p := s.newProvider(t)
	info, err := p.Init(s.ctx(t), s.opts.Settings(t))
	if err != nil {
		t.Fatalf("Init: %v", err)
	}
	if info.ID == "" {
		t.Error("Init: Info.ID is empty")
	}
	if info.Version == "" {
		t.Error("Init: Info.Version is empty")
	}
	if info.MaxSize < 0 {
		t.Errorf("Init: Info.MaxSize = %d, want >= 0", info.MaxSize)
	}
}

func (s *suite) testInitInvalid(t *testing.T) {
	if s.opts.InvalidSettings == nil {
		if s.opts.NoInvalidSettings != "" {
			t.Skip("the plugin has no invalid settings: " + s.opts.NoInvalidSettings)
		}
		t.Fatal("conformance: Options.InvalidSettings is required (or Options.NoInvalidSettings with the reason the plugin accepts every settings object)")
	}
	p := s.newProvider(t)
	_, err := p.Init(s.ctx(t), s.opts.InvalidSettings)
	if err == nil {
		t.Fatalf("Init(%s) succeeded, want an error", s.opts.InvalidSettings)
	}
	if !providers.IsPermanent(err) {
		t.Errorf("Init(%s) error %q has kind %s, want permanent or invalid_argument", s.opts.InvalidSettings, err, providers.KindOf(err))
	}
}

func (s *suite) testLifecycle(t *testing.T) {
	p := s.start(t, s.opts.Settings(t))
	before := time.Now()
	ids, err := p.Create(s.ctx(t), 2, s.opts.Labels)
	if err != nil {
		t.Fatalf("Create(2): %v", err)
	}
	if len(ids) != 2 || ids[0] == "" || ids[1] == "" || ids[0] == ids[1] {
		t.Fatalf("Create(2) = %q, want two distinct non-empty ids", ids)
	}

	list := s.waitList(t, p, "created instances to run", s.allRunning(ids))
	m := byID(list)
	for _, id := range ids {
		in := m[id]
		if !in.HasLabels(s.opts.Labels) {
			t.Errorf("instance %s labels %v lack %v", id, in.Labels, s.opts.Labels)
		}
		if in.CreatedAt.IsZero() {
			t.Errorf("instance %s has no creation time", id)
		} else if in.CreatedAt.Before(before.Add(-5*time.Minute)) || in.CreatedAt.After(time.Now().Add(5*time.Minute)) {
			t.Errorf("instance %s created at %s, not around %s", id, in.CreatedAt, before)
		}

		ci, err := p.ConnectInfo(s.ctx(t), id)
		if err != nil {
			t.Errorf("ConnectInfo(%s): %v", id, err)
		} else {
			if err := ci.Validate(); err != nil {
				t.Errorf("ConnectInfo(%s): %v", id, err)
			}
			if ci.ID != "" && ci.ID != id {
				t.Errorf("ConnectInfo(%s).ID = %q", id, ci.ID)
			}
		}
		if err := p.Heartbeat(s.ctx(t), id); err != nil {
			t.Errorf("Heartbeat(%s) of a running instance: %v", id, err)
		}
	}

	deleted, err := p.Delete(s.ctx(t), ids)
	if err != nil {
		t.Fatalf("Delete(%q): %v", ids, err)
	}
	if !sameSet(deleted, ids) {
		t.Errorf("Delete(%q) = %q, want all confirmed", ids, deleted)
	}
	s.waitList(t, p, "deleted instances to leave List", allGone(ids))

	again, err := p.Delete(s.ctx(t), ids)
	if err != nil {
		t.Errorf("second Delete(%q): %v, want success (idempotent)", ids, err)
	} else if !sameSet(again, ids) {
		t.Errorf("second Delete(%q) = %q, want all confirmed", ids, again)
	}
}

func (s *suite) testCreateEdges(t *testing.T) {
	p := s.start(t, s.opts.Settings(t))
	ids, err := p.Create(s.ctx(t), 0, s.opts.Labels)
	if err != nil || len(ids) != 0 {
		t.Errorf("Create(0) = %q, %v; want no ids and no error", ids, err)
	}
	ids, err = p.Create(s.ctx(t), -1, s.opts.Labels)
	if err == nil {
		t.Errorf("Create(-1) = %q, want an error", ids)
	} else if providers.KindOf(err) != providers.KindInvalidArgument {
		t.Errorf("Create(-1) error %q has kind %s, want invalid_argument", err, providers.KindOf(err))
	}
}

func (s *suite) testDeleteUnknown(t *testing.T) {
	p := s.start(t, s.opts.Settings(t))
	unknown := []string{"mayfly-conformance-no-such-instance"}
	deleted, err := p.Delete(s.ctx(t), unknown)
	if err != nil {
		t.Fatalf("Delete(%q): %v, want success", unknown, err)
	}
	if !sameSet(deleted, unknown) {
		t.Errorf("Delete(%q) = %q, want it confirmed", unknown, deleted)
	}
}

func (s *suite) testNotFound(t *testing.T) {
	p := s.start(t, s.opts.Settings(t))
	const id = "mayfly-conformance-no-such-instance"
	if _, err := p.ConnectInfo(s.ctx(t), id); !providers.IsNotFound(err) {
		t.Errorf("ConnectInfo(unknown) error = %v, want not found", err)
	}
	if err := p.Heartbeat(s.ctx(t), id); !providers.IsNotFound(err) {
		t.Errorf("Heartbeat(unknown) error = %v, want not found", err)
	}
}

func (s *suite) testConcurrentCreates(t *testing.T) {
	p := s.start(t, s.opts.Settings(t))
	n := s.opts.Concurrency
	var (
		mu   sync.Mutex
		ids  []string
		errs []error
		wg   sync.WaitGroup
	)
	for range n {
		wg.Go(func() {
			got, err := p.Create(s.ctx(t), 1, s.opts.Labels)
			mu.Lock()
			defer mu.Unlock()
			ids = append(ids, got...)
			if err != nil {
				errs = append(errs, err)
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		t.Errorf("concurrent Create(1): %v", err)
	}
	if len(ids) != n {
		t.Fatalf("%d concurrent Create(1) returned %d ids %q", n, len(ids), ids)
	}
	if uniq := slices.Compact(slices.Sorted(slices.Values(ids))); len(uniq) != n {
		t.Fatalf("concurrent creates returned duplicate ids: %q", ids)
	}
	s.waitList(t, p, "concurrently created instances to run", s.allRunning(ids))
	deleted, err := p.Delete(s.ctx(t), ids)
	if err != nil {
		t.Fatalf("Delete(%q): %v", ids, err)
	}
	if !sameSet(deleted, ids) {
		t.Errorf("Delete(%q) = %q", ids, deleted)
	}
	s.waitList(t, p, "deleted instances to leave List", allGone(ids))
}

func (s *suite) testFaults(t *testing.T) {
	if len(s.opts.Faults) == 0 {
		if s.opts.NoFaults != "" {
			t.Skip("typed errors unchecked: " + s.opts.NoFaults)
		}
		t.Fatal("conformance: Options.Faults is required (or Options.NoFaults with the reason the plugin cannot have typed-error cases): without them the kinds of its errors are never checked")
	}
	for _, f := range s.opts.Faults {
		t.Run(f.Name, func(t *testing.T) { s.testFault(t, f) })
	}
}

func (s *suite) testFault(t *testing.T, f Fault) {
	p := s.start(t, f.Settings(t))
	if f.Arm != nil {
		f.Arm(t)
	}
	var call func() error
	switch f.Op {
	case "create":
		call = func() error {
			ids, err := p.Create(s.ctx(t), 1, s.opts.Labels)
			if err == nil && len(ids) != 1 {
				return fmt.Errorf("Create(1) returned %d ids", len(ids))
			}
			return err
		}
	case "delete":
		call = func() error {
			_, err := p.Delete(s.ctx(t), []string{"mayfly-conformance-no-such-instance"})
			return err
		}
	case "list":
		call = func() error {
			_, err := p.List(s.ctx(t))
			return err
		}
	default:
		t.Fatalf("fault %s: Op %q is not create, delete or list", f.Name, f.Op)
	}

	err := call()
	if err == nil {
		t.Fatalf("%s: want a %s error, got success", f.Op, f.Want)
	}
	if got := providers.KindOf(err); got != f.Want {
		t.Fatalf("%s error %q has kind %s, want %s", f.Op, err, got, f.Want)
	}
	switch f.Want {
	case providers.KindRateLimited:
		if ra, ok := providers.IsRateLimited(err); !ok || ra != f.WantRetryAfter {
			t.Errorf("IsRateLimited(%q) = %s, %v; want %s, true", err, ra, ok, f.WantRetryAfter)
		}
	case providers.KindQuotaExceeded:
		if scope, ok := providers.IsQuotaExceeded(err); !ok || scope != f.WantScope {
			t.Errorf("IsQuotaExceeded(%q) = %q, %v; want %q, true", err, scope, ok, f.WantScope)
		}
	case providers.KindCapacityExhausted:
		if scope, ok := providers.IsCapacityExhausted(err); !ok || scope != f.WantScope {
			t.Errorf("IsCapacityExhausted(%q) = %q, %v; want %q, true", err, scope, ok, f.WantScope)
		}
	case providers.KindNotFound:
		if !providers.IsNotFound(err) {
			t.Errorf("IsNotFound(%q) = false", err)
		}
	}
	if f.Disarm != nil {
		f.Disarm(t)
	}
	if err := call(); err != nil {
		t.Errorf("%s after the fault: %v, want success", f.Op, err)
	}
}

func (s *suite) testShutdown(t *testing.T) {
	p := s.newProvider(t)
	if _, err := p.Init(s.ctx(t), s.opts.Settings(t)); err != nil {
		t.Fatalf("Init: %v", err)
	}
	if err := p.Shutdown(s.ctx(t)); err != nil {
		t.Errorf("Shutdown: %v", err)
	}
}

func sameSet(a, b []string) bool {
	return slices.Equal(slices.Sorted(slices.Values(a)), slices.Sorted(slices.Values(b)))
}
