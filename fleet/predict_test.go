package fleet

import (
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers/fake"
	"github.com/mayfly-ci/mayfly/schedule"
)

func TestPoissonQuantile(t *testing.T) {
	tests := []struct {
		mu, q float64
		want  int
	}{
		{0, 0.95, 0},
		{1, 0.5, 1},    // P(X≤0)=0.368, P(X≤1)=0.736
		{1, 0.95, 3},   // P(X≤2)=0.920, P(X≤3)=0.981
		{10, 0.95, 15}, // P(X≤14)=0.917, P(X≤15)=0.951
		{10000, 0.5, 10000},
	}
	for _, tt := range tests {
		if got := PoissonQuantile(tt.mu, tt.q); got != tt.want {
			t.Errorf("PoissonQuantile(%v, %v) = %d, want %d", tt.mu, tt.q, got, tt.want)
		}
	}
}

func TestPredictiveTarget(t *testing.T) {
	pol := func(idle int, q float64) schedule.Policy {
		return schedule.Policy{Predictive: true, IdleCount: idle, PredictiveQuantile: q}
	}
	tests := []struct {
		name  string
		p     schedule.Policy
		rate  float64
		boot  time.Duration
		check time.Duration
		want  int
	}{
		{"no traffic: floor 1", pol(10, 0), 0, 45 * time.Second, 3 * time.Second, 1},
		{"mu 1 default quantile", pol(10, 0), 0.1, 7 * time.Second, 3 * time.Second, 3},
		{"mu 10 q95", pol(100, 0.95), 0.2, 47 * time.Second, 3 * time.Second, 15},
		{"mu 1 q50", pol(10, 0.5), 1.0 / 30, 27 * time.Second, 3 * time.Second, 1},
		{"ceiling", pol(4, 0.95), 0.2, 47 * time.Second, 3 * time.Second, 4},
		{"ceiling 0 wins over floor", pol(0, 0.95), 0.2, 47 * time.Second, 3 * time.Second, 0},
		{"no boot seen: check interval only", pol(10, 0.95), 1, 0, 3 * time.Second, 6},
		{"taskscaler style keeps IdleCount as ceiling", schedule.Policy{Style: schedule.Taskscaler, Predictive: true, IdleCount: 5, ScaleFactor: 2, ScaleFactorLimit: 50}, 1, 60 * time.Second, 0, 5},
	}
	for _, tt := range tests {
		if got := PredictiveTarget(tt.p, tt.rate, tt.boot, tt.check); got != tt.want {
			t.Errorf("%s: PredictiveTarget = %d, want %d", tt.name, got, tt.want)
		}
	}
}

func TestDemandMeter(t *testing.T) {
	var d DemandMeter
	if got := d.Demand(t0, 0, 0.95); got != (Demand{}) {
		t.Fatalf("empty meter: %+v", got)
	}
	// 60 acquisitions in the last 5 minutes: 0.2/s over the short window.
	for i := range 60 {
		d.Acquired(t0.Add(time.Duration(i) * 5 * time.Second))
	}
	now := t0.Add(299 * time.Second)
	if r := d.Rate(now); r != 0.2 {
		t.Errorf("rate after a 5m burst = %v, want 0.2", r)
	}
	// 20 minutes later the short window is empty, the long one remembers.
	if r, want := d.Rate(now.Add(20*time.Minute)), 60.0/1800; r != want {
		t.Errorf("rate 20m later = %v, want %v", r, want)
	}
	if r := d.Rate(now.Add(31 * time.Minute)); r != 0 {
		t.Errorf("rate after the long window = %v, want 0", r)
	}
	if len(d.acq)-d.head != 0 {
		t.Errorf("%d acquisitions kept past the window", len(d.acq)-d.head)
	}
	for _, b := range []time.Duration{10 * time.Second, 20 * time.Second, 30 * time.Second} {
		d.Booted(b)
	}
	if m := d.BootMean(); m != 20*time.Second {
		t.Errorf("boot mean = %v, want 20s", m)
	}
	for range bootSamples {
		d.Booted(40 * time.Second)
	}
	if m := d.BootMean(); m != 40*time.Second {
		t.Errorf("boot mean after %d samples = %v, want the last 16 (40s)", bootSamples, m)
	}

	// Catch-up: 5 acquisitions in the last lead time (40s + 3s), then a miss.
	at := t0.Add(time.Hour)
	for i := range 5 {
		d.Acquired(at.Add(time.Duration(i) * time.Second))
	}
	miss := at.Add(5 * time.Second)
	d.Missed(miss, 3*time.Second)
	if b := d.Demand(miss, 0, 0.95).Boost; b != 10 {
		t.Errorf("boost = %d, want twice the 5 acquisitions of the lead time", b)
	}
	d.Acquired(miss.Add(time.Second))
	d.Missed(miss.Add(2*time.Second), 3*time.Second) // within one lead time: no new doubling
	if b := d.Demand(miss.Add(2*time.Second), 0, 0.95).Boost; b != 10 {
		t.Errorf("boost after a second miss within the lead time = %d, want 10", b)
	}
	if b := d.Demand(miss.Add(43*time.Second), 0, 0.95).Boost; b != 0 {
		t.Errorf("boost after one lead time = %d, want 0", b)
	}
}

func TestDecidePredictive(t *testing.T) {
	p := schedule.Policy{Predictive: true, IdleCount: 8, IdleTime: time.Hour, ScaleFactor: 10}
	l := Limits{CheckInterval: 3 * time.Second}
	tests := []struct {
		name       string
		demand     Demand
		waiting    int
		wantTarget int
	}{
		{"no traffic", Demand{}, 0, 1},
		{"rate", Demand{Rate: 0.1, BootMean: 7 * time.Second}, 0, 3},
		{"rate capped by IdleCount", Demand{Rate: 5, BootMean: time.Minute}, 0, 8},
		{"boost", Demand{Rate: 0.1, BootMean: 7 * time.Second, Boost: 6}, 0, 6},
		{"boost capped by IdleCount", Demand{Boost: 20}, 0, 8},
	}
	for _, tt := range tests {
		s := Snapshot{Now: t0, Demand: tt.demand, Reserved: tt.waiting}
		plan := Decide(s, p, l)
		if plan.IdleTarget != tt.wantTarget || plan.Create != tt.wantTarget {
			t.Errorf("%s: target %d create %d, want %d", tt.name, plan.IdleTarget, plan.Create, tt.wantTarget)
		}
		if want := t0.Add(PredictiveReevaluate); !plan.Wake.Equal(want) {
			t.Errorf("%s: wake %v, want %v", tt.name, plan.Wake, want)
		}
	}
	// Without Predictive the demand is ignored.
	p.Predictive, p.ScaleFactor = false, 0
	if plan := Decide(Snapshot{Now: t0, Demand: Demand{Rate: 5}}, p, l); plan.IdleTarget != 8 || !plan.Wake.IsZero() {
		t.Errorf("non-predictive: target %d wake %v", plan.IdleTarget, plan.Wake)
	}
}

// TestPredictiveFleetFollowsRate runs the fleet on a fake clock with the
// predictive policy: the idle target rises with the acquisition rate, never
// passes IdleCount, and falls back to 1 when traffic stops.
func TestPredictiveFleetFollowsRate(t *testing.T) {
	const ceiling = 6
	h := newHarness(t, Config{
		Schedule: idlePolicy(schedule.Policy{Predictive: true, IdleCount: ceiling, IdleTime: 10 * time.Minute}),
		Limits:   Limits{CheckInterval: 3 * time.Second},
	}, fake.Options{BootDelay: 20 * time.Second})
	h.start()
	if got := h.f.Status().IdleTarget; got != 1 {
		t.Fatalf("idle target without traffic = %d, want 1", got)
	}
	maxTarget := 0
	// phase takes an instance every interval (when one is idle) for d.
	phase := func(d, interval time.Duration) {
		end := h.clk.Now().Add(d)
		for h.clk.Now().Before(end) {
			if h.f.Available() > 0 {
				h.acquire().Release(JobSucceeded)
				h.settle()
			}
			h.advance(interval, time.Second)
			target := h.f.Status().IdleTarget
			if target > ceiling {
				t.Fatalf("at %v: idle target %d above IdleCount %d", h.clk.Now(), target, ceiling)
			}
			maxTarget = max(maxTarget, target)
		}
	}
	// One job a minute, 23 s lead: about 0.4 expected, quantile 2.
	phase(30*time.Minute, time.Minute)
	h.f.mu.Lock()
	t.Logf("demand %+v", h.f.demand.Demand(h.clk.Now(), 0, 0.95))
	h.f.mu.Unlock()
	if got := h.f.Status().IdleTarget; got < 1 || got > 2 {
		t.Errorf("idle target at one job a minute = %d, want 1 or 2", got)
	}
	low := maxTarget
	// One job every 4 s: about 6 expected per lead time, capped at 6.
	phase(10*time.Minute, 4*time.Second)
	if maxTarget != ceiling {
		t.Errorf("max idle target at one job every 4s = %d, want the ceiling %d (low-rate max %d)", maxTarget, ceiling, low)
	}
	if n := h.count(StateIdle) + h.count(StateCreating) + h.count(StateProvisioning); n > ceiling {
		t.Errorf("%d idle or booting instances, above IdleCount %d", n, ceiling)
	}
	// Quiet for longer than the long window: back to the floor.
	h.advance(31*time.Minute, 30*time.Second)
	if got := h.f.Status().IdleTarget; got != 1 {
		t.Errorf("idle target after 31 quiet minutes = %d, want 1", got)
	}
}

func TestSetSchedule(t *testing.T) {
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 2, IdleTime: time.Minute})}, fake.Options{BootDelay: 10 * time.Second})
	h.start()
	h.until(time.Minute, time.Second, "2 idle", func() bool { return h.f.Available() == 2 })

	h.f.SetSchedule(idlePolicy(schedule.Policy{IdleCount: 5, IdleTime: time.Minute}))
	h.settle()
	if st := h.f.Status(); st.IdleTarget != 5 || st.Policy.IdleCount != 5 {
		t.Fatalf("after SetSchedule: target %d policy %+v, want 5", st.IdleTarget, st.Policy)
	}
	h.until(time.Minute, time.Second, "5 idle", func() bool { return h.f.Available() == 5 })

	// A lower target lets the surplus expire after IdleTime.
	h.f.SetSchedule(idlePolicy(schedule.Policy{IdleCount: 1, IdleTime: time.Minute}))
	h.settle()
	if got := h.f.Status().IdleTarget; got != 1 {
		t.Fatalf("after lowering: target %d, want 1", got)
	}
	h.until(3*time.Minute, 5*time.Second, "1 idle", func() bool { return h.count(StateIdle) == 1 })

	// Concurrent callers are safe (run with -race).
	done := make(chan struct{})
	for i := range 4 {
		go func() {
			defer func() { done <- struct{}{} }()
			h.f.SetSchedule(idlePolicy(schedule.Policy{IdleCount: 1 + i%2, IdleTime: time.Minute}))
		}()
	}
	for range 4 {
		<-done
	}
	h.settle()
	if got := h.f.Status().IdleTarget; got != 1 && got != 2 {
		t.Errorf("after concurrent SetSchedule: target %d, want 1 or 2", got)
	}
}

// A burst of 50 acquisitions (a pipeline of 50 parallel jobs) is
// remembered for 30 minutes, and the idle target covers it
// although the Poisson rate over 30 minutes asks for far fewer.
func TestDemandPeakCoversBursts(t *testing.T) {
	t0 := time.Date(2026, 11, 23, 10, 0, 0, 0, time.UTC)
	var d DemandMeter
	d.Booted(45 * time.Second)
	for i := range 50 {
		d.Acquired(t0.Add(time.Duration(i) * 100 * time.Millisecond))
	}
	d.Acquired(t0.Add(10 * time.Minute)) // a lone job later
	now := t0.Add(20 * time.Minute)
	dm := d.Demand(now, 3*time.Second, 0.95)
	// The jobs saw 1, 2, ... 50 and 1 (the lone one) acquisitions within a
	// lead time; the 0.975 quantile of those 51 numbers is 49.
	if dm.Peak != 49 {
		t.Fatalf("peak = %d, want 49", dm.Peak)
	}
	p := schedule.Policy{IdleCount: 40, Predictive: true}
	s := Snapshot{Now: now, Demand: dm}
	if got := idleTarget(&s, p, Limits{CheckInterval: 3 * time.Second}, 0); got != 40 {
		t.Errorf("idle target %d, want the burst capped by IdleCount 40", got)
	}
	if poisson := PredictiveTarget(p, dm.Rate, dm.BootMean, 3*time.Second); poisson >= 40 {
		t.Errorf("the Poisson target alone is %d: the test no longer shows what the peak adds", poisson)
	}
	if late := d.Demand(t0.Add(31*time.Minute), 3*time.Second, 0.95); late.Peak != 1 {
		t.Errorf("peak after 31 minutes = %d, want 1 (the burst forgotten, the lone job left)", late.Peak)
	}
}
