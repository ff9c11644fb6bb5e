package manager_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mayfly-ci/mayfly/manager"
	"github.com/mayfly-ci/mayfly/manager/config"
	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/manager/localfleet"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

const runnerToken = "manager-test-token"

// env is a coordinator, a local fleet and a manager running against them.
type env struct {
	t     *testing.T
	srv   *coordinator.Server
	fleet *localfleet.Fleet
	m     *manager.Manager
	reg   *prometheus.Registry
	stop  context.CancelFunc
	done  chan struct{}
	opts  manager.Options
}

// newEnv starts everything; edit may change the runner's config first.
func newEnv(t *testing.T, jobs []coordinator.JobSpec, edit func(*config.Runner), faults ...coordinator.Fault) *env {
	t.Helper()
	return newEnvFleet(t, jobs, edit, nil, faults...)
}

// newEnvFleet is newEnv with the manager's fleet made by wrap from the
// local fleet (nil: the local fleet itself).
func newEnvFleet(t *testing.T, jobs []coordinator.JobSpec, edit func(*config.Runner), wrap func(*localfleet.Fleet) manager.Fleet, faults ...coordinator.Fault) *env {
	t.Helper()
	return newEnvConfig(t, jobs, nil, nil, edit, wrap, faults...)
}

// newEnvConfig is newEnvFleet with the manager's whole config edited by
// editCfg (nil: concurrent 4, check_interval 20ms).
func newEnvConfig(t *testing.T, jobs []coordinator.JobSpec, editCfg func(*config.Config), editOpts func(*manager.Options), edit func(*config.Runner), wrap func(*localfleet.Fleet) manager.Fleet, faults ...coordinator.Fault) *env {
	t.Helper()
	srv, err := coordinator.New(coordinator.Config{Logger: slog.New(slog.DiscardHandler), TraceUpdateInterval: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srvCtx, stopSrv := context.WithCancel(context.Background())
	srvDone := make(chan struct{})
	go func() { defer close(srvDone); _ = srv.Serve(srvCtx, ln) }()
	t.Cleanup(func() { stopSrv(); <-srvDone })

	if _, err := srv.RegisterRunner(coordinator.RunnerOptions{RegistrationToken: srv.RegistrationToken(), RunUntagged: true, Token: runnerToken}); err != nil {
		t.Fatal(err)
	}
	if len(jobs) > 0 {
		if _, err := srv.Apply(&coordinator.PipelineFile{Projects: []coordinator.ProjectSpec{{
			Name:      "app",
			Pipelines: []coordinator.PipelineSpec{{Variables: []coordinator.VariableSpec{{Key: "GIT_STRATEGY", Value: "none"}}, Jobs: jobs}},
		}}}); err != nil {
			t.Fatal(err)
		}
	}

	for _, f := range faults {
		if err := srv.InjectFault(f); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	fleet := localfleet.New(filepath.Join(dir, "vms"), 2)
	t.Cleanup(fleet.Close)
	rc := config.Runner{
		Name:               "local",
		URL:                "http://" + ln.Addr().String(),
		Token:              runnerToken,
		RequestConcurrency: 1,
		OutputLimitKB:      4096,
		Executor:           "instance",
		Shell:              "bash",
		BuildsDir:          filepath.Join(dir, "builds"),
		MaxJobTimeout:      time.Hour,
		Fleet:              config.Fleet{Connector: config.Connector{OS: "linux", Arch: "amd64"}},
	}
	if edit != nil {
		edit(&rc)
	}
	reg := prometheus.NewRegistry()
	var mf manager.Fleet = fleet
	if wrap != nil {
		mf = wrap(fleet)
	}
	cfg := &config.Config{Concurrent: 4, CheckInterval: 20 * time.Millisecond, Runners: []config.Runner{rc}}
	if editCfg != nil {
		editCfg(cfg)
	}
	opts := manager.Options{
		Config:        cfg,
		Fleets:        map[string]manager.Fleet{"local": mf},
		Registerer:    reg,
		Logger:        testLogger(),
		TraceInterval: 50 * time.Millisecond,
	}
	if editOpts != nil {
		editOpts(&opts)
	}
	m, err := manager.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	e := &env{t: t, srv: srv, fleet: fleet, m: m, reg: reg, stop: cancel, done: make(chan struct{}), opts: opts}
	go func() { defer close(e.done); _ = m.Run(ctx) }()
	t.Cleanup(e.shutdown)
	return e
}

// restart stops the manager without a word (hand-over) and starts a new
// one with the same options, fleet, coordinator and state directory.
func (e *env) restart() {
	e.t.Helper()
	e.m.HandOver()
	select {
	case <-e.done:
	case <-time.After(30 * time.Second):
		e.t.Fatal("the manager did not return after HandOver")
	}
	e.stop()
	opts := e.opts
	e.reg = prometheus.NewRegistry()
	opts.Registerer = e.reg
	m, err := manager.New(opts)
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	e.m, e.stop, e.done = m, cancel, make(chan struct{})
	go func() { defer close(e.done); _ = m.Run(ctx) }()
}

func (e *env) shutdown() {
	e.stop()
	select {
	case <-e.done:
	case <-time.After(30 * time.Second):
		e.t.Error("manager did not stop")
	}
}

// testLogger discards logs unless MAYFLY_TEST_LOG is set.
func testLogger() *slog.Logger {
	if os.Getenv("MAYFLY_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// deleted waits (a bounded time) until at least n instances were deleted,
// and returns them: an instance is released right after its job's final
// update.
func (e *env) deleted(n int) []string {
	deadline := time.Now().Add(10 * time.Second)
	for len(e.fleet.Deleted()) < n && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	return e.fleet.Deleted()
}

// job waits for the job named name to finish and returns its record.
func (e *env) job(name string) coordinator.JobRecord {
	e.t.Helper()
	var id int64
	for _, j := range e.srv.Jobs() {
		if j.Name == name {
			id = j.ID
		}
	}
	if id == 0 {
		e.t.Fatalf("no job %q", name)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	j, err := e.srv.WaitJob(ctx, id)
	if err != nil {
		e.t.Fatalf("wait for job %q: %v", name, err)
	}
	return j
}

func (e *env) waitStatus(name, status string) {
	e.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		for _, j := range e.srv.Jobs() {
			if j.Name == name && j.Status == status {
				return
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	e.t.Fatalf("job %q never reached status %s", name, status)
}

func traceOf(t *testing.T, j coordinator.JobRecord) string {
	t.Helper()
	if j.TraceVerified == nil || !*j.TraceVerified {
		t.Errorf("job %s: the stored trace does not match the checksum and size the manager reported", j.Name)
	}
	return string(j.Trace)
}

func TestSuccessfulJob(t *testing.T) {
	e := newEnv(t, []coordinator.JobSpec{{Name: "hello", Script: []string{"echo hello from $CI_JOB_NAME", "echo second line >&2"}}}, nil)
	j := e.job("hello")
	tr := traceOf(t, j)
	if j.Status != "success" || j.FailureReason != "" || j.ExitCode != 0 {
		t.Errorf("job = %s %s %d, want success", j.Status, j.FailureReason, j.ExitCode)
	}
	// The trace, in order: header, the step_script section with the echoed
	// command and its output, and the final line.
	want := []string{
		"Running with mayfly",
		"section_start:",
		":step_script\r\x1b[0K",
		"$ echo hello from $CI_JOB_NAME",
		"\nhello from hello\n",
		"second line\n",
		":step_script\r\x1b[0K",
		"Job succeeded",
	}
	rest := tr
	for _, w := range want {
		i := strings.Index(rest, w)
		if i < 0 {
			t.Fatalf("trace lacks %q after the previous parts; trace:\n%s", w, tr)
		}
		rest = rest[i+len(w):]
	}
	if !strings.HasSuffix(tr, "Job succeeded\x1b[0;m\n") {
		t.Errorf("trace does not end with the success line: %q", tr[max(0, len(tr)-60):])
	}
	// Single use: the instance that ran the job is deleted, and another job would get another one.
	if got := len(e.deleted(1)); got != 1 {
		t.Errorf("deleted instances = %d, want 1", got)
	}
}

func TestFailingScriptReportsExitCode(t *testing.T) {
	e := newEnv(t, []coordinator.JobSpec{{Name: "fail", Script: []string{"echo before", "exit 3", "echo never"}, AfterScript: []string{"echo after ran with $CI_JOB_STATUS"}}}, nil)
	j := e.job("fail")
	tr := traceOf(t, j)
	if j.Status != "failed" || j.FailureReason != runnerapi.FailureScriptFailure || j.ExitCode != 3 {
		t.Errorf("job = %s %s exit %d, want failed script_failure exit 3", j.Status, j.FailureReason, j.ExitCode)
	}
	for _, want := range []string{"before\n", "after ran with failed\n", "ERROR: Job failed: exit code 3"} {
		if !strings.Contains(tr, want) {
			t.Errorf("trace lacks %q:\n%s", want, tr)
		}
	}
	if strings.Contains(tr, "never\n") {
		t.Errorf("the script went on after the failing command:\n%s", tr)
	}
}

// An allow_failure job fails in GitLab's eyes, and the pipeline goes on to
// the next stage.
func TestAllowFailure(t *testing.T) {
	e := newEnv(t, []coordinator.JobSpec{
		{Name: "flaky", Stage: "build", Script: []string{"exit 4"}, AllowFailure: new(true)},
		{Name: "next", Stage: "test", Script: []string{"echo next stage"}},
	}, nil)
	if j := e.job("flaky"); j.Status != "failed" || j.ExitCode != 4 || !j.AllowFailure {
		t.Errorf("flaky = %s exit %d allow_failure %v", j.Status, j.ExitCode, j.AllowFailure)
	}
	if j := e.job("next"); j.Status != "success" {
		t.Errorf("next stage job = %s, want success", j.Status)
	}
}

// The runner's hard cap stops a job that runs longer, reports
// job_execution_timeout, and the instance is deleted.
func TestHardTimeout(t *testing.T) {
	e := newEnv(t, []coordinator.JobSpec{{Name: "slow", Script: []string{"echo start", "sleep 600", "echo end"}}}, func(r *config.Runner) {
		r.MaxJobTimeout = 2 * time.Second
	})
	j := e.job("slow")
	tr := traceOf(t, j)
	if j.Status != "failed" || j.FailureReason != runnerapi.FailureJobExecutionTimeout {
		t.Errorf("job = %s %s, want failed job_execution_timeout", j.Status, j.FailureReason)
	}
	if !strings.Contains(tr, "execution took longer than 2s seconds") && !strings.Contains(tr, "execution took longer than") {
		t.Errorf("trace lacks the timeout message:\n%s", tr)
	}
	if len(e.deleted(1)) != 1 {
		t.Errorf("the timed-out job's instance was not deleted")
	}
}

func TestCancelMidJob(t *testing.T) {
	e := newEnv(t, []coordinator.JobSpec{{Name: "long", Script: []string{"echo started", "sleep 600"}}}, nil)
	e.waitStatus("long", "running")
	// Wait until the script has really started.
	deadline := time.Now().Add(30 * time.Second)
	for {
		j := e.srv.Jobs()[0]
		if strings.Contains(string(j.Trace), "started") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the job's script never started")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := e.srv.Cancel(e.srv.Jobs()[0].ID); err != nil {
		t.Fatal(err)
	}
	j := e.job("long")
	if j.Status != "canceled" {
		t.Errorf("job status = %s, want canceled", j.Status)
	}
	// The canceled job's own instance (named in its trace) is deleted, and
	// nothing else is leased: instances are only taken for jobs received.
	m := regexp.MustCompile(`via (local-\d+)`).FindStringSubmatch(string(j.Trace))
	if m == nil {
		t.Fatalf("trace does not name the instance:\n%s", j.Trace)
	}
	if !slices.Contains(e.deleted(1), m[1]) || len(e.fleet.Leased()) != 0 {
		t.Errorf("after cancel: deleted %v, leased %v; want %s deleted and nothing leased", e.fleet.Deleted(), e.fleet.Leased(), m[1])
	}
}

// A masked value printed in two pieces, sent to GitLab in two trace chunks,
// never appears in the trace GitLab stores.
func TestMaskedSecretSplitAcrossChunks(t *testing.T) {
	const secret = "s3cr3t-value-123"
	e := newEnv(t, []coordinator.JobSpec{{
		Name:      "secret",
		Variables: []coordinator.VariableSpec{{Key: "SECRET_X", Value: secret, Masked: true}},
		// The first half, a pause of several trace intervals, the second half.
		Script: []string{`printf 'value: %s' "${SECRET_X:0:7}"; sleep 0.5; printf '%s\n' "${SECRET_X:7}"`, `echo "whole: $SECRET_X"`},
	}}, nil)
	j := e.job("secret")
	tr := traceOf(t, j)
	if len(j.Patches) < 2 {
		t.Errorf("trace arrived in %d PATCHes; the test needs the secret to span chunks", len(j.Patches))
	}
	for _, leak := range []string{secret, secret[:7], secret[7:]} {
		if strings.Contains(tr, leak) {
			t.Errorf("trace contains %q:\n%s", leak, tr)
		}
	}
	if !strings.Contains(tr, "value: [MASKED]\n") || !strings.Contains(tr, "whole: [MASKED]\n") {
		t.Errorf("trace lacks the masked lines:\n%s", tr)
	}
	if strings.Contains(tr, runnerToken) {
		t.Errorf("trace contains the runner token")
	}
}

// Drain stops new jobs but lets the running one finish.
func TestDrainFinishesRunningJobs(t *testing.T) {
	e := newEnv(t, []coordinator.JobSpec{
		{Name: "running", Stage: "build", Script: []string{"echo started", "sleep 1", "echo done"}},
		{Name: "queued", Stage: "test", Script: []string{"echo should not run"}},
	}, nil)
	e.waitStatus("running", "running")
	e.m.Drain()
	select {
	case <-e.done:
	case <-time.After(30 * time.Second):
		t.Fatal("manager did not stop after draining")
	}
	if j := e.job("running"); j.Status != "success" {
		t.Errorf("running job = %s, want success", j.Status)
	}
	for _, j := range e.srv.Jobs() {
		if j.Name == "queued" && j.Status == "running" {
			t.Errorf("a job was picked up after Drain")
		}
	}
}

// A forceful stop during a drain aborts the running jobs (issue 20: the
// manager checked its context once, before waiting for the jobs).
func TestStopDuringDrainAbortsJobs(t *testing.T) {
	e := newEnv(t, []coordinator.JobSpec{{Name: "long", Script: []string{"echo started", "sleep 600"}}}, nil)
	e.waitStatus("long", "running")
	e.m.Drain()
	time.Sleep(200 * time.Millisecond)
	e.stop()
	select {
	case <-e.done:
	case <-time.After(30 * time.Second):
		t.Fatal("manager still waiting for its job 30s after a stop during the drain")
	}
	if j := e.job("long"); j.Status != "failed" || j.FailureReason != runnerapi.FailureRunnerSystemFailure {
		t.Errorf("job = %s %s, want failed runner_system_failure", j.Status, j.FailureReason)
	}
}

// Abort stops running jobs and reports them as runner_system_failure.
func TestAbortFailsRunningJobs(t *testing.T) {
	e := newEnv(t, []coordinator.JobSpec{{Name: "long", Script: []string{"echo started", "sleep 600"}}}, nil)
	e.waitStatus("long", "running")
	time.Sleep(200 * time.Millisecond)
	e.m.Abort()
	j := e.job("long")
	if j.Status != "failed" || j.FailureReason != runnerapi.FailureRunnerSystemFailure {
		t.Errorf("aborted job = %s %s, want failed runner_system_failure", j.Status, j.FailureReason)
	}
	<-e.done // the metric is counted once the final update returned
	if got := counterSum(t, e.reg, "mayfly_runner_system_failures_total"); got != 1 {
		t.Errorf("runner system failures metric = %v, want 1", got)
	}
}

// A VM that disappears under its job fails the job with runner_system_failure.
func TestLostInstanceFailsJob(t *testing.T) {
	e := newEnv(t, []coordinator.JobSpec{{Name: "victim", Script: []string{"echo started", "sleep 600"}}}, nil)
	e.waitStatus("victim", "running")
	// Under the script, not the prepare stage: a VM lost there is told as
	// "stage lost: the VM is gone".
	deadline := time.Now().Add(30 * time.Second)
	started := func() bool {
		for _, j := range e.srv.Jobs() {
			if j.Name == "victim" {
				return strings.Contains(string(j.Trace), "\nstarted\n")
			}
		}
		return false
	}
	for len(e.fleet.Leased()) == 0 || !started() {
		if time.Now().After(deadline) {
			t.Fatal("no instance leased, or the script did not start, within 30s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	e.fleet.Lose(e.fleet.Leased()[0])
	j := e.job("victim")
	if j.Status != "failed" || j.FailureReason != runnerapi.FailureRunnerSystemFailure {
		t.Errorf("job = %s %s, want failed runner_system_failure", j.Status, j.FailureReason)
	}
	if !strings.Contains(string(j.Trace), "disappeared") {
		t.Errorf("trace does not say the VM disappeared:\n%s", j.Trace)
	}
}

// Many jobs through a concurrent of 4 and a fleet of 2: every job runs once
// on its own instance and every instance is deleted.
func TestManyJobsSingleUse(t *testing.T) {
	var jobs []coordinator.JobSpec
	for i := 0; i < 12; i++ {
		jobs = append(jobs, coordinator.JobSpec{Name: "job" + string(rune('a'+i)), Script: []string{"echo $CI_JOB_NAME on $MAYFLY_INSTANCE_ROOT"}})
	}
	e := newEnv(t, jobs, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := e.srv.WaitAllFinished(ctx); err != nil {
		t.Fatal(err)
	}
	roots := map[string]string{}
	for _, j := range e.srv.Jobs() {
		if j.Status != "success" {
			t.Errorf("job %s = %s", j.Name, j.Status)
		}
		line := lineWith(string(j.Trace), j.Name+" on ")
		if prev, dup := roots[line]; dup && line != "" {
			t.Errorf("jobs %s and %s ran on the same instance (%s)", prev, j.Name, line)
		}
		roots[line] = j.Name
	}
	if got := len(e.deleted(12)); got != 12 {
		t.Errorf("deleted instances = %d, want 12", got)
	}
}

func lineWith(s, sub string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) && !strings.Contains(l, "$ echo") {
			return strings.TrimSpace(l[strings.Index(l, " on ")+4:])
		}
	}
	return ""
}

// counterSum adds up every series of the counter name in reg.
func counterSum(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}

// GitLab answers trace PATCHes with 416 and the size it really has: the
// manager resends from there and the stored trace is complete and verified.
func TestTrace416Recovery(t *testing.T) {
	e := newEnv(t, []coordinator.JobSpec{{Name: "resync", Script: []string{"for i in 1 2 3 4 5; do echo line $i; sleep 0.1; done"}}}, nil,
		coordinator.Fault{Endpoint: coordinator.FaultPatchTrace, Status: 416, Times: 2})
	j := e.job("resync")
	tr := traceOf(t, j)
	if j.Status != "success" {
		t.Errorf("job = %s %s", j.Status, j.FailureReason)
	}
	for i := 1; i <= 5; i++ {
		if !strings.Contains(tr, fmt.Sprintf("\nline %d\n", i)) {
			t.Errorf("trace lacks line %d:\n%s", i, tr)
		}
	}
	if n := e.srv.FaultsServed(); n != 2 {
		t.Errorf("faults served = %d, want the 2 injected 416s", n)
	}
}

// A GitLab that answers job requests with 503 and 429 slows the manager down
// but loses nothing: the job still runs once the answers are good again.
func TestRequestBackoff(t *testing.T) {
	e := newEnv(t, []coordinator.JobSpec{{Name: "later", Script: []string{"echo made it"}}}, nil,
		coordinator.Fault{Endpoint: coordinator.FaultRequestJob, Status: 503, Times: 3},
		coordinator.Fault{Endpoint: coordinator.FaultRequestJob, Status: 429, Times: 1, RetryAfter: time.Second})
	j := e.job("later")
	if j.Status != "success" || !strings.Contains(traceOf(t, j), "\nmade it\n") {
		t.Errorf("job = %s %s:\n%s", j.Status, j.FailureReason, j.Trace)
	}
	if n := e.srv.FaultsServed(); n != 4 {
		t.Errorf("faults served = %d, want 4", n)
	}
	if got := counterSum(t, e.reg, "gitlab_runner_api_request_statuses_total"); got < 5 {
		t.Errorf("API request statuses counted = %v, want the faults and the successes", got)
	}
}

// The next job is asked for as soon as a job ends, not at the next
// check_interval tick, while concurrent or limit kept the poll from
// asking; after GitLab answered without a job, the poll waits for the
// tick again.
func TestNextJobRequestedWhenAJobEnds(t *testing.T) {
	for _, tt := range []struct {
		name       string
		concurrent int
		limit      int
	}{{"concurrent", 1, 0}, {"limit", 4, 1}} {
		t.Run(tt.name, func(t *testing.T) {
			jobs := []coordinator.JobSpec{{Name: "one", Script: []string{"echo one"}}, {Name: "two", Script: []string{"echo two"}}, {Name: "three", Script: []string{"echo three"}}}
			e := newEnvConfig(t, jobs, func(c *config.Config) {
				c.Concurrent = tt.concurrent
				c.CheckInterval = time.Hour // a tick never comes during the test
			}, nil, func(r *config.Runner) { r.Limit = tt.limit }, nil)
			for _, j := range jobs {
				if got := e.job(j.Name); got.Status != "success" {
					t.Fatalf("job %s: %s", j.Name, got.Status)
				}
			}
			// One request per job, one that found nothing, and no more:
			// an empty answer is not retried before the tick. The empty
			// one follows the last job's end (at once, but a loaded
			// machine may take a moment); then nothing more comes.
			for deadline := time.Now().Add(10 * time.Second); counterSum(t, e.reg, "mayfly_job_requests_total") < 4 && time.Now().Before(deadline); {
				time.Sleep(20 * time.Millisecond)
			}
			time.Sleep(300 * time.Millisecond)
			if got := counterSum(t, e.reg, "mayfly_job_requests_total"); got != 4 {
				t.Errorf("%v job requests, want 4 (three jobs and one empty answer)", got)
			}
		})
	}
}

// The first output of a job's script goes to GitLab at once, not at the
// next trace interval.
func TestFirstOutputSentAtOnce(t *testing.T) {
	e := newEnvConfig(t, []coordinator.JobSpec{{Name: "slow", Script: []string{"echo first-line", "sleep 5", "echo done"}}},
		nil, func(o *manager.Options) { o.TraceInterval = time.Hour }, nil, nil)
	e.waitStatus("slow", "running")
	deadline := time.Now().Add(4 * time.Second)
	for {
		var tr string
		for _, j := range e.srv.Jobs() {
			tr = string(j.Trace)
		}
		if strings.Contains(tr, "first-line") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the first output did not reach GitLab within 4s, with a trace interval of 1h; trace so far %q", tr)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if j := e.job("slow"); j.Status != "success" {
		t.Errorf("job: %s", j.Status)
	}
}
