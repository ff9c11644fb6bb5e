package fake

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
)

// clock is a manual clock for deterministic delays.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func newFake(t *testing.T, opts Options) (*Fake, *clock) {
	t.Helper()
	c := &clock{now: time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)}
	if opts.Now == nil {
		opts.Now = c.Now
	}
	f, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return f, c
}

func states(f *Fake) map[string]providers.State {
	m := map[string]providers.State{}
	for _, in := range f.Instances() {
		m[in.ID] = in.State
	}
	return m
}

func TestBootAndDeleteDelaysFollowTheClock(t *testing.T) {
	f, c := newFake(t, Options{BootDelay: time.Minute, DeleteDelay: 10 * time.Second})
	ctx := t.Context()
	ids, err := f.Create(ctx, 2, map[string]string{providers.LabelManager: "m"})
	if err != nil || len(ids) != 2 {
		t.Fatalf("Create = %v, %v", ids, err)
	}
	if got := states(f); got[ids[0]] != providers.StateCreating || got[ids[1]] != providers.StateCreating {
		t.Fatalf("states right after Create = %v", got)
	}
	if err := f.Heartbeat(ctx, ids[0]); !providers.IsTransient(err) {
		t.Errorf("Heartbeat while creating = %v, want transient", err)
	}
	c.Advance(59 * time.Second)
	if got := states(f); got[ids[0]] != providers.StateCreating {
		t.Fatalf("states before the boot delay = %v", got)
	}
	c.Advance(time.Second)
	if got := states(f); got[ids[0]] != providers.StateRunning || got[ids[1]] != providers.StateRunning {
		t.Fatalf("states after the boot delay = %v", got)
	}
	if err := f.Heartbeat(ctx, ids[0]); err != nil {
		t.Errorf("Heartbeat running = %v", err)
	}
	if _, err := f.Delete(ctx, ids[:1]); err != nil {
		t.Fatal(err)
	}
	if got := states(f); got[ids[0]] != providers.StateDeleting {
		t.Fatalf("state after Delete = %v", got)
	}
	c.Advance(10 * time.Second)
	if got := states(f); len(got) != 1 || got[ids[1]] != providers.StateRunning {
		t.Fatalf("states after the delete delay = %v", got)
	}
}

func TestFailBootsPreemptVanish(t *testing.T) {
	f, _ := newFake(t, Options{})
	f.FailBoots(1)
	ids, err := f.Create(t.Context(), 3, nil)
	if err != nil {
		t.Fatal(err)
	}
	got := states(f)
	if got[ids[0]] != providers.StateFailed || got[ids[1]] != providers.StateRunning {
		t.Fatalf("states = %v, want first failed, rest running", got)
	}
	if !f.Preempt(ids[1]) {
		t.Fatal("Preempt found no instance")
	}
	list := f.Instances()
	if list[1].State != providers.StateFailed || list[1].Reason != "preempted" {
		t.Errorf("preempted instance = %+v", list[1])
	}
	if err := f.Heartbeat(t.Context(), ids[1]); !providers.IsPermanent(err) {
		t.Errorf("Heartbeat of preempted = %v, want permanent", err)
	}
	if !f.Vanish(ids[2]) || f.Vanish(ids[2]) {
		t.Error("Vanish should find the instance once")
	}
	if _, err := f.ConnectInfo(t.Context(), ids[2]); !providers.IsNotFound(err) {
		t.Errorf("ConnectInfo of vanished = %v, want not found", err)
	}
}

func TestQuotaCreatesWhatFits(t *testing.T) {
	f, _ := newFake(t, Options{Quota: 3})
	ids, err := f.Create(t.Context(), 5, nil)
	if len(ids) != 3 {
		t.Fatalf("Create(5) under quota 3 made %d: %v", len(ids), ids)
	}
	if scope, ok := providers.IsQuotaExceeded(err); !ok || scope != "fake" {
		t.Fatalf("Create(5) error = %v, want quota exceeded in fake", err)
	}
	if ids, err := f.Create(t.Context(), 1, nil); len(ids) != 0 || err == nil {
		t.Fatalf("Create(1) at quota = %v, %v", ids, err)
	}
	f.SetQuota(0)
	if _, err := f.Create(t.Context(), 1, nil); err != nil {
		t.Fatalf("Create after lifting the quota: %v", err)
	}
}

func TestInjectedErrorsAndCounters(t *testing.T) {
	f, _ := newFake(t, Options{})
	ctx := t.Context()
	f.InjectError(OpCreate, 2, providers.RateLimited(3*time.Second, nil))
	for i := range 2 {
		ids, err := f.Create(ctx, 1, nil)
		if ra, ok := providers.IsRateLimited(err); !ok || ra != 3*time.Second || ids != nil {
			t.Fatalf("Create %d = %v, %v; want rate limited 3s and no ids", i, ids, err)
		}
	}
	ids, err := f.Create(ctx, 2, nil)
	if err != nil {
		t.Fatalf("third Create: %v", err)
	}
	f.FailDeletes(ids[0], 2)
	for i := range 2 {
		deleted, err := f.Delete(ctx, ids)
		if !providers.IsTransient(err) || !strings.Contains(err.Error(), ids[0]) {
			t.Fatalf("Delete %d error = %v, want transient naming %s", i, err, ids[0])
		}
		if !slices.Equal(deleted, ids[1:]) {
			t.Fatalf("Delete %d confirmed %v, want %v", i, deleted, ids[1:])
		}
	}
	if deleted, err := f.Delete(ctx, ids); err != nil || len(deleted) != 2 {
		t.Fatalf("third Delete = %v, %v", deleted, err)
	}
	if _, err := f.List(ctx); err != nil {
		t.Fatal(err)
	}
	want := map[Op]int{OpCreate: 3, OpDelete: 3, OpList: 1}
	if got := f.CallCounts(); !mapsEqual(got, want) {
		t.Errorf("CallCounts = %v, want %v", got, want)
	}
	f.InjectError(OpList, -1, providers.Transient(errors.New("down")))
	for range 3 {
		if _, err := f.List(ctx); err == nil {
			t.Fatal("List succeeded with a permanent fault injected")
		}
	}
	f.ClearFaults()
	if _, err := f.List(ctx); err != nil {
		t.Errorf("List after ClearFaults: %v", err)
	}
}

func mapsEqual(a, b map[Op]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func TestHoldBlocksUntilRelease(t *testing.T) {
	f, _ := newFake(t, Options{})
	release := f.Hold(OpCreate)
	done := make(chan error, 1)
	go func() {
		_, err := f.Create(t.Context(), 1, nil)
		done <- err
	}()
	for f.Calls(OpCreate) == 0 {
		time.Sleep(time.Millisecond)
	}
	select {
	case err := <-done:
		t.Fatalf("held Create returned: %v", err)
	case <-time.After(20 * time.Millisecond):
	}
	if n := len(f.Instances()); n != 0 {
		t.Fatalf("held Create made %d instances", n)
	}
	release()
	release() // twice is fine
	if err := <-done; err != nil {
		t.Fatalf("released Create: %v", err)
	}

	f.Hold(OpList)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := f.List(ctx); !providers.IsTransient(err) || !errors.Is(err, context.Canceled) {
		t.Errorf("held List with canceled ctx = %v, want transient canceled", err)
	}
}

func TestSleeperControlsCreateDelay(t *testing.T) {
	slept := make(chan time.Duration, 1)
	wake := make(chan struct{})
	f, _ := newFake(t, Options{CreateDelay: 90 * time.Second, Sleep: func(ctx context.Context, d time.Duration) error {
		slept <- d
		<-wake
		return nil
	}})
	done := make(chan []string, 1)
	go func() {
		ids, _ := f.Create(t.Context(), 1, nil)
		done <- ids
	}()
	if d := <-slept; d != 90*time.Second {
		t.Errorf("slept %s, want 90s", d)
	}
	if n := len(f.Instances()); n != 1 {
		t.Errorf("instances recorded before the delay ends = %d, want 1", n)
	}
	close(wake)
	if ids := <-done; len(ids) != 1 {
		t.Errorf("Create = %v", ids)
	}
}

func TestStateDirSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	f1, _ := newFake(t, Options{StateDir: dir})
	ids, err := f1.Create(t.Context(), 2, map[string]string{"k": "v"})
	if err != nil {
		t.Fatal(err)
	}
	ci1, err := f1.ConnectInfo(t.Context(), ids[0])
	if err != nil {
		t.Fatal(err)
	}
	f2, _ := newFake(t, Options{StateDir: dir})
	list := f2.Instances()
	if len(list) != 2 || list[0].ID != ids[0] || list[0].Labels["k"] != "v" {
		t.Fatalf("reloaded instances = %+v", list)
	}
	ci2, err := f2.ConnectInfo(t.Context(), ids[0])
	if err != nil || ci2.HostKey != ci1.HostKey || string(ci2.PrivateKey) != string(ci1.PrivateKey) {
		t.Errorf("host key not kept across restart: %v", err)
	}
	more, err := f2.Create(t.Context(), 1, nil)
	if err != nil || slices.Contains(ids, more[0]) {
		t.Errorf("Create after reload = %v, %v; ids must not be reused (had %v)", more, err, ids)
	}
}

func TestConnectInfoValid(t *testing.T) {
	for _, opts := range []Options{{}, {OS: "windows", Protocol: providers.ProtocolWinRM, Username: "Administrator"}} {
		f, _ := newFake(t, opts)
		ids, _ := f.Create(t.Context(), 1, nil)
		ci, err := f.ConnectInfo(t.Context(), ids[0])
		if err != nil {
			t.Fatal(err)
		}
		if err := ci.Validate(); err != nil {
			t.Errorf("%s connect info invalid: %v", ci.Protocol, err)
		}
	}
}

func TestLaunchGivesConnectInfoOnlyWhenAsked(t *testing.T) {
	for _, launch := range []bool{false, true} {
		f, _ := newFake(t, Options{Launch: launch})
		made, err := Launching{f}.Launch(t.Context(), 2, map[string]string{"k": "v"})
		if err != nil || len(made) != 2 {
			t.Fatalf("launch %v: Launch = %v, %v", launch, made, err)
		}
		for _, in := range made {
			if got := in.ConnectInfo != nil; got != launch {
				t.Fatalf("launch %v: instance %s has connect info %v", launch, in.ID, got)
			}
			if !launch {
				continue
			}
			if err := in.ConnectInfo.Validate(); err != nil {
				t.Errorf("launched connect info invalid: %v", err)
			}
			ci, err := f.ConnectInfo(t.Context(), in.ID)
			if err != nil || ci.Port != in.ConnectInfo.Port || ci.HostKey != in.ConnectInfo.HostKey || string(ci.PrivateKey) != string(in.ConnectInfo.PrivateKey) {
				t.Errorf("ConnectInfo(%s) = %+v, %v; Launch said %+v", in.ID, ci, err, *in.ConnectInfo)
			}
		}
		if c, ci := f.Calls(OpCreate), f.Calls(OpConnectInfo); c != 1 || ci != map[bool]int{false: 0, true: 2}[launch] {
			t.Errorf("launch %v: %d create and %d connect info calls, want 1 and the test's own", launch, c, ci)
		}
	}
}

func TestInitSettings(t *testing.T) {
	tests := []struct {
		settings string
		wantErr  string
	}{
		{`{"id": "g", "max_size": 7, "boot_delay": "1m", "faults": [{"op": "create", "kind": "rate_limited", "retry_after": "2s"}]}`, ""},
		{`{"boot_delay": 5}`, `"boot_delay"`},
		{`{"boot_delay": "soon"}`, `"boot_delay"`},
		{`{"zone": "x"}`, `unknown key "zone"`},
		{`{"faults": [{"op": "explode", "kind": "transient"}]}`, `"faults[0]"`},
		{`{"faults": [{"op": "create", "kind": "bad"}]}`, `unknown error kind "bad"`},
		{`{"protocol": "rdp"}`, `"protocol"`},
		{`{"quota": -1}`, `"quota"`},
		{`{"hostile": {"hang": ["init"]}}`, `"hostile": hang[0]`},
		{`{"hostile": {"list_extra": -1}}`, `"hostile": list_extra`},
		{`{"hostile": {"slow": "-1s"}}`, `"hostile": duration "-1s" is negative`},
		{`{"hostile": {"explode": true}}`, `unknown key`},
	}
	for _, tt := range tests {
		t.Run(tt.settings, func(t *testing.T) {
			f, _ := newFake(t, Options{})
			info, err := f.Init(t.Context(), json.RawMessage(tt.settings))
			if tt.wantErr == "" {
				if err != nil || info.ID != "g" || info.MaxSize != 7 || info.Version != Version {
					t.Fatalf("Init = %+v, %v", info, err)
				}
				if _, err := f.Create(t.Context(), 1, nil); err == nil {
					t.Error("fault from settings not armed")
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !providers.IsPermanent(err) {
				t.Errorf("Init(%s) = %v, want permanent error containing %s", tt.settings, err, tt.wantErr)
			}
		})
	}
}

func TestShutdownClosesCalls(t *testing.T) {
	f, _ := newFake(t, Options{})
	if err := f.Shutdown(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, err := f.List(t.Context()); !errors.Is(err, providers.ErrClosed) {
		t.Errorf("List after Shutdown = %v, want ErrClosed", err)
	}
}

// The hostile settings: made-up list entries, a replaced address, a
// hanging operation.
func TestHostileSettings(t *testing.T) {
	f, _ := newFake(t, Options{})
	if _, err := f.Init(t.Context(), json.RawMessage(`{"hostile": {"list_extra": 3, "list_labels": {"a": "b"}, "connect_address": "169.254.169.254", "hang": ["heartbeat"]}}`)); err != nil {
		t.Fatal(err)
	}
	ids, err := f.Create(t.Context(), 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	list, err := f.List(t.Context())
	if err != nil || len(list) != 4 || !list[3].HasLabels(map[string]string{"a": "b"}) {
		t.Errorf("List = %v, %v; want the instance and 3 made-up ones labelled a=b", list, err)
	}
	ci, err := f.ConnectInfo(t.Context(), ids[0])
	if err != nil || ci.Address != "169.254.169.254" || ci.Validate() == nil {
		t.Errorf("ConnectInfo = %+v, %v; want the hostile address, which does not validate", ci, err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if err := f.Heartbeat(ctx, ids[0]); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Heartbeat = %v, want it to hang until its context ends", err)
	}
}
