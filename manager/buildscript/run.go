package buildscript

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/mayfly-ci/mayfly/manager/stagerun"
)

// Script returns the text to run for stage s: its Script with CI_JOB_STATUS
// set to jobStatus (running before and during the user steps; success,
// failed or canceled after them, as after_script sees it). Plan.Run gives
// the status to the runner as a variable instead, so that each stage's
// script is the same text whatever the job's status.
func (p *Plan) Script(s Stage, jobStatus string) string {
	switch p.Shell {
	case ShellPwsh:
		return "$env:CI_JOB_STATUS = " + psQuote(jobStatus) + "\n" + s.Script
	case ShellPowerShell:
		return "$env:CI_JOB_STATUS = " + psQuote(jobStatus) + "\r\n" + s.Script
	default:
		return "export CI_JOB_STATUS=" + shQuote(jobStatus) + "\n" + s.Script
	}
}

// StopReason says why Run stopped a stage before it ended.
type StopReason string

// Reasons for stopping a stage.
const (
	// StopStageTimeout: the stage's own timeout expired.
	StopStageTimeout StopReason = "stage_timeout"
	// StopJobEnded: the job's context ended (cancel, job timeout, abort).
	StopJobEnded StopReason = "job_ended"
)

// Progress is what Run records, and a restarted manager reads back, that
// the machine does not keep: when each stage and attempt started and
// ended (the times of the section markers) and which attempts Run stopped,
// and why. With it a restarted manager runs the same plan again, attaching
// to the stages that were started, and writes the very same trace.
type Progress interface {
	// Section returns the time of the start (end false) or end of the
	// trace section named key: the time recorded earlier, or now, which it
	// records first.
	Section(key string, end bool) time.Time
	// Attempt returns when the attempt with this ID started: the time
	// recorded earlier, or now, which it records first.
	Attempt(id string) time.Time
	// Started reports whether the attempt with this ID was started.
	Started(id string) bool
	// Stopped returns why Run stopped the attempt with this ID, if it did.
	Stopped(id string) (StopReason, bool)
	// RecordStop records why Run is about to stop the attempt with this ID.
	RecordStop(id string, why StopReason)
}

// RunOptions are the optional parts of Plan.Run.
type RunOptions struct {
	// Progress records and replays what the machine does not keep; nil
	// keeps it in memory, with times from Now.
	Progress Progress
	// Now stamps the section markers when Progress is nil; nil: time.Now.
	Now func() time.Time
	// OnStage, if set, is called as each stage starts (e.g. to record when
	// the user's script began).
	OnStage func(Stage)
	// StopTimeout bounds stopping a stage and reading the output it wrote
	// until then (default 1m).
	StopTimeout time.Duration
}

// DefaultStopTimeout is RunOptions.StopTimeout when it is zero.
const DefaultStopTimeout = time.Minute

// replayPeek is how long a restarted manager follows an attempt begun
// before the job or the stage ended, to learn whether it has ended since,
// before it stops it.
const replayPeek = 2 * time.Second

// Run runs the plan's stages in order on runner and returns the job's
// result. The caller writes the header before and the final line after
// (FinalLine); Run writes each stage's section markers and output to trace
// (give it the masking writer), and a warning when after_script fails.
//
// ctx is the job: its deadline is the job timeout, its cancellation a
// cancel from GitLab. When it ends, the running stage is stopped and no
// further stage starts; stages Progress says were started already are
// still followed to the end (a restarted manager replays them to write the
// same trace). Stages of a run that all go well are chained: each is given
// to the runner with the stages that follow it if it succeeds (see
// stagerun.Stage.Then).
func (p *Plan) Run(ctx context.Context, runner stagerun.Runner, trace io.Writer, opts RunOptions) Result {
	prog := opts.Progress
	if prog == nil {
		now := opts.Now
		if now == nil {
			now = time.Now
		}
		prog = newMemoryProgress(now)
	}
	if opts.StopTimeout <= 0 {
		opts.StopTimeout = DefaultStopTimeout
	}
	var (
		outcomes    []Outcome
		failed      bool
		userStarted bool
	)
	for i, st := range p.Stages {
		if !runs(st, failed, userStarted) {
			continue
		}
		if ctx.Err() != nil && !prog.Started(stagerun.StageID(i, string(st.Name), 1)) {
			break
		}
		status := stageStatus(st, userStarted, failed)
		userStarted = userStarted || st.User
		if opts.OnStage != nil {
			opts.OnStage(st)
		}

		io.WriteString(trace, SectionStart(prog.Section(sectionKey(i, st), false), string(st.Name), st.Title))
		var o Outcome
		for attempt := 1; attempt <= max(st.Attempts, 1); attempt++ {
			id := stagerun.StageID(i, string(st.Name), attempt)
			if attempt > 1 && ctx.Err() != nil && !prog.Started(id) {
				break
			}
			s := stagerun.Stage{ID: id, Script: st.Script, Env: statusEnv(status)}
			if ctx.Err() == nil {
				s.Then = p.chainAfter(i, userStarted)
			}
			o = p.runAttempt(ctx, runner, prog, st, s, trace, opts.StopTimeout)
			if !o.Failed() {
				break
			}
		}
		io.WriteString(trace, SectionEnd(prog.Section(sectionKey(i, st), true), string(st.Name)))
		outcomes = append(outcomes, o)
		if o.Failed() && st.AllowFailure && st.Name == StageAfterScript && ctx.Err() == nil {
			io.WriteString(trace, WarningLine("after_script failed, but job will continue unaffected: "+describe(o)))
		}
		if o.Failed() && !st.AllowFailure {
			failed = true
		}
	}
	return Decide(outcomes, JobEndFrom(ctx, p.JobTimeout, p.FailureReasons))
}

// sectionKey names a stage's trace section for Progress.
func sectionKey(i int, st Stage) string { return stagerun.StageID(i, string(st.Name), 0) }

// runs reports whether a stage runs after the stages before it.
func runs(st Stage, failed, userStarted bool) bool {
	switch st.When {
	case WhenOnFailure:
		return failed
	case WhenAlways:
		return userStarted
	default:
		return !failed
	}
}

// stageStatus is the CI_JOB_STATUS a stage sees.
func stageStatus(st Stage, userStarted, failed bool) string {
	if !userStarted || st.User {
		return JobStatusRunning
	}
	if failed {
		return JobStatusFailed
	}
	return JobStatusSuccess
}

func statusEnv(status string) []string { return []string{"CI_JOB_STATUS=" + status} }

// chainAfter returns the stages that run after the i-th one if it and
// every one of them exits 0, in order, each with the status it would see.
func (p *Plan) chainAfter(i int, userStarted bool) []stagerun.Stage {
	var chain []stagerun.Stage
	for j := i + 1; j < len(p.Stages); j++ {
		st := p.Stages[j]
		if !runs(st, false, userStarted) {
			continue
		}
		chain = append(chain, stagerun.Stage{
			ID:     stagerun.StageID(j, string(st.Name), 1),
			Script: st.Script,
			Env:    statusEnv(stageStatus(st, userStarted, false)),
		})
		userStarted = userStarted || st.User
	}
	return chain
}

// runAttempt runs one attempt of a stage under its own timeout, which
// counts from the attempt's start as Progress recorded it.
func (p *Plan) runAttempt(ctx context.Context, runner stagerun.Runner, prog Progress, st Stage, s stagerun.Stage, trace io.Writer, stopTimeout time.Duration) Outcome {
	o := Outcome{Stage: st.Name, AllowFailure: st.AllowFailure, Timeout: st.Timeout}
	start := prog.Attempt(s.ID)
	sctx := ctx
	if st.Timeout > 0 {
		var cancel context.CancelFunc
		sctx, cancel = context.WithDeadline(ctx, start.Add(st.Timeout))
		defer cancel()
	}
	out := &countingWriter{w: trace}
	var (
		code  int
		err   error
		ended bool // the stage ran to its end
	)
	why, stopped := prog.Stopped(s.ID)
	switch {
	case sctx.Err() == nil:
		code, err = runner.Run(sctx, s, out)
		ended = err == nil
	case !stopped:
		// A restarted manager replays an attempt begun before the job (or
		// the stage) ended: it may have ended since, or still run.
		pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), replayPeek)
		code, err = runner.Run(pctx, s, out)
		cancel()
		ended = err == nil
	}
	if !ended && sctx.Err() != nil && !errors.Is(err, stagerun.ErrLost) {
		// The stage outlived its timeout or the job: stop it, and keep
		// what it wrote until then.
		if !stopped {
			why = StopJobEnded
			if ctx.Err() == nil {
				why = StopStageTimeout
			}
			prog.RecordStop(s.ID, why)
			stopped = true
		}
		stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stopTimeout)
		defer cancel()
		if serr := runner.Stop(stopCtx, s.ID); serr != nil {
			err = fmt.Errorf("stopping it failed: %w", serr)
		} else {
			s.From, s.Then = out.n, nil
			code, err = runner.Run(stopCtx, s, out)
		}
	}
	switch {
	case stopped && why == StopStageTimeout:
		o.TimedOut = true
	case stopped:
		o.Err = fmt.Errorf("stage %s: stopped: the job ended", st.Name)
	case err != nil:
		o.Err = fmt.Errorf("stage %s: %w", st.Name, err)
	default:
		o.ExitCode = code
	}
	return o
}

// countingWriter counts the bytes written through it.
type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return n, err
}

func describe(o Outcome) string {
	switch {
	case o.TimedOut:
		return fmt.Sprintf("timed out after %v", o.Timeout)
	case o.Err != nil:
		return o.Err.Error()
	}
	return fmt.Sprintf("exit code %d", o.ExitCode)
}

// memoryProgress is the Progress of a Run that nothing will resume.
type memoryProgress struct {
	now      func() time.Time // for the section markers
	sections map[string]time.Time
	attempts map[string]time.Time
	stops    map[string]StopReason
}

func newMemoryProgress(now func() time.Time) *memoryProgress {
	return &memoryProgress{now: now, sections: map[string]time.Time{}, attempts: map[string]time.Time{}, stops: map[string]StopReason{}}
}

func (m *memoryProgress) Section(key string, end bool) time.Time {
	if end {
		key += "/end"
	}
	if t, ok := m.sections[key]; ok {
		return t
	}
	t := m.now()
	m.sections[key] = t
	return t
}

func (m *memoryProgress) Attempt(id string) time.Time {
	if t, ok := m.attempts[id]; ok {
		return t
	}
	t := time.Now()
	m.attempts[id] = t
	return t
}

func (m *memoryProgress) Started(id string) bool {
	_, ok := m.attempts[id]
	return ok
}

func (m *memoryProgress) Stopped(id string) (StopReason, bool) {
	why, ok := m.stops[id]
	return why, ok
}

func (m *memoryProgress) RecordStop(id string, why StopReason) { m.stops[id] = why }
