package manager_test

import (
	"context"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager"
	"github.com/mayfly-ci/mayfly/manager/config"
	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/vmexec"
)

// noopFleet hands out instances whose scripts do nothing, so a benchmark
// measures the manager, the API client and the coordinator alone. When hold
// is set, scripts block until it is closed.
type noopFleet struct {
	next    atomic.Int64
	running atomic.Int64
	hold    chan struct{}
}

func (f *noopFleet) Reserve() (manager.Reservation, time.Duration, bool) { return f, 0, true }

func (f *noopFleet) Cancel() {}

func (f *noopFleet) Acquire(context.Context) (manager.Lease, error) {
	return &noopLease{id: fmt.Sprintf("noop-%d", f.next.Add(1)), f: f}, nil
}

type noopLease struct {
	id string
	f  *noopFleet
}

func (l *noopLease) ID() string                                       { return l.id }
func (l *noopLease) Release(bool)                                     {}
func (l *noopLease) Lost() <-chan struct{}                            { return nil }
func (l *noopLease) Connect(context.Context) (vmexec.Executor, error) { return noopExec{l.f}, nil }

type noopExec struct{ f *noopFleet }

func (e noopExec) Run(ctx context.Context, cmd vmexec.Command) (int, error) {
	if e.f.hold != nil {
		e.f.running.Add(1)
		defer e.f.running.Add(-1)
		select {
		case <-e.f.hold:
		case <-ctx.Done():
			return 0, &vmexec.AbortedError{Cause: ctx.Err()}
		}
	}
	return 0, nil
}
func (noopExec) Upload(context.Context, string, []byte, fs.FileMode) error { return nil }
func (noopExec) Close() error                                              { return nil }

// benchEnv is a coordinator with n queued jobs and a manager on a no-op fleet.
func benchEnv(b *testing.B, n, concurrent int, f *noopFleet) (*coordinator.Server, func()) {
	b.Helper()
	srv, err := coordinator.New(coordinator.Config{Logger: slog.New(slog.DiscardHandler), TraceUpdateInterval: time.Second})
	if err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = srv.Serve(ctx, ln) }()
	if _, err := srv.RegisterRunner(coordinator.RunnerOptions{RegistrationToken: srv.RegistrationToken(), RunUntagged: true, Token: runnerToken}); err != nil {
		b.Fatal(err)
	}
	jobs := make([]coordinator.JobSpec, n)
	for i := range jobs {
		jobs[i] = coordinator.JobSpec{Name: fmt.Sprintf("j%d", i), Script: []string{"true"}}
	}
	if _, err := srv.Apply(&coordinator.PipelineFile{Projects: []coordinator.ProjectSpec{{
		Name:      "bench",
		Pipelines: []coordinator.PipelineSpec{{Variables: []coordinator.VariableSpec{{Key: "GIT_STRATEGY", Value: "none"}}, Jobs: jobs}},
	}}}); err != nil {
		b.Fatal(err)
	}
	m, err := manager.New(manager.Options{
		Config: &config.Config{Concurrent: concurrent, CheckInterval: 10 * time.Millisecond, Runners: []config.Runner{{
			Name: "bench", URL: "http://" + ln.Addr().String(), Token: runnerToken, RequestConcurrency: 4,
			OutputLimitKB: 4096, Executor: "instance", Shell: "sh", BuildsDir: "/builds", MaxJobTimeout: time.Hour,
			Fleet: config.Fleet{Connector: config.Connector{OS: "linux", Arch: "amd64"}},
		}}},
		Fleets:        map[string]manager.Fleet{"bench": f},
		Logger:        slog.New(slog.DiscardHandler),
		TraceInterval: 50 * time.Millisecond,
	})
	if err != nil {
		b.Fatal(err)
	}
	wg.Add(1)
	go func() { defer wg.Done(); _ = m.Run(ctx) }()
	return srv, func() { m.Drain(); cancel(); wg.Wait() }
}

// BenchmarkJobThroughput runs jobs through request → trace → final update
// with scripts that do nothing: the coordinator, the API client and the
// manager together.
func BenchmarkJobThroughput(b *testing.B) {
	f := &noopFleet{}
	start := time.Now()
	srv, stop := benchEnv(b, b.N, 16, f)
	defer stop()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if err := srv.WaitAllFinished(ctx); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "jobs/s")
	for _, j := range srv.Jobs() {
		if j.Status != "success" {
			b.Fatalf("job %s: %s %s", j.Name, j.Status, j.FailureReason)
		}
	}
}

// BenchmarkMemoryPerRunningJob holds 200 jobs running at once and reports
// the manager's (and coordinator's) heap per running job.
func BenchmarkMemoryPerRunningJob(b *testing.B) {
	const running = 200
	for i := 0; i < b.N; i++ {
		runtime.GC()
		var before runtime.MemStats
		runtime.ReadMemStats(&before)
		f := &noopFleet{hold: make(chan struct{})}
		srv, stop := benchEnv(b, running, running, f)
		deadline := time.Now().Add(2 * time.Minute)
		for f.running.Load() < running {
			if time.Now().After(deadline) {
				b.Fatalf("only %d of %d jobs running", f.running.Load(), running)
			}
			time.Sleep(10 * time.Millisecond)
		}
		runtime.GC()
		var during runtime.MemStats
		runtime.ReadMemStats(&during)
		b.ReportMetric(float64(during.HeapAlloc-before.HeapAlloc)/running, "heap-B/running-job")
		close(f.hold)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		if err := srv.WaitAllFinished(ctx); err != nil {
			b.Fatal(err)
		}
		cancel()
		stop()
	}
}
