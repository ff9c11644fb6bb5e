package buildscript

import (
	"context"
	"fmt"
	"io"
	"time"
)

// Executor runs one script on the job's machine: vmexec.Executor.Run with
// Command{Shell: shell, Script: script, Stdout: out, Stderr: out} fits.
type Executor interface {
	// Run returns the script's exit code when it ran to completion, or an
	// error when it did not (ctx ended, transport or machine failed).
	Run(ctx context.Context, shell, script string, out io.Writer) (exitCode int, err error)
}

// Script returns the text to run for stage s: its Script with CI_JOB_STATUS
// set to jobStatus (running before and during the user steps; success,
// failed or canceled after them, as after_script sees it).
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

// Run runs the plan's stages in order on exec and returns the job's result.
// The caller uploads Plan.Files first and writes the header before; Run writes
// each stage's section markers and output to trace (give it the masking
// writer), and a warning when after_script fails. The final line is the
// caller's: FinalLine(result).
//
// ctx is the job: its deadline is the job timeout, its cancellation a cancel
// from GitLab. When it ends, the running stage is stopped and no further
// stage runs. now stamps the section markers; nil means time.Now. onStage,
// if not nil, is called as each stage starts (e.g. to record when the user's
// script began).
func (p *Plan) Run(ctx context.Context, exec Executor, trace io.Writer, now func() time.Time, onStage func(Stage)) Result {
	if now == nil {
		now = time.Now
	}
	var (
		outcomes    []Outcome
		failed      bool
		userStarted bool
	)
	for _, st := range p.Stages {
		if ctx.Err() != nil {
			break
		}
		switch st.When {
		case WhenOnFailure:
			if !failed {
				continue
			}
		case WhenAlways:
			if !userStarted {
				continue
			}
		default:
			if failed {
				continue
			}
		}
		status := JobStatusRunning
		if userStarted && !st.User {
			status = JobStatusSuccess
			if failed {
				status = JobStatusFailed
			}
		}
		userStarted = userStarted || st.User
		if onStage != nil {
			onStage(st)
		}

		io.WriteString(trace, SectionStart(now(), string(st.Name), st.Title))
		var o Outcome
		for attempt := 0; attempt < max(st.Attempts, 1); attempt++ {
			o = p.runStage(ctx, exec, st, status, trace)
			if !o.Failed() || ctx.Err() != nil {
				break
			}
		}
		io.WriteString(trace, SectionEnd(now(), string(st.Name)))
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

// runStage runs one attempt of a stage under its own timeout.
func (p *Plan) runStage(ctx context.Context, exec Executor, st Stage, status string, out io.Writer) Outcome {
	o := Outcome{Stage: st.Name, AllowFailure: st.AllowFailure, Timeout: st.Timeout}
	sctx := ctx
	if st.Timeout > 0 {
		var cancel context.CancelFunc
		sctx, cancel = context.WithTimeout(ctx, st.Timeout)
		defer cancel()
	}
	code, err := exec.Run(sctx, p.Shell, p.Script(st, status), out)
	switch {
	case err == nil:
		o.ExitCode = code
	case ctx.Err() == nil && sctx.Err() != nil:
		o.TimedOut = true
	default:
		o.Err = fmt.Errorf("stage %s: %w", st.Name, err)
	}
	return o
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
