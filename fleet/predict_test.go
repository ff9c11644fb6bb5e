package fleet

import (
	"context"
	"math"
	"math/rand/v2"
	"sync"
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
		name string
		p    schedule.Policy
		rate float64
		lead time.Duration
		want int
	}{
		{"no traffic", pol(10, 0), 0, 48 * time.Second, 0},
		{"mu 1 default quantile", pol(10, 0), 0.1, 10 * time.Second, 3},
		{"mu 10 q95", pol(100, 0.95), 0.2, 50 * time.Second, 15},
		{"mu 1 q50", pol(10, 0.5), 1.0 / 30, 30 * time.Second, 1},
		{"ceiling", pol(4, 0.95), 0.2, 50 * time.Second, 4},
		{"ceiling 0 wins over floor", pol(0, 0.95), 0.2, 50 * time.Second, 0},
		{"no lead (boots within PredictiveWithin): no pool", pol(10, 0.95), 1, 0, 0},
		{"taskscaler style keeps IdleCount as ceiling", schedule.Policy{Style: schedule.Taskscaler, Predictive: true, IdleCount: 5, ScaleFactor: 2, ScaleFactorLimit: 50}, 1, 63 * time.Second, 5},
	}
	for _, tt := range tests {
		if got := PredictiveTarget(tt.p, tt.rate, tt.lead); got != tt.want {
			t.Errorf("%s: PredictiveTarget = %d, want %d", tt.name, got, tt.want)
		}
	}
}

func TestPredictiveLead(t *testing.T) {
	p := schedule.Policy{Predictive: true}
	if got := predictiveLead(45*time.Second, 3*time.Second, time.Second, p); got != 46*time.Second {
		t.Errorf("lead = %v, want batch + boot", got)
	}
	if got := predictiveLead(0, 0, 0, p); got != 0 {
		t.Errorf("lead with no boot measured = %v, want 0: no pool until one is", got)
	}
	p.PredictiveWithin = 2 * time.Minute
	if got := predictiveLead(45*time.Second, 3*time.Second, time.Second, p); got != 0 {
		t.Errorf("lead with boots within PredictiveWithin = %v, want 0", got)
	}
	if got := predictiveLead(300*time.Second, 3*time.Second, time.Second, p); got != 184*time.Second {
		t.Errorf("Windows lead = %v, want the 184s of a boot beyond PredictiveWithin", got)
	}
}

func TestDemandMeter(t *testing.T) {
	var d DemandMeter
	if got := d.Demand(t0, 0); got != (Demand{Price: priceStart}) {
		t.Fatalf("empty meter: %+v", got)
	}
	// 60 jobs in the last 5 minutes: over the 30-minute window, 1/30 a second.
	for i := range 60 {
		d.Acquired(t0.Add(time.Duration(i) * 5 * time.Second))
	}
	now := t0.Add(299 * time.Second)
	if r, want := d.Rate(now), 60.0/1800; r != want {
		t.Errorf("rate = %v, want %v", r, want)
	}
	if r := d.Rate(now.Add(31 * time.Minute)); r != 0 {
		t.Errorf("rate after the window = %v, want 0", r)
	}
	if len(d.acq)-d.head != 0 {
		t.Errorf("%d jobs kept past the window", len(d.acq)-d.head)
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
}

// TestPriceLearnsTheQuantile: the price of a job served in time rises while
// fewer than the quantile are, falls while more are, and stays put at it.
func TestPriceLearnsTheQuantile(t *testing.T) {
	const q = 0.9
	var d DemandMeter
	for range 200 {
		d.Served(false, q)
	}
	if p := d.Price(); p <= priceStart*10 {
		t.Errorf("price after 200 jobs served late = %v, want well above %v", p, priceStart)
	}
	var up DemandMeter
	for range 200 {
		up.Served(true, q)
	}
	if p := up.Price(); p >= priceStart {
		t.Errorf("price after 200 jobs served in time = %v, want below %v", p, priceStart)
	}
	var bal DemandMeter
	for i := range 1000 {
		bal.Served(i%10 != 0, q) // exactly 90 % in time
	}
	if p := bal.Price(); math.Abs(p/priceStart-1) > 1e-6 {
		t.Errorf("price at exactly the quantile moved from %v to %v", priceStart, p)
	}
	for range 100000 {
		d.Served(false, q)
	}
	if p := d.Price(); p != priceMax {
		t.Errorf("price is not bounded: %v", p)
	}
}

// TestStockFollowsThePrice: on a steady stream of jobs, a higher price
// keeps a larger stock; none is kept when the lead time is 0, and none
// without jobs.
func TestStockFollowsThePrice(t *testing.T) {
	var d DemandMeter
	// Poisson jobs, one every 6 s on average for 30 minutes: 8 expected
	// within a 48 s lead.
	r := rand.New(rand.NewPCG(1, 2))
	at := t0
	for at.Before(t0.Add(30 * time.Minute)) {
		d.Acquired(at)
		at = at.Add(time.Duration(r.ExpFloat64() * float64(6*time.Second)))
	}
	now := t0.Add(30 * time.Minute)
	lead := 48 * time.Second
	cheap, dear := d.stock(now, lead, 10), d.stock(now, lead, 1000)
	if cheap >= dear || dear < 8 {
		t.Errorf("stock at price 10 = %d, at 1000 = %d: want it to grow with the price, beyond the 8 expected", cheap, dear)
	}
	if got := d.Demand(now, 0).Stock; got != 0 {
		t.Errorf("stock with lead 0 = %d, want 0", got)
	}
	var empty DemandMeter
	if got := empty.stock(now, lead, 1000); got != 0 {
		t.Errorf("stock without jobs = %d", got)
	}
	// The Poisson version: more with the price, never negative.
	if a, b := poissonStock(8, 1.0/6, 10), poissonStock(8, 1.0/6, 1000); a > b || a < 0 {
		t.Errorf("poisson stock %d at price 10, %d at 1000", a, b)
	}
}

func TestDecidePredictive(t *testing.T) {
	p := schedule.Policy{Predictive: true, IdleCount: 8, IdleTime: time.Hour, ScaleFactor: 10}
	l := Limits{CheckInterval: 3 * time.Second}
	tests := []struct {
		name       string
		demand     Demand
		wantTarget int
	}{
		{"no traffic", Demand{Lead: 3 * time.Second}, 0},
		{"stock", Demand{Rate: 0.1, Lead: 10 * time.Second, Stock: 3}, 3},
		{"stock capped by IdleCount", Demand{Rate: 5, Lead: time.Minute, Stock: 20}, 8},
	}
	for _, tt := range tests {
		s := Snapshot{Now: t0, Demand: tt.demand}
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
	if plan := Decide(Snapshot{Now: t0, Demand: Demand{Rate: 5, Stock: 3}}, p, l); plan.IdleTarget != 8 || !plan.Wake.IsZero() {
		t.Errorf("non-predictive: target %d wake %v", plan.IdleTarget, plan.Wake)
	}
}

// TestPredictiveFleetFollowsRate runs the fleet on a fake clock with the
// predictive policy: the idle target rises with the job rate, never passes
// IdleCount, and falls to 0 when traffic stops.
func TestPredictiveFleetFollowsRate(t *testing.T) {
	const ceiling = 6
	h := newHarness(t, Config{
		Schedule: idlePolicy(schedule.Policy{Predictive: true, IdleCount: ceiling, IdleTime: 10 * time.Minute}),
		Limits:   Limits{CheckInterval: 3 * time.Second},
	}, fake.Options{BootDelay: 20 * time.Second})
	h.start()
	if got := h.f.Status().IdleTarget; got != 0 {
		t.Fatalf("idle target without traffic = %d, want 0", got)
	}
	maxTarget := 0
	var jobs sync.WaitGroup
	// phase has a job come every interval for d; each takes an instance,
	// waiting for one if none is idle, and gives it back at once.
	phase := func(d, interval time.Duration) {
		end := h.clk.Now().Add(d)
		for h.clk.Now().Before(end) {
			jobs.Go(func() {
				if l, err := h.f.Acquire(context.Background()); err == nil {
					l.Release(JobSucceeded)
				}
			})
			h.advance(interval, time.Second)
			target := h.f.Status().IdleTarget
			if target > ceiling {
				t.Fatalf("at %v: idle target %d above IdleCount %d", h.clk.Now(), target, ceiling)
			}
			maxTarget = max(maxTarget, target)
		}
	}
	defer jobs.Wait()
	defer h.stop()
	// A job every 4 s against a 20 s boot: about 5 within a lead time,
	// more than the ceiling allows at a high price.
	h.f.mu.Lock()
	h.f.demand.price = 1e4
	h.f.mu.Unlock()
	phase(10*time.Minute, 4*time.Second)
	if maxTarget != ceiling {
		t.Errorf("max idle target at one job every 4s = %d, want the ceiling %d", maxTarget, ceiling)
	}
	// Jobs waiting on demand get instances of their own beyond the
	// ceiling; the idle ones never pass it.
	if n := h.count(StateIdle); n > ceiling {
		t.Errorf("%d idle instances, above IdleCount %d", n, ceiling)
	}
	// Quiet for longer than the window: no stock.
	h.advance(31*time.Minute, 30*time.Second)
	if got := h.f.Status().IdleTarget; got != 0 {
		t.Errorf("idle target after 31 quiet minutes = %d, want 0", got)
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

// TestStockCoversBursts: a pipeline of 50 parallel jobs makes the stock
// cover its width when the price is high, although the Poisson quantile
// at the half hour's rate asks for far fewer.
func TestStockCoversBursts(t *testing.T) {
	var d DemandMeter
	for i := range 50 {
		d.Acquired(t0.Add(time.Duration(i) * 100 * time.Millisecond))
	}
	now := t0.Add(20 * time.Minute)
	lead := 48 * time.Second
	// A stock for a burst every half hour stands idle most of the time:
	// worth it only at a high price.
	if stock := d.stock(now, lead, 1e4); stock < 40 || stock > 50 {
		t.Errorf("stock after a burst of 50 at a high price = %d, want most of its width", stock)
	}
	if stock := d.stock(now, lead, 100); stock != 0 {
		t.Errorf("stock after a burst of 50 at a low price = %d, want 0", stock)
	}
	if poisson := PredictiveTarget(schedule.Policy{IdleCount: 1000, PredictiveQuantile: 0.95}, d.Rate(now), lead); poisson >= 10 {
		t.Errorf("the Poisson target alone is %d: the test no longer shows what the job distribution adds", poisson)
	}
	if late := d.Demand(t0.Add(31*time.Minute), lead).Stock; late != 0 {
		t.Errorf("stock after 31 minutes = %d, want 0 (the burst forgotten)", late)
	}
}
