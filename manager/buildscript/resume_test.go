package buildscript

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
	"github.com/mayfly-ci/mayfly/manager/stagerun"
)

// fakeMachine plays a machine whose stages run detached: a stage's output
// and exit code stay after it ends, chained stages start without a call,
// and a stage marked to hang runs until it is stopped. Each stage prints
// its ID, its CI_JOB_STATUS, and then exits with the code its script ends
// with ("exit N"), or 0.
type fakeMachine struct {
	mu      sync.Mutex
	hang    map[string]bool // stage names that hang until stopped
	started []string        // stage IDs in the order they started
	stages  map[string]*fakeStage
	runs    []stagerun.Stage // every Run call
	stops   []string
}

type fakeStage struct {
	out  []byte
	code int
	done chan struct{}
}

func newFakeMachine(hang ...string) *fakeMachine {
	m := &fakeMachine{hang: map[string]bool{}, stages: map[string]*fakeStage{}}
	for _, h := range hang {
		m.hang[h] = true
	}
	return m
}

// start starts s (and its chain) if it has not started; m.mu is held.
func (m *fakeMachine) startLocked(s stagerun.Stage) *fakeStage {
	if st := m.stages[s.ID]; st != nil {
		return st
	}
	st := &fakeStage{done: make(chan struct{})}
	m.stages[s.ID] = st
	m.started = append(m.started, s.ID)
	_, name, _, _ := stagerun.ParseStageID(s.ID)
	st.out = fmt.Appendf(nil, "run %s %s\n", s.ID, strings.Join(s.Env, " "))
	if m.hang[name] {
		return st
	}
	fmt.Sscanf(s.Script[strings.LastIndex(s.Script, "exit ")+len("exit "):], "%d", &st.code)
	if !strings.Contains(s.Script, "exit ") {
		st.code = 0
	}
	close(st.done)
	if st.code == 0 && len(s.Then) > 0 {
		next := s.Then[0]
		next.Then = s.Then[1:]
		m.startLocked(next)
	}
	return st
}

func (m *fakeMachine) Run(ctx context.Context, s stagerun.Stage, out io.Writer) (int, error) {
	m.mu.Lock()
	m.runs = append(m.runs, s)
	st := m.startLocked(s)
	m.mu.Unlock()
	select {
	case <-st.done:
	case <-ctx.Done():
		m.mu.Lock()
		out.Write(st.out[s.From:])
		m.mu.Unlock()
		return -1, fmt.Errorf("follow %s: %w", s.ID, context.Cause(ctx))
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	out.Write(st.out[s.From:])
	return st.code, nil
}

func (m *fakeMachine) Stop(_ context.Context, id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.stops = append(m.stops, id)
	if st := m.stages[id]; st != nil {
		select {
		case <-st.done:
		default:
			st.out = append(st.out, "Terminated\n"...)
			st.code = 143
			close(st.done)
		}
	}
	return nil
}

// recordedProgress is a Progress two Runs can share, as a journal would be
// shared by a manager and the one that replaces it; its clock ticks one
// second per call.
type recordedProgress struct {
	mu       sync.Mutex
	clock    time.Time
	sections map[string]time.Time
	attempts map[string]time.Time
	stops    map[string]StopReason
}

func newRecordedProgress() *recordedProgress {
	return &recordedProgress{clock: time.Unix(1_700_000_000, 0), sections: map[string]time.Time{},
		attempts: map[string]time.Time{}, stops: map[string]StopReason{}}
}

func (p *recordedProgress) tick() time.Time { p.clock = p.clock.Add(time.Second); return p.clock }

func (p *recordedProgress) Section(key string, end bool) time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	k := fmt.Sprint(key, end)
	if t, ok := p.sections[k]; ok {
		return t
	}
	p.sections[k] = p.tick()
	return p.sections[k]
}

func (p *recordedProgress) Attempt(id string) time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.attempts[id]; !ok {
		p.attempts[id] = time.Now()
	}
	return p.attempts[id]
}

func (p *recordedProgress) Started(id string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.attempts[id]
	return ok
}

func (p *recordedProgress) Stopped(id string) (StopReason, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	why, ok := p.stops[id]
	return why, ok
}

func (p *recordedProgress) RecordStop(id string, why StopReason) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stops[id] = why
}

func resumeJob(script string) *runnerapi.JobResponse {
	job := baseJob(script)
	job.Steps = append(job.Steps, runnerapi.Step{Name: "after_script", Script: []string{"echo after"}})
	return job
}

// A run that goes well is one chain: the first stage is given every stage
// after it, with the status each would see, and Run for each attaches.
func TestRunChainsStages(t *testing.T) {
	p, err := Generate(resumeJob("echo hi"), Options{BuildsDir: "/builds"})
	if err != nil {
		t.Fatal(err)
	}
	m := newFakeMachine()
	var trace strings.Builder
	r := p.Run(context.Background(), m, &trace, RunOptions{})
	if r.State != runnerapi.StateSuccess {
		t.Fatalf("result %+v\n%s", r, trace.String())
	}
	first := m.runs[0]
	var then []string
	for _, s := range first.Then {
		then = append(then, s.ID+" "+strings.Join(s.Env, " "))
	}
	want := []string{
		"01-get_sources-1 CI_JOB_STATUS=running",
		"02-step_script-1 CI_JOB_STATUS=running",
		"03-after_script-1 CI_JOB_STATUS=success",
	}
	if strings.Join(then, "; ") != strings.Join(want, "; ") {
		t.Errorf("chain of %s:\n got %q\nwant %q", first.ID, then, want)
	}
	if len(m.runs) != 4 || len(m.started) != 4 {
		t.Errorf("%d Run calls, %d stages started; want 4 and 4", len(m.runs), len(m.started))
	}
	for _, id := range []string{"00-prepare_script-1", "01-get_sources-1", "02-step_script-1", "03-after_script-1"} {
		if !strings.Contains(trace.String(), "run "+id+" ") {
			t.Errorf("the trace lacks the output of %s:\n%s", id, trace.String())
		}
	}
}

// A failed script breaks the chain: after_script is then run by Run with
// the status failed.
func TestRunChainBreaksOnFailure(t *testing.T) {
	p, err := Generate(resumeJob("exit 4"), Options{BuildsDir: "/builds"})
	if err != nil {
		t.Fatal(err)
	}
	m := newFakeMachine()
	var trace strings.Builder
	r := p.Run(context.Background(), m, &trace, RunOptions{})
	if r.FailureReason != runnerapi.FailureScriptFailure || r.ExitCode != 4 {
		t.Fatalf("result %+v\n%s", r, trace.String())
	}
	if !strings.Contains(trace.String(), "run 03-after_script-1 CI_JOB_STATUS=failed") {
		t.Errorf("after_script did not run with status failed:\n%s", trace.String())
	}
}

// A stage over its own timeout is stopped; the output it wrote until then
// stays in the trace, read from where Run had got to, and the chain is
// not followed.
func TestRunStopsStageAtItsTimeout(t *testing.T) {
	job := resumeJob("echo hi")
	job.Variables = append(job.Variables, runnerapi.Variable{Key: "RUNNER_AFTER_SCRIPT_TIMEOUT", Value: "200ms"})
	p, err := Generate(job, Options{BuildsDir: "/builds"})
	if err != nil {
		t.Fatal(err)
	}
	m := newFakeMachine("after_script")
	var trace strings.Builder
	r := p.Run(context.Background(), m, &trace, RunOptions{})
	if r.State != runnerapi.StateSuccess {
		t.Fatalf("result %+v: a timed-out after_script must not fail the job\n%s", r, trace.String())
	}
	if strings.Join(m.stops, " ") != "03-after_script-1" {
		t.Errorf("stopped %q, want the after_script", m.stops)
	}
	if n := strings.Count(trace.String(), "run 03-after_script-1"); n != 1 {
		t.Errorf("the after_script's output is in the trace %d times, want once:\n%s", n, trace.String())
	}
	if !strings.Contains(trace.String(), "Terminated\n") || !strings.Contains(trace.String(), "after_script failed, but job will continue unaffected: timed out after 200ms") {
		t.Errorf("trace lacks the stopped stage's end or the warning:\n%s", trace.String())
	}
}

// A restarted manager replays the plan with the journal of the one before:
// stages that ran are followed again, none starts twice, and the trace is
// the same bytes. When the job was canceled meanwhile, the stages started
// before are still replayed, the running one is stopped, and nothing new
// starts.
func TestRunResumes(t *testing.T) {
	p, err := Generate(resumeJob("echo hi"), Options{BuildsDir: "/builds"})
	if err != nil {
		t.Fatal(err)
	}
	m := newFakeMachine()
	prog := newRecordedProgress()
	var first strings.Builder
	r1 := p.Run(context.Background(), m, &first, RunOptions{Progress: prog})

	var again strings.Builder
	r2 := p.Run(context.Background(), m, &again, RunOptions{Progress: prog})
	if again.String() != first.String() || r2.State != r1.State {
		t.Errorf("replay differs:\nfirst %q\nagain %q", first.String(), again.String())
	}
	if len(m.started) != 4 {
		t.Errorf("stages started %q: a replay started some again", m.started)
	}

	// Canceled while step_script ran: the new manager replays, stops it.
	m = newFakeMachine("step_script")
	prog = newRecordedProgress()
	ctx, cancel := context.WithCancel(context.Background())
	var before strings.Builder
	done := make(chan Result, 1)
	go func() { done <- p.Run(ctx, m, &before, RunOptions{Progress: prog}) }()
	waitUntil(t, func() bool {
		m.mu.Lock()
		defer m.mu.Unlock()
		return len(m.started) == 3
	})
	// The first manager dies here: nothing of it runs any more. A new one
	// runs with a job context that is already canceled.
	cancel()
	<-done
	m.mu.Lock()
	m.stops = nil
	m.stages["02-step_script-1"] = &fakeStage{out: []byte("run 02-step_script-1 CI_JOB_STATUS=running\n"), done: make(chan struct{})}
	m.mu.Unlock()
	var replay strings.Builder
	r := p.Run(ctx, m, &replay, RunOptions{Progress: prog})
	if !r.Outcomes[len(r.Outcomes)-1].Failed() || r.FailureReason != runnerapi.FailureUnknownFailure && r.FailureReason != runnerapi.FailureJobCanceled {
		t.Errorf("result %+v, want canceled", r)
	}
	if strings.Join(m.stops, " ") != "02-step_script-1" {
		t.Errorf("stops %q, want the running step_script stopped", m.stops)
	}
	if replay.String() != before.String() {
		t.Errorf("the replayed trace differs:\nbefore %q\nreplay %q", before.String(), replay.String())
	}
	if len(m.started) != 3 {
		t.Errorf("stages started %q, want none after the cancel", m.started)
	}
}

// A runner that lost the stage fails it as the runner's fault.
func TestRunLostStage(t *testing.T) {
	p, err := Generate(baseJob("true"), Options{BuildsDir: "/builds"})
	if err != nil {
		t.Fatal(err)
	}
	r := p.Run(context.Background(), lostRunner{}, io.Discard, RunOptions{})
	if r.FailureReason != runnerapi.FailureRunnerSystemFailure || !strings.Contains(r.Message, "stage lost") {
		t.Errorf("result %+v, want runner_system_failure saying the stage was lost", r)
	}
}

type lostRunner struct{}

func (lostRunner) Run(context.Context, stagerun.Stage, io.Writer) (int, error) {
	return -1, fmt.Errorf("machine rebooted: %w", stagerun.ErrLost)
}
func (lostRunner) Stop(context.Context, string) error { return errors.New("unused") }

func waitUntil(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(time.Millisecond)
	}
}
