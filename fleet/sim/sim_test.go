package sim

import (
	"math"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/fleet"
	"github.com/mayfly-ci/mayfly/schedule"
)

func at(sec int64) time.Time { return time.Unix(sec, 0).UTC() }

// smallCase: three jobs of 100 s arrive together at t=1000; the pool of two
// is ready beforehand (boot 30 s fixed, warmup 60 s, check every 10 s).
func smallCase(policy string, pol schedule.Policy) Options {
	jobs := []Job{
		{Arrival: at(1000), Duration: 100 * time.Second},
		{Arrival: at(1000), Duration: 100 * time.Second},
		{Arrival: at(1000), Duration: 100 * time.Second},
	}
	return Options{
		Policy:   policy,
		Jobs:     jobs,
		Schedule: schedule.Schedule{Default: pol},
		Provider: Provider{Boot: Boot{Kind: "fixed", Median: 30 * time.Second}},
		Warmup:   60 * time.Second,
		Limits:   fleet.Limits{MaxUses: 1, CheckInterval: 10 * time.Second},
	}
}

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

func TestHandComputed(t *testing.T) {
	dm := schedule.Policy{Style: schedule.DockerMachine, IdleCount: 2, IdleTime: time.Hour}
	ts := schedule.Policy{Style: schedule.Taskscaler, IdleCount: 2, IdleTime: time.Hour, PreemptiveMode: true}
	ts0 := schedule.Policy{Style: schedule.Taskscaler, IdleTime: time.Hour}
	dm0 := schedule.Policy{Style: schedule.DockerMachine, IdleTime: time.Hour}
	h := func(s float64) float64 { return s / 3600 }
	tests := []struct {
		name                   string
		policy                 string
		pol                    schedule.Policy
		p50, p90, p99          float64
		boot, idle, busy       float64 // VM-seconds
		calls, peak, maxTarget int
	}{
		// Two jobs take the warm VMs at 1000; each pickup re-runs the tick
		// and creates a replacement (ready 1030); the third job waits for
		// the 1030 tick (30 s). A fifth VM is created at 1030 and idles.
		// VM-seconds: boot 5×30; idle 2×30 (first pool) + 100 + 70; busy 3×100.
		// Calls: 5 creates + 3 removals.
		{"docker-machine", PolicyDockerMachine, dm, 0, 30, 30, 150, 230, 300, 8, 5, 0},
		// Same timeline; creates are batched (2, 2, 1: 3 Increase calls),
		// 3 Decrease calls, and the list is polled every 2 s during the 90 s
		// with instances creating (45) and every minute otherwise (100 s: 1).
		{"taskscaler", PolicyTaskscaler, ts, 0, 30, 30, 150, 230, 300, 3 + 3 + 45 + 1, 5, 0},
		// The runtime fleet (OnDemandWithin 0: docker+machine's refusal)
		// lists at start (940) and every minute (1000, 1060, 1120); a
		// Create call waits 1 s for company, so the pool is created at 941
		// (ready 971). At 1000 two jobs take it; the third is refused
		// until the replacements made at 1001 are ready (1031), and is
		// taken at the 1040 poll; its replacement is made at 1041 (ready
		// 1071). The VMs of the jobs ending at 1100 go in one Delete call
		// at 1105; the run ends with the last job, at 1140.
		// VM-seconds: boot 5×30; idle 2×29 + 9 + 109 + 69; busy 3×100.
		// Calls: 3 creates + 1 delete + 4 lists.
		{"mayfly", PolicyMayfly, dm, 0, 40, 40, 150, 245, 300, 3 + 1 + 4, 5, 2},
		// IdleCount 0: every job is requested at once and waits for its own
		// VM (30 s); nothing idles. Calls: 3 creates + 3 removals.
		{"docker-machine on demand", PolicyDockerMachine, dm0, 30, 30, 30, 90, 0, 300, 6, 3, 0},
		// Non-preemptive taskscaler: the jobs are accepted and wait for
		// one Increase(3); 1 create + 3 Decrease + 15 + 2 lists
		// (span 940..1130: 30 s creating, 160 s not).
		{"taskscaler on demand", PolicyTaskscaler, ts0, 30, 30, 30, 90, 0, 300, 1 + 3 + 15 + 2, 3, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := Run(smallCase(tt.policy, tt.pol))
			if err != nil {
				t.Fatal(err)
			}
			if r.Started != 3 || r.LatencyP50 != tt.p50 || r.LatencyP90 != tt.p90 || r.LatencyP99 != tt.p99 {
				t.Errorf("started %d, latency p50/p90/p99 = %v/%v/%v, want 3, %v/%v/%v", r.Started, r.LatencyP50, r.LatencyP90, r.LatencyP99, tt.p50, tt.p90, tt.p99)
			}
			if !near(r.BootVMHours, h(tt.boot)) || !near(r.IdleVMHours, h(tt.idle)) || !near(r.BusyVMHours, h(tt.busy)) {
				t.Errorf("VM-seconds boot/idle/busy = %v/%v/%v, want %v/%v/%v",
					r.BootVMHours*3600, r.IdleVMHours*3600, r.BusyVMHours*3600, tt.boot, tt.idle, tt.busy)
			}
			if r.APICalls != tt.calls || r.PeakInstances != tt.peak || r.MaxIdleTarget != tt.maxTarget {
				t.Errorf("calls %d, peak %d, max target %d; want %d, %d, %d", r.APICalls, r.PeakInstances, r.MaxIdleTarget, tt.calls, tt.peak, tt.maxTarget)
			}
			if r.WithinSLO != 1 {
				t.Errorf("within SLO = %v, want 1", r.WithinSLO)
			}
		})
	}
}

// TestDockerMachineIdleTime checks the sweep: when a period with a larger
// IdleCount ends, the surplus is removed once past IdleTime (strict >),
// the oldest machines kept.
func TestDockerMachineIdleTime(t *testing.T) {
	// Minutes 0-15 of hour 0 (unix 0..959): IdleCount 3; afterwards 1.
	per, err := schedule.ParsePeriod("* 0-15 0 * * * *", time.UTC)
	if err != nil {
		t.Fatal(err)
	}
	o := smallCase(PolicyDockerMachine, schedule.Policy{IdleCount: 1, IdleTime: 50 * time.Second})
	o.Schedule.Entries = []schedule.Entry{{Periods: []schedule.Period{per}, Policy: schedule.Policy{IdleCount: 3, IdleTime: 50 * time.Second}}}
	o.Jobs = []Job{{Arrival: at(1000), Duration: 10 * time.Second}, {Arrival: at(1100), Duration: 10 * time.Second}}
	r, err := Run(o)
	if err != nil {
		t.Fatal(err)
	}
	// 940: three created (ready 970). 1000: the job takes the newest (VM3,
	// removed at 1010). 1020: idle for 50 s, not yet over. 1030: VM1 is
	// kept (prefix Available 0 < 1), VM2 removed. 1100: the job takes VM1
	// and VM4 is created; the run ends at 1110.
	// Idle: VM1 130 + VM2 60 + VM3 30; boot 3×30 + 10; busy 2×10.
	// Calls: 4 creates + 3 removals.
	if r.LatencyP99 != 0 || !near(r.IdleVMHours*3600, 220) || !near(r.BootVMHours*3600, 100) || !near(r.BusyVMHours*3600, 20) || r.APICalls != 7 {
		t.Errorf("idle %v s, boot %v s, busy %v s, calls %d, p99 %v; want 220, 100, 20, 7, 0",
			r.IdleVMHours*3600, r.BootVMHours*3600, r.BusyVMHours*3600, r.APICalls, r.LatencyP99)
	}
}

func TestOracleLatencyZero(t *testing.T) {
	o := smallCase(PolicyOracle, schedule.Policy{})
	r, err := Run(o)
	if err != nil {
		t.Fatal(err)
	}
	if r.LatencyP50 != 0 || r.LatencyP99 != 0 || r.LatencyMax != 0 || r.WithinSLO != 1 || r.IdleVMHours != 0 {
		t.Errorf("oracle: %+v", r)
	}
	if !near(r.TotalVMHours*3600, 3*(30+100)) || r.PeakInstances != 3 || r.APICallsPerJob != 2 {
		t.Errorf("oracle VM-seconds %v peak %d calls/job %v", r.TotalVMHours*3600, r.PeakInstances, r.APICallsPerJob)
	}
}

// poissonJobs is a deterministic steady load for property tests.
func poissonJobs(n int, meanGap time.Duration, dur time.Duration) []Job {
	jobs := make([]Job, n)
	t := at(100000)
	for i := range jobs {
		// A fixed pseudo-random sequence (LCG) keeps the test self-contained.
		g := time.Duration((i*7919)%13+1) * meanGap / 7
		t = t.Add(g)
		if i%50 == 0 {
			g = 0 // a few bursts
		}
		jobs[i] = Job{Arrival: t, Duration: dur + time.Duration(i%17)*time.Second}
	}
	return jobs
}

func TestPredictiveCeiling(t *testing.T) {
	for _, ceiling := range []int{1, 3, 8} {
		o := Options{
			Policy:     PolicyPredictive,
			Jobs:       poissonJobs(1500, 2*time.Second, 5*time.Minute),
			Schedule:   schedule.Schedule{Default: schedule.Policy{IdleCount: ceiling, IdleTime: 10 * time.Minute}},
			Provider:   Provider{Boot: Boot{Kind: "lognormal", Median: 45 * time.Second, Sigma: 0.3}, Seed: 3},
			SeriesStep: 5 * time.Second,
		}
		r, err := Run(o)
		if err != nil {
			t.Fatal(err)
		}
		if r.MaxIdleTarget > ceiling || r.MaxIdleTarget < 1 {
			t.Errorf("ceiling %d: max idle target %d", ceiling, r.MaxIdleTarget)
		}
		// Jobs taken on demand get VMs of their own beyond the ceiling;
		// the idle ones never pass it.
		for _, s := range r.Series {
			if s.Idle > ceiling {
				t.Fatalf("ceiling %d: at %s idle %d", ceiling, s.Time, s.Idle)
			}
		}
	}
}

func TestPredictiveSizesFromRate(t *testing.T) {
	// 0.5 jobs/s, 45 s boots: about 24 expected per lead time.
	o := Options{
		Policy:   PolicyPredictive,
		Jobs:     poissonJobs(1500, 2*time.Second, time.Minute),
		Schedule: schedule.Schedule{Default: schedule.Policy{IdleCount: 1000, IdleTime: 10 * time.Minute}},
		Provider: Provider{Boot: Boot{Kind: "fixed", Median: 45 * time.Second}},
	}
	r, err := Run(o)
	if err != nil {
		t.Fatal(err)
	}
	if r.MaxIdleTarget < 20 || r.MaxIdleTarget > 200 {
		t.Errorf("max idle target %d, want about the ~23 expected per lead time (well below the 1000 ceiling)", r.MaxIdleTarget)
	}
	if r.WithinSLO < 0.9 {
		t.Errorf("within SLO %v", r.WithinSLO)
	}
}

// sameRun reports whether two reports of one simulation agree: exactly,
// but for the VM-hours and API calls of the runtime fleet's policies,
// within 0.1 % and 1 %. Its calls wait for the API budget in goroutines,
// and two waiting at one instant may go in either order: a Delete a second
// later bills a second more, and may then go in its own call rather than
// in a batch (seen: 167 or 168 deletes of 380 calls, under -race).
func sameRun(a, b Report) bool {
	if a.Policy != PolicyMayfly && a.Policy != PolicyPredictive {
		return reflect.DeepEqual(a, b)
	}
	close := func(x, y float64) bool { return math.Abs(x-y) <= 1e-3*max(math.Abs(x), math.Abs(y)) }
	if !close(a.IdleVMHours, b.IdleVMHours) || !close(a.BootVMHours, b.BootVMHours) || !close(a.BusyVMHours, b.BusyVMHours) ||
		!close(a.DeletingVMHours, b.DeletingVMHours) || !close(a.TotalVMHours, b.TotalVMHours) {
		return false
	}
	a.IdleVMHours, a.BootVMHours, a.BusyVMHours, a.DeletingVMHours, a.TotalVMHours = b.IdleVMHours, b.BootVMHours, b.BusyVMHours, b.DeletingVMHours, b.TotalVMHours
	calls := func(x, y int) bool { return math.Abs(float64(x-y)) <= max(1, 0.01*float64(max(x, y))) }
	if !calls(a.APICalls, b.APICalls) || len(a.APICallsByCall) != len(b.APICallsByCall) {
		return false
	}
	for op, n := range a.APICallsByCall {
		if !calls(n, b.APICallsByCall[op]) {
			return false
		}
	}
	a.APICalls, a.APICallsPerJob, a.APICallsByCall = b.APICalls, b.APICallsPerJob, b.APICallsByCall
	return reflect.DeepEqual(a, b)
}

func TestDeterminism(t *testing.T) {
	for _, p := range Policies {
		o := Options{
			Policy:   p,
			Jobs:     poissonJobs(800, 3*time.Second, 2*time.Minute),
			Schedule: schedule.Schedule{Default: schedule.Policy{IdleCount: 5, IdleTime: 5 * time.Minute}},
			Provider: Provider{Boot: Boot{Kind: "lognormal", Median: 45 * time.Second, Sigma: 0.5}, FailureRate: 0.1, DeleteTime: 20 * time.Second, APIRate: 2, APIBurst: 5, Seed: 42},
		}
		a, err := Run(o)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := Run(o)
		if !sameRun(a, b) {
			t.Errorf("%s: two runs with one seed differ:\n%+v\n%+v", p, a, b)
		}
		if p == PolicyOracle {
			continue
		}
		if a.BootFailures == 0 {
			t.Errorf("%s: no boot failures at rate 0.1", p)
		}
		o.Provider.Seed = 43
		c, _ := Run(o)
		if reflect.DeepEqual(a, c) {
			t.Errorf("%s: seeds 42 and 43 give identical reports", p)
		}
	}
}

func TestAPIRateLimitDelaysCreation(t *testing.T) {
	o := smallCase(PolicyDockerMachine, schedule.Policy{IdleCount: 2, IdleTime: time.Hour})
	o.Provider.APIRate = 0.02 // one call per 50 s
	o.Provider.APIBurst = 1
	r, err := Run(o)
	if err != nil {
		t.Fatal(err)
	}
	free, _ := Run(smallCase(PolicyDockerMachine, schedule.Policy{IdleCount: 2, IdleTime: time.Hour}))
	if r.LatencyP99 <= free.LatencyP99 {
		t.Errorf("rate-limited p99 %v not above unlimited %v", r.LatencyP99, free.LatencyP99)
	}
}

func TestBucket(t *testing.T) {
	b := newBucket(1, 2)
	got := []time.Time{b.take(at(0)), b.take(at(0)), b.take(at(0)), b.take(at(10))}
	want := []time.Time{at(0), at(0), at(1), at(10)}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("bucket = %v, want %v", got, want)
	}
}

func TestOptionErrors(t *testing.T) {
	base := smallCase(PolicyMayfly, schedule.Policy{IdleCount: 1})
	tests := []struct {
		name string
		mod  func(*Options)
		want string
	}{
		{"policy", func(o *Options) { o.Policy = "nope" }, "policy"},
		{"no jobs", func(o *Options) { o.Jobs = nil }, "no jobs"},
		{"unsorted", func(o *Options) { o.Jobs = []Job{{Arrival: at(2)}, {Arrival: at(1)}} }, "sorted"},
		{"boot kind", func(o *Options) { o.Provider.Boot.Kind = "weibull" }, "boot kind"},
		{"failure", func(o *Options) { o.Provider.FailureRate = 1 }, "failure rate"},
		{"quantile", func(o *Options) { o.Predictive.Quantile = 1.5 }, "quantile"},
		{"max uses", func(o *Options) { o.MaxUses = -1 }, "MaxUses"},
	}
	for _, tt := range tests {
		o := base
		tt.mod(&o)
		if _, err := Run(o); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: err = %v, want it to mention %q", tt.name, err, tt.want)
		}
	}
}

func TestReadTrace(t *testing.T) {
	jobs, err := ReadTrace(strings.NewReader("arrival,duration,os\n# comment\n20,5\n10,2.5,windows\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := []Job{{Arrival: at(10), Duration: 2500 * time.Millisecond, OS: "windows"}, {Arrival: at(20), Duration: 5 * time.Second, OS: "linux"}}
	if !reflect.DeepEqual(jobs, want) {
		t.Errorf("got %+v, want %+v", jobs, want)
	}
	for in, msg := range map[string]string{
		"x,5\n":       "line 1: arrival",
		"1,5\n2,-1\n": "line 2: duration",
		"1,5,bsd\n":   "line 1: os",
		"1\n":         "want 2 or 3 fields",
		"":            "no jobs",
	} {
		if _, err := ReadTrace(strings.NewReader(in)); err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("%q: err = %v, want %q", in, err, msg)
		}
	}
	var sb strings.Builder
	if err := WriteTrace(&sb, want); err != nil {
		t.Fatal(err)
	}
	if sb.String() != "arrival,duration,os\n10,3,windows\n20,5\n" {
		t.Errorf("WriteTrace = %q", sb.String())
	}
}

// TestOnDemandHandComputed: three jobs arrive at t=1000 s; the runner polls
// every 10 s (ticks at 940, 950, ... 1000); boots take 30 s.
func TestOnDemandHandComputed(t *testing.T) {
	for _, tt := range []struct {
		name     string
		idle     int
		window   time.Duration
		wantLat  []float64 // p50, p90, max
		onDemand int
	}{
		// IdleCount 0: every job is taken on demand and waits one boot
		// and the 0.1 s the Create call waits for company while jobs wait
		// (the 1 s CreateBatchWindow is for the idle pool).
		{"IdleCount 0", 0, 0, []float64{30.1, 30.1, 30.1}, 3},
		// One idle VM (ready at 971) takes the first job; the other two are
		// taken at once for VMs created at 1000.1 and ready at 1030.1.
		{"pool of 1, window 90s", 1, 90 * time.Second, []float64{30.1, 30.1, 30.1}, 2},
		// A 20 s window is shorter than a boot: the jobs are taken all the
		// same, for new VMs, since nothing stops one being created (issue
		// 15: no runaway queue).
		{"pool of 1, window 20s", 1, 20 * time.Second, []float64{30.1, 30.1, 30.1}, 2},
	} {
		t.Run(tt.name, func(t *testing.T) {
			o := smallCase(PolicyMayfly, schedule.Policy{IdleCount: tt.idle, IdleTime: time.Hour})
			o.OnDemandWithin = tt.window
			r, err := Run(o)
			if err != nil {
				t.Fatal(err)
			}
			got := []float64{r.LatencyP50, r.LatencyP90, r.LatencyMax}
			if !slices.Equal(got, tt.wantLat) || r.OnDemandJobs != tt.onDemand || r.Started != 3 {
				t.Errorf("latency p50/p90/max %v, on demand %d, started %d; want %v, %d, 3", got, r.OnDemandJobs, r.Started, tt.wantLat, tt.onDemand)
			}
			if tt.idle == 0 && r.IdleVMHours != 0 {
				t.Errorf("IdleCount 0 on demand left %v idle VM-hours", r.IdleVMHours)
			}
		})
	}
}

// TestOracleWaitsForThePoll: the oracle's jobs start at the runner's next
// poll, the same tick grid the other policies use.
func TestOracleWaitsForThePoll(t *testing.T) {
	o := smallCase(PolicyOracle, schedule.Policy{})
	o.Jobs = []Job{
		{Arrival: at(1000), Duration: time.Minute}, // on a tick
		{Arrival: at(1003), Duration: time.Minute}, // 7 s before the next
		{Arrival: at(1009), Duration: time.Minute}, // 1 s before the next
	}
	r, err := Run(o)
	if err != nil {
		t.Fatal(err)
	}
	if r.LatencyP50 != 1 || r.LatencyMax != 7 || r.IdleVMHours != 0 {
		t.Errorf("oracle p50 %v max %v idle %v; want 1, 7, 0", r.LatencyP50, r.LatencyMax, r.IdleVMHours)
	}
}

// TestNoRunawayQueueWindows is issue 15's runaway: a Windows fleet (boots
// of about 300 s, longer than the 90 s on-demand window) with IdleCount 5
// on the first two days of the weekly Windows trace. The mayfly fleet takes
// a job whenever it could create a VM for it, so at least 90 % of the jobs
// start within one boot time plus 120 s; docker+machine, which asks for a
// job only with a free VM, lets the queue run away, and so does mayfly
// told to refuse as docker+machine does (OnDemandWithin 0).
func TestNoRunawayQueueWindows(t *testing.T) {
	jobs := loadTrace(t, "weekly-windows.csv")
	jobs = window(jobs, jobs[0].Arrival, jobs[0].Arrival.Add(48*time.Hour))
	boot := DefaultProvider("windows").Boot.Median
	for _, tt := range []struct {
		name     string
		policy   string
		onDemand time.Duration
		runaway  bool
	}{
		{"mayfly", PolicyMayfly, 90 * time.Second, false},
		{"mayfly refusing as docker+machine", PolicyMayfly, 0, true},
		{"docker-machine", PolicyDockerMachine, 0, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			o := Options{
				Policy:   tt.policy,
				Trace:    "weekly-windows.csv",
				Jobs:     jobs,
				Schedule: schedule.Schedule{Default: schedule.Policy{IdleCount: 5, IdleTime: 10 * time.Minute}},
				Limits:   fleet.Limits{MaxUses: 1, MaxGrowthRate: 100, OnDemandWithin: tt.onDemand},
				Provider: DefaultProvider("windows"),
				SLO:      boot + 120*time.Second,
			}
			r, err := Run(o)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: %.1f%% within %s, p90 %.0f s, %d of %d started", tt.name, 100*r.WithinSLO, o.SLO, r.LatencyP90, r.Started, r.Jobs)
			if ran := r.WithinSLO < 0.9; ran != tt.runaway {
				t.Errorf("%.1f%% of jobs within one boot + 120 s (%s); want runaway %v", 100*r.WithinSLO, o.SLO, tt.runaway)
			}
			if r.DeletedUnusedWhileWaiting != 0 {
				t.Errorf("%d VMs deleted unused while jobs waited", r.DeletedUnusedWhileWaiting)
			}
		})
	}
}

// TestAPIBudget is issue 15's API budget in the simulator, with a provider
// that returns connect info with Create (providers.Launcher): on a Linux
// day (the first day of the twotz trace) the runtime fleet makes at most
// 2.2 provider calls per job, under the predictive policy and a flat pool;
// on a Windows day (a fifth of the rate) it lists once per ListInterval
// whatever the number of VMs booting, and batches creations and deletions
// to at most 2 calls per job between them. (A list a minute is 1.2 calls
// per job at that rate by itself: see the issue 15 notes.)
func TestAPIBudget(t *testing.T) {
	for _, tt := range []struct {
		trace, os string
		policy    string
		idle      schedule.Policy
		linux     bool
	}{
		{"twotz.csv", "linux", PolicyPredictive, schedule.Policy{IdleCount: 1000, IdleTime: 10 * time.Minute}, true},
		{"twotz.csv", "linux", PolicyMayfly, schedule.Policy{IdleCount: 10, IdleTime: 10 * time.Minute}, true},
		{"windows-twotz.csv", "windows", PolicyPredictive, schedule.Policy{IdleCount: 1000, IdleTime: 10 * time.Minute}, false},
	} {
		t.Run(tt.trace+"/"+tt.policy, func(t *testing.T) {
			jobs := loadTrace(t, tt.trace)
			jobs = window(jobs, jobs[0].Arrival, jobs[0].Arrival.Add(24*time.Hour))
			o := Options{
				Policy: tt.policy, Jobs: jobs, Schedule: schedule.Schedule{Default: tt.idle},
				Limits:     fleet.Limits{MaxUses: 1, MaxGrowthRate: 100, OnDemandWithin: 90 * time.Second},
				Provider:   DefaultProvider(tt.os),
				Predictive: Predictive{Quantile: 0.92},
			}
			r, err := Run(o)
			if err != nil {
				t.Fatal(err)
			}
			c := r.APICallsByCall
			t.Logf("%d jobs: %.2f calls per job %v; %d VMs created, idle target rises %d, failures %d", r.Jobs, r.APICallsPerJob, c, r.InstancesCreated, r.IdleTargetRises, r.BootFailures)
			if c[fleet.OpConnectInfo] != 0 {
				t.Errorf("%d ConnectInfo calls: the connect info came with Create", c[fleet.OpConnectInfo])
			}
			if tt.linux && r.APICallsPerJob > 2.2 {
				t.Errorf("%.2f provider calls per job, want at most 2.2", r.APICallsPerJob)
			}
			if perJob := float64(c[fleet.OpCreate]+c[fleet.OpDelete]) / float64(r.Jobs); perJob > 2 {
				t.Errorf("%.2f create and delete calls per job, want at most 2", perJob)
			}
			if bound := r.Jobs + r.IdleTargetRises + r.BootFailures; r.InstancesCreated > bound || r.DeletedUnusedWhileWaiting != 0 {
				t.Errorf("%d VMs created, want at most jobs + idle target rises + failures = %d; %d deleted unused while jobs waited (want 0)",
					r.InstancesCreated, bound, r.DeletedUnusedWhileWaiting)
			}
			if lists, most := c[fleet.OpList], int(r.SimulatedHours*60)+2; lists > most {
				t.Errorf("%d lists in %.1f h, want at most one a minute (%d)", lists, r.SimulatedHours, most)
			}
		})
	}
}
