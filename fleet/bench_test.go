package fleet

import (
	"bytes"
	"container/heap"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"fmt"
	mrand "math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/fleet/fleettest"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/fake"
	"github.com/mayfly-ci/mayfly/schedule"
)

// testKeys returns a PEM private key and an authorized_keys host key, as a
// provider's ConnectInfo carries them.
func testKeys(tb testing.TB) ([]byte, string) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	block, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		tb.Fatal(err)
	}
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	hk, _ := ssh.NewPublicKey(pub)
	return pem.EncodeToMemory(block), string(ssh.MarshalAuthorizedKey(hk))
}

// loadedFleet returns a fleet whose books hold n instances (20 % idle,
// 70 % acquired, 10 % creating), each ready one with its own copy of a
// realistic ConnectInfo, and the heap bytes the books took per instance.
func loadedFleet(tb testing.TB, n int) (*Fleet, float64) {
	clk := fleettest.NewClock(t0)
	prov, err := fake.New(fake.Options{Now: clk.Now})
	if err != nil {
		tb.Fatal(err)
	}
	f, err := New(Config{
		Name: "linux", ManagerID: "mgr-1", Provider: prov, Clock: clk, Logger: testLogger(),
		Schedule: idlePolicy(schedule.Policy{IdleCount: n / 5, IdleTime: time.Hour}),
	})
	if err != nil {
		tb.Fatal(err)
	}
	f.journal, _ = createJournal("", nil)
	key, hostKey := testKeys(tb)

	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	f.mu.Lock()
	now := clk.Now()
	for i := range n {
		in := f.addLocked(fmt.Sprintf("fake-%06d", i), StateCreating, now)
		if i%10 == 9 {
			continue
		}
		f.setStateLocked(in, StateProvisioning)
		in.ci = providers.ConnectInfo{
			ID: in.id, Address: fmt.Sprintf("10.0.%d.%d", i/250, i%250), Port: 22, Protocol: providers.ProtocolSSH,
			OS: "linux", Arch: "amd64", Username: "mayfly", PrivateKey: bytes.Clone(key), HostKey: strings.Clone(hostKey),
		}
		in.idleSince = now
		f.becomeIdleLocked(in, false)
		if i%10 >= 2 {
			f.popIdleLocked()
			f.setStateLocked(in, StateAcquired)
			in.lost = make(chan struct{})
			in.journaled = true
			f.journal.live[in.id] = struct{}{}
		}
	}
	f.lastList = now
	f.recovered = true
	f.mu.Unlock()
	runtime.GC()
	runtime.ReadMemStats(&after)
	return f, float64(after.HeapAlloc-before.HeapAlloc) / float64(n)
}

// BenchmarkScalerPass measures one scaler pass (snapshot of the books,
// Decide, applying the plan, gauges) with 10,000 instances under
// management, and the heap the books take per instance.
//
//	go test -run '^$' -bench 'ScalerPass|Decide' -benchmem ./fleet/
func BenchmarkScalerPass(b *testing.B) {
	f, perInstance := loadedFleet(b, 10_000)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		f.pass(ctx)
	}
	b.ReportMetric(perInstance, "heap-B/instance")
	if f.lastPlan.Create != 0 || len(f.lastPlan.Delete) != 0 {
		b.Fatalf("pass changed the fleet: %+v", f.lastPlan)
	}
}

// BenchmarkDecide measures the pure decision over 10,000 instances, with
// surplus idle instances to sort for IdleTime.
func BenchmarkDecide(b *testing.B) {
	views := make([]InstanceView, 10_000)
	for i := range views {
		views[i] = InstanceView{ID: fmt.Sprintf("fake-%06d", i), State: StateIdle, IdleSince: t0.Add(-time.Duration(i) * time.Second)}
		if i%10 >= 3 {
			views[i].State = StateAcquired
		}
	}
	s := Snapshot{Now: t0, Instances: views}
	p := schedule.Policy{IdleCount: 1000, IdleTime: 10 * time.Minute}
	b.ReportAllocs()
	for b.Loop() {
		plan := Decide(s, p, Limits{MaxUses: 1})
		if len(plan.Delete) != 2000 {
			b.Fatalf("deletes %d", len(plan.Delete))
		}
	}
}

// endHeap orders running jobs by end time.
type endHeap []simJob

type simJob struct {
	end   time.Time
	lease *Lease
}

func (h endHeap) Len() int           { return len(h) }
func (h endHeap) Less(i, j int) bool { return h[i].end.Before(h[j].end) }
func (h endHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *endHeap) Push(x any)        { *h = append(*h, x.(simJob)) }
func (h *endHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// dayArrivals returns job arrival times over one day from start: 6 jobs a
// minute, 40 a minute in the 03:30–04:30 spike, with seeded jitter.
func dayArrivals(start time.Time) []time.Time {
	r := mrand.New(mrand.NewPCG(1, 2))
	var out []time.Time
	for m := range 24 * 60 {
		minute := start.Add(time.Duration(m) * time.Minute)
		rate := 6
		if h, mm := minute.Hour(), minute.Minute(); (h == 3 && mm >= 30) || (h == 4 && mm <= 30) {
			rate = 40
		}
		for range rate {
			out = append(out, minute.Add(time.Duration(r.Int64N(int64(time.Minute)))))
		}
	}
	slices.SortFunc(out, func(a, b time.Time) int { return a.Compare(b) })
	return out
}

// BenchmarkSimulatedDay replays one day of traffic against the fleet with
// the hosted Linux fleet's policy (IdleCount 50, 700 for the 03:30 spike,
// IdleTime 1h, MaxBuilds 1) on the fake provider (60 s boot, 30 s delete)
// and a fake clock. The manager side acquires only when Available() > 0,
// as mayfly's manager does. It reports provider API calls per completed job
// and the share of jobs that waited over 120 s for an instance.
//
//	go test -run '^$' -bench SimulatedDay -benchtime 1x ./fleet/
//
// It runs twice: with the fake as it is (connect info by one ConnectInfo
// call per instance once a list shows it running, as the plugins over the
// wire protocol today), and as a providers.Launcher (connect info with
// Create; the provisioner waits for the boot).
func BenchmarkSimulatedDay(b *testing.B) {
	for _, launch := range []bool{false, true} {
		name := "connect=call"
		if launch {
			name = "connect=create"
		}
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				simulateDay(b, launch)
			}
		})
	}
}

func simulateDay(b *testing.B, launch bool) {
	start := time.Date(2026, 3, 4, 0, 0, 0, 0, time.UTC)
	clk := fleettest.NewClock(start)
	per := func(exprs ...string) []schedule.Period {
		var out []schedule.Period
		for _, e := range exprs {
			p, err := schedule.ParsePeriod(e, time.UTC)
			if err != nil {
				b.Fatal(err)
			}
			out = append(out, p)
		}
		return out
	}
	sched := schedule.Schedule{
		Default: schedule.Policy{IdleCount: 50, IdleTime: time.Hour},
		Entries: []schedule.Entry{
			{Periods: per("* * * * * sat,sun *"), Policy: schedule.Policy{IdleCount: 70, IdleTime: time.Hour}},
			{Periods: per("* 30-59 3 * * * *", "* 0-30 4 * * * *"), Policy: schedule.Policy{IdleCount: 700, IdleTime: time.Hour}},
		},
	}
	// The batch windows are the fleet's defaults (the harness turns them
	// off for the tests).
	cfg := Config{Schedule: sched, Clock: clk, JournalPath: "-", APIRate: 20, APIBurst: 40, CreateBatchWindow: time.Second, DeleteBatchWindow: 5 * time.Second}
	bw := &bootWait{boot: time.Minute, now: clk.Now}
	if launch {
		cfg.Provisioner = bw
	}
	h := newHarness(b, cfg, fake.Options{BootDelay: time.Minute, DeleteDelay: 30 * time.Second})
	h.f.cfg.JournalPath = "" // in memory: a day of fsyncs is not what this measures
	if launch {
		bw.fk = h.prov.Fake
		h.f.api.prov = launchingProvider{h.prov}
	}
	wallStart := time.Now()
	h.start()

	arrivals := dayArrivals(start)
	end := start.Add(24 * time.Hour)
	r := mrand.New(mrand.NewPCG(3, 4))
	var queue []time.Time
	var running endHeap
	completed, waitedLong := 0, 0
	var waits []time.Duration
	ctx := context.Background()
	for {
		now := clk.Now()
		for len(arrivals) > 0 && !arrivals[0].After(now) {
			queue = append(queue, arrivals[0])
			arrivals = arrivals[1:]
		}
		for running.Len() > 0 && !running[0].end.After(now) {
			j := heap.Pop(&running).(simJob)
			j.lease.Release(JobSucceeded)
			completed++
		}
		for len(queue) > 0 && h.f.Available() > 0 {
			l, err := h.f.Acquire(ctx)
			if err != nil {
				b.Fatal(err)
			}
			w := now.Sub(queue[0])
			waits = append(waits, w)
			if w > 120*time.Second {
				waitedLong++
			}
			queue = queue[1:]
			heap.Push(&running, simJob{end: now.Add(2*time.Minute + time.Duration(r.Int64N(int64(8*time.Minute)))), lease: l})
		}
		h.settle()
		next, ok := clk.Next()
		if len(arrivals) > 0 && (!ok || arrivals[0].Before(next)) {
			next, ok = arrivals[0], true
		}
		if running.Len() > 0 && (!ok || running[0].end.Before(next)) {
			next, ok = running[0].end, true
		}
		if !ok || next.After(end) {
			break
		}
		clk.AdvanceTo(next)
		h.settle()
	}
	wall := time.Since(wallStart)
	calls := h.f.api.Calls()
	h.stop()
	total := 0
	for _, n := range calls {
		total += n
	}
	slices.Sort(waits)
	p90 := waits[len(waits)*9/10]
	b.ReportMetric(float64(total)/float64(completed), "calls/job")
	b.ReportMetric(float64(completed), "jobs")
	b.Logf("simulated day: %d jobs completed, %d started, wall %v; provider calls %v = %d, %.3f per completed job "+
		"(create %.3f, delete %.3f, list %.3f, connect_info %.3f); wait p90 %v, over 120 s: %d (%.2f%%)",
		completed, len(waits), wall.Round(time.Millisecond), calls, total, float64(total)/float64(completed),
		float64(calls[OpCreate])/float64(completed), float64(calls[OpDelete])/float64(completed),
		float64(calls[OpList])/float64(completed), float64(calls[OpConnectInfo])/float64(completed),
		p90, waitedLong, 100*float64(waitedLong)/float64(len(waits)))
}
