package fleet

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/schedule"
)

var t0 = time.Date(2026, 3, 4, 12, 0, 0, 0, time.UTC) // a Wednesday

// books builds instance views from compact specs "state[:age]" where age is
// how long ago it was created (creating, provisioning) or became idle.
func books(specs ...string) []InstanceView {
	var out []InstanceView
	for i, spec := range specs {
		st, age, _ := strings.Cut(spec, ":")
		var d time.Duration
		if age != "" {
			var err error
			if d, err = time.ParseDuration(age); err != nil {
				panic(err)
			}
		}
		v := InstanceView{ID: fmt.Sprintf("i-%02d", i), CreatedAt: t0.Add(-d), IdleSince: t0.Add(-d)}
		switch st {
		case "creating":
			v.State = StateCreating
		case "provisioning":
			v.State = StateProvisioning
		case "idle":
			v.State = StateIdle
		case "used": // idle with its use spent
			v.State, v.Uses = StateIdle, 1
		case "acquired":
			v.State = StateAcquired
		case "deleting":
			v.State = StateDeleting
		case "failed":
			v.State = StateFailed
		default:
			panic("bad state " + st)
		}
		out = append(out, v)
	}
	return out
}

func repeat(spec string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = spec
	}
	return out
}

func TestDecide(t *testing.T) {
	idle5 := schedule.Policy{IdleCount: 5, IdleTime: time.Hour}
	tests := []struct {
		name       string
		snap       Snapshot
		policy     schedule.Policy
		limits     Limits
		wantTarget int
		wantCreate int
		wantHeld   string
		wantDelete []string // "id reason"
		wantWake   time.Time
	}{
		{
			name:       "empty pool fills to IdleCount",
			policy:     idle5,
			wantTarget: 5, wantCreate: 5,
		},
		{
			name:       "creating and requested count toward the target",
			snap:       Snapshot{Instances: books("idle", "idle", "creating", "provisioning"), Requested: 1},
			policy:     idle5,
			wantTarget: 5, wantCreate: 0,
		},
		{
			name:       "in-use instances do not count as idle",
			snap:       Snapshot{Instances: books("acquired", "acquired", "idle")},
			policy:     idle5,
			wantTarget: 5, wantCreate: 4,
		},
		{
			name:       "blocked acquisitions add demand",
			snap:       Snapshot{Instances: books("creating"), Reserved: 3, Waiting: 3},
			policy:     idle5,
			wantTarget: 5, wantCreate: 7,
		},
		{
			// A promise whose job has not come (GitLab may have none) adds
			// nothing: creating for every poll would churn.
			name:       "promises without a job add no demand",
			snap:       Snapshot{Instances: books("creating"), Reserved: 3},
			policy:     idle5,
			wantTarget: 5, wantCreate: 4,
		},
		{
			name:       "MaxGrowthRate caps creations in flight",
			snap:       Snapshot{Instances: books("creating", "provisioning"), Requested: 1},
			policy:     schedule.Policy{IdleCount: 50},
			limits:     Limits{MaxGrowthRate: 5},
			wantTarget: 50, wantCreate: 2, wantHeld: HeldGrowthRate,
		},
		{
			name:       "MaxGrowthRate reached: nothing more",
			snap:       Snapshot{Requested: 5},
			policy:     schedule.Policy{IdleCount: 50},
			limits:     Limits{MaxGrowthRate: 5},
			wantTarget: 50, wantCreate: 0, wantHeld: HeldGrowthRate,
		},
		{
			name:       "MaxInstances counts every state, deleting included",
			snap:       Snapshot{Instances: books("acquired", "acquired", "deleting")},
			policy:     idle5,
			limits:     Limits{MaxInstances: 4},
			wantTarget: 5, wantCreate: 1, wantHeld: HeldMaxInstances,
		},
		{
			name:       "IdleScaleFactor with IdleCountMin: floor",
			snap:       Snapshot{Instances: books("acquired", "acquired")},
			policy:     schedule.Policy{IdleCount: 100, IdleCountMin: 10, ScaleFactor: 1.1},
			wantTarget: 10, wantCreate: 10,
		},
		{
			name:       "IdleScaleFactor: 10 in use ask for 11 idle",
			snap:       Snapshot{Instances: books(repeat("acquired", 10)...)},
			policy:     schedule.Policy{IdleCount: 100, IdleCountMin: 10, ScaleFactor: 1.1},
			wantTarget: 11, wantCreate: 11,
		},
		{
			name:       "IdleScaleFactor capped by IdleCount",
			snap:       Snapshot{Instances: books(repeat("acquired", 200)...)},
			policy:     schedule.Policy{IdleCount: 100, IdleCountMin: 10, ScaleFactor: 1.1},
			wantTarget: 100, wantCreate: 100,
		},
		{
			name:       "taskscaler style: idle_count floor, scale_factor_limit ceiling",
			snap:       Snapshot{Instances: books(repeat("acquired", 30)...)},
			policy:     schedule.Policy{Style: schedule.Taskscaler, IdleCount: 2, ScaleFactor: 0.5, ScaleFactorLimit: 10},
			wantTarget: 10, wantCreate: 10,
		},
		{
			name:       "surplus idle past IdleTime removed, longest idle first",
			snap:       Snapshot{Instances: books("idle:10m", "idle:2h", "idle:90m", "idle:3h")},
			policy:     schedule.Policy{IdleCount: 2, IdleTime: time.Hour},
			wantTarget: 2,
			wantDelete: []string{"i-03 idle_time", "i-01 idle_time"},
		},
		{
			name:       "IdleTime not reached: kept, wake when it is",
			snap:       Snapshot{Instances: books("idle:10m", "idle:50m")},
			policy:     schedule.Policy{IdleCount: 0, IdleTime: time.Hour},
			wantTarget: 0,
			wantWake:   t0.Add(10*time.Minute + time.Nanosecond),
		},
		{
			name:       "IdleTime is a strict bound",
			snap:       Snapshot{Instances: books("idle:1h")},
			policy:     schedule.Policy{IdleCount: 0, IdleTime: time.Hour},
			wantTarget: 0,
			wantWake:   t0.Add(time.Nanosecond),
		},
		{
			name:       "creating instances make idle ones surplus",
			snap:       Snapshot{Instances: books("idle:2h", "idle:2h", "creating")},
			policy:     schedule.Policy{IdleCount: 2, IdleTime: time.Hour},
			wantTarget: 2,
			wantDelete: []string{"i-00 idle_time"},
		},
		{
			name:       "an instance ready for a waiting job is not surplus (issue 20)",
			snap:       Snapshot{Instances: books("idle:0s", "creating"), Reserved: 2},
			policy:     schedule.Policy{IdleCount: 0},
			wantTarget: 0,
		},
		{
			name:       "idle instances promised to jobs outlive IdleTime",
			snap:       Snapshot{Instances: books("idle:2h", "idle:2h", "creating", "creating", "creating"), Reserved: 2},
			policy:     schedule.Policy{IdleCount: 0, IdleTime: time.Hour},
			wantTarget: 0,
		},
		{
			name:       "idle beyond the promised ones is still surplus",
			snap:       Snapshot{Instances: books("idle:2h", "idle:3h", "idle:1h"), Reserved: 1},
			policy:     schedule.Policy{IdleCount: 0, IdleTime: 30 * time.Minute},
			wantTarget: 0,
			wantDelete: []string{"i-01 idle_time", "i-00 idle_time"},
		},
		{
			// The idle instance counts toward the target until a promise
			// acquires it; the replacement is made then. The two jobs
			// that came and wait are created for.
			name:       "jobs waiting beyond idle and booting instances are created for",
			snap:       Snapshot{Instances: books("creating"), Reserved: 3, Waiting: 2},
			policy:     schedule.Policy{IdleCount: 1},
			wantTarget: 1, wantCreate: 2,
		},
		{
			name:       "boot watchdog deletes and replaces a slow instance",
			snap:       Snapshot{Instances: books("creating:11m", "provisioning:9m")},
			policy:     schedule.Policy{IdleCount: 2},
			limits:     Limits{BootTimeout: 10 * time.Minute},
			wantTarget: 2, wantCreate: 1,
			wantDelete: []string{"i-00 boot_timeout"},
			wantWake:   t0.Add(time.Minute),
		},
		{
			name:       "failed instances are deleted",
			snap:       Snapshot{Instances: books("failed", "idle")},
			policy:     schedule.Policy{IdleCount: 1},
			wantTarget: 1,
			wantDelete: []string{"i-00 failed"},
		},
		{
			name:       "idle instance with its uses spent is deleted and replaced",
			snap:       Snapshot{Instances: books("used")},
			policy:     schedule.Policy{IdleCount: 1},
			limits:     Limits{MaxUses: 1},
			wantTarget: 1, wantCreate: 1,
			wantDelete: []string{"i-00 max_uses"},
		},
		{
			name:       "over a lowered MaxInstances: longest idle shed",
			snap:       Snapshot{Instances: books("idle:1m", "idle:5m", "idle:3m", "acquired")},
			policy:     schedule.Policy{IdleCount: 3},
			limits:     Limits{MaxInstances: 2},
			wantTarget: 3, wantHeld: HeldMaxInstances,
			wantDelete: []string{"i-01 over_limit", "i-02 over_limit"},
		},
		{
			name:       "backoff: nothing created until RetryAt",
			snap:       Snapshot{Breaker: Breaker{Failures: 2, RetryAt: t0.Add(20 * time.Second)}},
			policy:     idle5,
			wantTarget: 5, wantHeld: HeldBackoff,
			wantWake: t0.Add(20 * time.Second),
		},
		{
			name:       "backoff over: full creation",
			snap:       Snapshot{Breaker: Breaker{Failures: 2, RetryAt: t0}},
			policy:     idle5,
			wantTarget: 5, wantCreate: 5,
		},
		{
			name:       "open circuit: one probe",
			snap:       Snapshot{Breaker: Breaker{Failures: 1, RetryAt: t0.Add(-time.Second), Open: true}},
			policy:     idle5,
			wantTarget: 5, wantCreate: 1, wantHeld: HeldCircuitOpen,
		},
		{
			name:       "open circuit: no second probe while one is in flight",
			snap:       Snapshot{Instances: books("creating"), Breaker: Breaker{Failures: 1, Open: true}},
			policy:     idle5,
			wantTarget: 5, wantCreate: 0, wantHeld: HeldCircuitOpen,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.snap.Now = t0
			p := Decide(tt.snap, tt.policy, tt.limits)
			if p.IdleTarget != tt.wantTarget || p.Create != tt.wantCreate || p.Held != tt.wantHeld {
				t.Errorf("target %d create %d held %q, want %d %d %q", p.IdleTarget, p.Create, p.Held, tt.wantTarget, tt.wantCreate, tt.wantHeld)
			}
			var got []string
			for _, d := range p.Delete {
				got = append(got, d.ID+" "+string(d.Reason))
			}
			if !slices.Equal(got, tt.wantDelete) {
				t.Errorf("delete %q, want %q", got, tt.wantDelete)
			}
			if !p.Wake.Equal(tt.wantWake) {
				t.Errorf("wake %v, want %v", p.Wake, tt.wantWake)
			}
		})
	}
}

func TestDecideCounts(t *testing.T) {
	p := Decide(Snapshot{Now: t0, Instances: books("idle", "idle", "acquired", "deleting", "creating"), Requested: 2}, schedule.Policy{}, Limits{})
	want := [NumStates]int{StateRequested: 2, StateCreating: 1, StateIdle: 2, StateAcquired: 1, StateDeleting: 1}
	if p.Counts != want {
		t.Fatalf("counts %v, want %v", p.Counts, want)
	}
}

func TestBreaker(t *testing.T) {
	var b Breaker
	if b.Allow(t0) != -1 {
		t.Fatal("a fresh breaker limits creation")
	}
	b.Fail(t0, false, 5*time.Second, time.Minute)
	b.Fail(t0, false, 5*time.Second, time.Minute)
	if b.RetryAt != t0.Add(10*time.Second) || b.Allow(t0.Add(9*time.Second)) != 0 || b.Allow(t0.Add(10*time.Second)) != -1 {
		t.Fatalf("after 2 failures: retry at %v", b.RetryAt.Sub(t0))
	}
	b.Fail(t0, true, 5*time.Second, time.Minute)
	if b.Allow(t0.Add(time.Minute)) != 1 {
		t.Fatal("a quota failure does not open the circuit")
	}
	b.Succeed(t0.Add(-time.Second)) // requested before the failure: proves nothing
	b.Succeed(t0)                   // made by the failing call: proves nothing
	if !b.Open {
		t.Fatal("an older instance closed the circuit")
	}
	b.Succeed(t0.Add(time.Second))
	if b != (Breaker{}) {
		t.Fatalf("success left %+v", b)
	}
}

func TestBackoff(t *testing.T) {
	for _, tt := range []struct {
		attempt int
		want    time.Duration
	}{{0, time.Second}, {1, time.Second}, {2, 2 * time.Second}, {4, 8 * time.Second}, {7, 30 * time.Second}, {1000, 30 * time.Second}} {
		if got := Backoff(time.Second, 30*time.Second, tt.attempt); got != tt.want {
			t.Errorf("Backoff(attempt %d) = %v, want %v", tt.attempt, got, tt.want)
		}
	}
}

func TestStateTransitions(t *testing.T) {
	legal := []struct{ from, to State }{
		{StateRequested, StateCreating}, {StateCreating, StateProvisioning}, {StateProvisioning, StateIdle},
		{StateIdle, StateAcquired}, {StateAcquired, StateIdle}, {StateAcquired, StateDeleting},
		{StateDeleting, StateGone}, {StateCreating, StateFailed}, {StateFailed, StateDeleting},
	}
	for _, tt := range legal {
		if !CanTransition(tt.from, tt.to) {
			t.Errorf("%s → %s refused", tt.from, tt.to)
		}
	}
	illegal := []struct{ from, to State }{
		{StateDeleting, StateIdle}, {StateGone, StateIdle}, {StateFailed, StateIdle}, {StateAcquired, StateFailed},
		{StateCreating, StateAcquired}, {StateDeleting, StateAcquired}, {StateIdle, StateCreating}, {State(99), StateIdle},
	}
	for _, tt := range illegal {
		if CanTransition(tt.from, tt.to) {
			t.Errorf("%s → %s allowed", tt.from, tt.to)
		}
	}
	if StateProvisioning.String() != "provisioning" || State(42).String() != "state(42)" {
		t.Error("state names")
	}
}
