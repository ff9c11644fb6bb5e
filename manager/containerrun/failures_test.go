package containerrun_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/containerrun"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
	"github.com/mayfly-ci/mayfly/manager/stagerun"
)

// TestPrepareFailures: what the runner's settings refuse and what cannot
// be pulled fail the job with gitlab-runner's reasons and messages, and a
// new runner reads the same failure again.
func TestPrepareFailures(t *testing.T) {
	e := newEnv(t)
	e.push(t, busybox(t), "mayfly/busybox:test")
	tests := []struct {
		name     string
		image    string
		services []runnerapi.Image
		docker   func(*configDocker)
		reason   string // after Decide, with GitLab's own list of reasons
		message  string
		trace    string
	}{
		{"missing image", "$CI_REGISTRY/mayfly/absent:test", nil, nil, runnerapi.FailureScriptFailure,
			`failed to pull image "` + "REG" + `/mayfly/absent:test" with specified policies [always]`, "Pulling docker image REG/mayfly/absent:test ..."},
		{"pull policy never", "$CI_REGISTRY/mayfly/busybox:never", nil, func(d *configDocker) { d.PullPolicy = []string{"never"} },
			runnerapi.FailureScriptFailure, "not found locally", "Using effective pull policy of [never]"},
		{"not allowed", "$CI_REGISTRY/mayfly/busybox:test", nil, func(d *configDocker) { d.AllowedImages = []string{"registry.example.com/**"} },
			runnerapi.FailureScriptFailure, "disallowed image", `The "REG/mayfly/busybox:test" image is not present on list of allowed images:`},
		{"too many services", "$CI_REGISTRY/mayfly/busybox:test", []runnerapi.Image{{Name: "a"}, {Name: "b"}}, func(d *configDocker) { d.ServicesLimit = 1 },
			runnerapi.FailureScriptFailure, "too many services requested: 2, only 1 allowed", "Using Docker executor"},
		{"unreachable registry", "127.0.0.1:1/mayfly/busybox:test", nil, nil, runnerapi.FailureRunnerSystemFailure,
			"connection refused", "Pulling docker image 127.0.0.1:1/mayfly/busybox:test"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			job := payload(e, tt.image, []string{"echo should not run"}, nil, tt.services...)
			d := dockerConfig()
			if tt.docker != nil {
				tt.docker(&d)
			}
			plan := generate(t, e, job)
			r := e.newRunner(t, containerrun.Options{Job: job, Docker: d})
			var trace bytes.Buffer
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			res := plan.Run(ctx, r, &trace, buildscript.RunOptions{})
			reg := func(s string) string { return strings.ReplaceAll(s, "REG", e.registry) }
			if res.State != runnerapi.StateFailed || res.FailureReason != tt.reason || !strings.Contains(res.Message, reg(tt.message)) {
				t.Errorf("result %s %s %q, want failed %s with %q\n%s", res.State, res.FailureReason, res.Message, tt.reason, reg(tt.message), trace.String())
			}
			if !strings.Contains(trace.String(), reg(tt.trace)) || strings.Contains(trace.String(), "should not run\n") {
				t.Errorf("trace lacks %q or ran the script:\n%s", reg(tt.trace), trace.String())
			}
			// A new runner (a restarted manager) reads the same failure.
			r2 := e.newRunner(t, containerrun.Options{Job: job, Docker: d})
			var again bytes.Buffer
			_, err := r2.Run(ctx, stagerun.Stage{ID: stagerun.StageID(0, string(buildscript.StagePrepare), 1)}, &again)
			var f *stagerun.Failure
			if !errors.As(err, &f) || !strings.Contains(trace.String(), again.String()) || again.Len() == 0 {
				t.Errorf("read again: %v, output %q", err, again.String())
			}
		})
	}
}

// TestStopAndReattach: a stage goes on when its Run's context ends, a new
// Run attaches from the offset its caller reached, and Stop ends it with
// SIGTERM within the grace period.
func TestStopAndReattach(t *testing.T) {
	e := newEnv(t)
	e.push(t, busybox(t), "mayfly/busybox:test")
	job := payload(e, "$CI_REGISTRY/mayfly/busybox:test", []string{"echo started", "sleep 2", "echo still here", "sleep 600"}, nil)
	plan := generate(t, e, job)
	r := e.newRunner(t, containerrun.Options{Job: job, Docker: dockerConfig()})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// prepare_script and get_sources first.
	var step int
	for i, st := range plan.Stages {
		if st.Name == buildscript.StageStepScript {
			step = i
			break
		}
		var out bytes.Buffer
		if code, err := r.Run(ctx, stagerun.Stage{ID: stagerun.StageID(i, string(st.Name), 1), Script: st.Script}, &out); err != nil || code != 0 {
			t.Fatalf("%s: %d %v\n%s", st.Name, code, err, out.String())
		}
	}
	s := stagerun.Stage{ID: stagerun.StageID(step, string(buildscript.StageStepScript), 1), Script: plan.Stages[step].Script}
	first := &waitWriter{want: "started\n", seen: make(chan struct{})}
	rctx, rcancel := context.WithCancel(ctx)
	go func() { <-first.seen; rcancel() }()
	if code, err := r.Run(rctx, s, first); err == nil || !errors.Is(err, context.Canceled) {
		t.Fatalf("Run with an ended context: %d %v, want context.Canceled; output %q", code, err, first.String())
	}
	seen := first.String()
	// Another runner, as a restarted manager, attaches from where the
	// first stopped reading.
	r2 := e.newRunner(t, containerrun.Options{Job: job, Docker: dockerConfig()})
	s.From = int64(len(seen))
	rest := &waitWriter{want: "still here\n", seen: make(chan struct{})}
	done := make(chan struct{})
	var code int
	var runErr error
	go func() { defer close(done); code, runErr = r2.Run(ctx, s, rest) }()
	select {
	case <-rest.seen:
	case <-time.After(time.Minute):
		t.Fatalf("no more output after reattaching: %q", rest.String())
	}
	stopStart := time.Now()
	if err := r2.Stop(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	<-done
	t.Logf("Stop took %s", time.Since(stopStart).Round(time.Millisecond))
	if runErr != nil || code != 143 {
		t.Errorf("the stopped stage: exit %d, %v; want 143 (SIGTERM through docker-init)", code, runErr)
	}
	if whole := seen + rest.String(); !strings.Contains(whole, "started\n") || !strings.HasSuffix(whole, "still here\n\x1b[32;1m$ sleep 600\x1b[0;m\n") || strings.Count(whole, "\nstarted\n") != 1 {
		t.Errorf("output across the two Runs: %q", whole)
	}
}

// configDocker is config.Docker (named here for the table above).
type configDocker = dockerCfg

// waitWriter closes seen once want was written.
type waitWriter struct {
	mu   sync.Mutex
	b    bytes.Buffer
	want string
	seen chan struct{}
	once sync.Once
}

func (w *waitWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.b.Write(p)
	if strings.Contains(w.b.String(), w.want) {
		w.once.Do(func() { close(w.seen) })
	}
	return len(p), nil
}

func (w *waitWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// TestNoDockerEngine: a VM whose Docker Engine cannot be reached (none
// runs, or its SSH server cannot forward the socket, as dropbear) fails the
// job as gitlab-runner does, as a runner system failure naming the socket.
func TestNoDockerEngine(t *testing.T) {
	e := newEnv(t)
	job := payload(e, "$CI_REGISTRY/mayfly/busybox:test", []string{"echo never"}, nil)
	c, err := containerrun.NewClient(e.ssh.DialContext, "unix:///run/no-docker-here.sock")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	d := dockerConfig()
	d.Host = "unix:///run/no-docker-here.sock"
	r, err := containerrun.New(containerrun.Options{Job: job, Docker: d, BuildsDir: e.builds, Client: c,
		Shell: &stagerun.Attached{Exec: e.ssh, Shell: "bash"}})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(context.Background(), false)
	plan := generate(t, e, job)
	var trace bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res := plan.Run(ctx, r, &trace, buildscript.RunOptions{})
	want := "Cannot connect to the Docker daemon at unix:///run/no-docker-here.sock on the VM. Is the docker daemon running?"
	if res.FailureReason != runnerapi.FailureRunnerSystemFailure || !strings.Contains(res.Message, want) {
		t.Errorf("result %s %s %q, want runner_system_failure with %q", res.State, res.FailureReason, res.Message, want)
	}
}
