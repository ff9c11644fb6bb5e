// Package stagerun defines how the manager runs the stages of a job on the
// job's machine: the Runner interface, implemented by the shell runner
// (stages in the VM's own shell, detached under a small supervisor; see
// vmexec/detach), by the container runner of `image:` jobs, and by Attached
// for transports that cannot detach (WinRM).
//
// The contract, which lets a job outlive the manager (issue 16) and start
// without a round trip per stage (issue 14):
//
//   - A stage attempt has an ID that every manager process derives the
//     same way from the job's plan (StageID). Run with an ID starts the
//     stage only if nothing started it yet: a later Run with the same ID,
//     from this process or from a restarted one, attaches to it, whether it
//     is still running or has finished.
//   - A started stage runs on without the manager: when the connection
//     drops, the context ends or the manager dies, it goes on, and its
//     output and exit status are kept on the machine until the machine is
//     deleted. Run streams the output from the byte offset Stage.From, so a
//     caller that saw n bytes reattaches with From = n and misses nothing.
//   - Stop is the only way a stage ends early (cancel, job or stage
//     timeout): the stage and the chain after it are stopped.
//   - Stage.Then is a hint: stages the runner may start on the machine as
//     soon as this one exits 0, in order, each only if the one before it
//     exited 0, so that they need no round trip. The caller still calls
//     Run for each of them (it attaches). A runner may ignore the hint.
//
// The output a Run writes is raw: the caller masks it and frames it into
// trace sections. A reattaching caller regenerates the trace from the
// outputs and its own journal, so output read twice must be identical:
// runners must not add anything of their own to it.
package stagerun

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// Stage is one attempt of one stage of a job.
type Stage struct {
	// ID names the attempt within the job; see StageID.
	ID string
	// Script is the program text for the job's shell.
	Script string
	// Env holds "NAME=value" pairs set for the script (CI_JOB_STATUS).
	Env []string
	// From is the byte offset of the stage's output to stream from: 0 for
	// a new stage, the bytes already seen when reattaching.
	From int64
	// Then are stages the runner may start right after this one exits 0
	// (see the package documentation).
	Then []Stage
}

// StageID names attempt (from 1) of the index-th stage (from 0) of a plan,
// e.g. "03-step_script-1". It is the same in every manager process.
func StageID(index int, name string, attempt int) string {
	return fmt.Sprintf("%02d-%s-%d", index, name, attempt)
}

// Runner runs the stages of one job on its machine.
type Runner interface {
	// Run starts stage s unless it was started already, writes its output
	// from s.From to out until it ends, and returns its exit code.
	//
	// When ctx ends, Run returns an error wrapping context.Cause(ctx) and
	// the stage runs on. A transport failure gives an error too (the stage
	// runs on): the caller may Run it again. ErrLost says the stage can no
	// longer be found or followed (the machine restarted, its files are
	// gone, or the runner cannot reattach at all).
	Run(ctx context.Context, s Stage, out io.Writer) (exitCode int, err error)
	// Stop ends the stage with this ID and the chain after it: its
	// processes get SIGTERM (or the runner's equivalent), then SIGKILL after
	// a grace period; Stop returns when they are gone. Stopping a stage that
	// has ended or never started is not an error.
	Stop(ctx context.Context, id string) error
}

// ErrLost is wrapped by Run errors when the stage cannot be found or
// followed any more: the job cannot go on on this machine.
var ErrLost = errors.New("stage lost")

// ParseStageID splits an ID made by StageID.
func ParseStageID(id string) (index int, name string, attempt int, ok bool) {
	i := strings.IndexByte(id, '-')
	j := strings.LastIndexByte(id, '-')
	if i <= 0 || j <= i+1 || j == len(id)-1 {
		return 0, "", 0, false
	}
	index, err1 := strconv.Atoi(id[:i])
	attempt, err2 := strconv.Atoi(id[j+1:])
	if err1 != nil || err2 != nil || index < 0 || attempt < 0 {
		return 0, "", 0, false
	}
	return index, id[i+1 : j], attempt, true
}
