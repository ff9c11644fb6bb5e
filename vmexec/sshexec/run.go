package sshexec

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/mayfly-ci/mayfly/vmexec"
)

// Run runs cmd.Script under cmd.Shell (default "sh") in a new process group and
// streams its output to cmd.Stdout and cmd.Stderr. It returns the script's exit
// code with a nil error when the script finished, whatever the code (a script
// killed by signal N gives 128+N). When ctx ends first, the remote process
// group gets SIGTERM, then SIGKILL after KillGrace, and Run returns a
// *vmexec.AbortedError. Transport failures give a *vmexec.SystemError. No
// write reaches cmd.Stdout or cmd.Stderr after Run returned.
func (c *Client) Run(ctx context.Context, cmd vmexec.Command) (int, error) {
	shell, env, err := checkCommand("run", cmd)
	if err != nil {
		return -1, err
	}
	if ctx.Err() != nil {
		return -1, &vmexec.AbortedError{Cause: context.Cause(ctx), Killed: true}
	}

	token := newToken()
	s, err := c.openExec(ctx, "run", runCommand(shell))
	if err != nil {
		return -1, err
	}
	defer s.ch.Close()

	var mu sync.Mutex
	stdout := &syncWriter{mu: &mu, w: cmd.Stdout}
	stderr := &syncWriter{mu: &mu, w: cmd.Stderr}
	defer stdout.stop()
	defer stderr.stop()
	marker := newMarkerFilter(stderr, token)
	outDone, errDone := make(chan struct{}), make(chan struct{})
	go func() { io.Copy(stdout, s.ch); close(outDone) }()          // ends at EOF or channel close
	go func() { io.Copy(marker, s.ch.Stderr()); close(errDone) }() // ends at EOF or channel close
	payload := runPayload(token, env, cmd.Script)
	go func() { // ends when written or the channel closes
		s.ch.Write(payload)
		s.ch.CloseWrite()
	}()

	select {
	case <-s.got:
	case <-s.closed:
		if !s.exited() {
			return -1, &vmexec.SystemError{Op: "run", Err: c.endedWithoutStatus()}
		}
	case <-ctx.Done():
		if s.exited() {
			break
		}
		return -1, c.abort(ctx, s, marker)
	case <-c.done:
		return -1, &vmexec.SystemError{Op: "run", Err: c.Err()}
	}

	// The script exited. Its output may still be in flight, or held open by
	// background processes it left behind: wait a bounded time, then kill them.
	drain := time.NewTimer(c.t.DrainTimeout)
	defer drain.Stop()
	drained := true
	for _, d := range []chan struct{}{outDone, errDone} {
		select {
		case <-d:
		case <-drain.C:
			drained = false
		case <-c.done:
			drained = false
		}
		if !drained {
			break
		}
	}
	if pid, ok := marker.PID(); !drained && ok && c.Err() == nil {
		c.log.Warn("script output still open after exit, killing leftover processes",
			"pgid", pid, "drain_timeout", c.t.DrainTimeout)
		kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.t.KillTimeout)
		if err := c.killGroup(kctx, pid); err != nil {
			c.log.Warn("kill leftover processes", "pgid", pid, "err", err)
		}
		cancel()
	}

	if _, ok := marker.PID(); !ok && !marker.lost() {
		held := marker.flush()
		return -1, &vmexec.SystemError{Op: "run", Err: fmt.Errorf(
			"remote shell %q did not start the script (exit status %d): %s", shell, s.code, truncate(held, 512))}
	}
	if err := errors.Join(stdout.firstErr(), stderr.firstErr()); err != nil {
		return s.code, &vmexec.SystemError{Op: "run: write output", Err: err}
	}
	return s.code, nil
}

// abort kills the script's process group after ctx ended and reports how it went.
func (c *Client) abort(ctx context.Context, s *session, marker *markerFilter) error {
	cause := context.Cause(ctx)
	kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.t.KillTimeout)
	defer cancel()
	var pid int
	select {
	case <-marker.found:
		pid, _ = marker.PID()
	case <-s.closed:
		return &vmexec.AbortedError{Cause: cause, Killed: true}
	case <-c.done:
		return &vmexec.AbortedError{Cause: cause, KillErr: c.Err()}
	case <-kctx.Done():
		return &vmexec.AbortedError{Cause: cause, KillErr: errors.New("script pid was not reported before the kill timeout")}
	}
	if err := c.killGroup(kctx, pid); err != nil {
		return &vmexec.AbortedError{Cause: cause, KillErr: err}
	}
	// The login shell exits once its child group is gone; wait for that briefly.
	select {
	case <-s.closed:
	case <-kctx.Done():
	case <-c.done:
	}
	c.log.Debug("aborted script killed", "pgid", pid, "cause", cause)
	return &vmexec.AbortedError{Cause: cause, Killed: true}
}

// killGroup kills process group pgid through a new session and waits until it is gone.
func (c *Client) killGroup(ctx context.Context, pgid int) error {
	grace := int((c.t.KillGrace + time.Second - 1) / time.Second)
	code, stderr, err := c.exec(ctx, fmt.Sprintf("kill process group %d", pgid), killCommand(pgid, grace), nil)
	if err != nil {
		return err
	}
	if code != 0 {
		return fmt.Errorf("kill process group %d: exit status %d: %s", pgid, code, stderr)
	}
	return nil
}

// Stream runs cmd.Script under cmd.Shell (default "sh") without a process
// group of its own, for commands that take care of their own end: it costs
// one process less than Run. It streams the output and returns the exit
// code as Run does. When ctx ends the session is closed and Stream returns
// a *vmexec.AbortedError at once; the remote command is not killed but
// dies of SIGPIPE at its next write. It implements vmexec.Streamer.
func (c *Client) Stream(ctx context.Context, cmd vmexec.Command) (int, error) {
	shell, env, err := checkCommand("stream", cmd)
	if err != nil {
		return -1, err
	}
	if ctx.Err() != nil {
		return -1, &vmexec.AbortedError{Cause: context.Cause(ctx)}
	}
	s := c.takeSpare(ctx, shell)
	if s == nil {
		if s, err = c.openExec(ctx, "stream", streamCommand(shell)); err != nil {
			return -1, err
		}
	}
	defer s.ch.Close()
	var mu sync.Mutex
	stdout := &syncWriter{mu: &mu, w: cmd.Stdout}
	stderr := &syncWriter{mu: &mu, w: cmd.Stderr}
	defer stdout.stop()
	defer stderr.stop()
	outDone, errDone := make(chan struct{}), make(chan struct{})
	go func() { io.Copy(stdout, s.ch); close(outDone) }()          // ends at EOF or channel close
	go func() { io.Copy(stderr, s.ch.Stderr()); close(errDone) }() // ends at EOF or channel close
	var payload bytes.Buffer
	payload.WriteString("{\n")
	for _, v := range env {
		fmt.Fprintf(&payload, "export %s=%s\n", v.Name, quote(v.Value))
	}
	payload.WriteString(cmd.Script)
	payload.WriteString("\n} </dev/null\n")
	go func() { // ends when written or the channel closes
		s.ch.Write(payload.Bytes())
		s.ch.CloseWrite()
	}()
	select {
	case <-s.got:
	case <-s.closed:
		if !s.exited() {
			return -1, &vmexec.SystemError{Op: "stream", Err: c.endedWithoutStatus()}
		}
	case <-ctx.Done():
		return -1, &vmexec.AbortedError{Cause: context.Cause(ctx)}
	case <-c.done:
		return -1, &vmexec.SystemError{Op: "stream", Err: c.Err()}
	}
	// The output may still be in flight: a bounded wait for it.
	drain := time.NewTimer(c.t.DrainTimeout)
	defer drain.Stop()
	for _, d := range []chan struct{}{outDone, errDone} {
		select {
		case <-d:
		case <-drain.C:
		case <-c.done:
		}
	}
	if err := errors.Join(stdout.firstErr(), stderr.firstErr()); err != nil {
		return s.code, &vmexec.SystemError{Op: "stream: write output", Err: err}
	}
	return s.code, nil
}

// checkCommand returns cmd's shell (DefaultShell when unset) and parsed
// environment, or a *vmexec.SystemError for operation op naming the field
// that is wrong.
func checkCommand(op string, cmd vmexec.Command) (string, []vmexec.EnvVar, error) {
	shell := cmd.Shell
	if shell == "" {
		shell = DefaultShell
	}
	if !shellName.MatchString(shell) {
		return "", nil, &vmexec.SystemError{Op: op, Err: fmt.Errorf(
			"Command.Shell %q: want a program name or path without spaces or quotes", shell)}
	}
	env, err := vmexec.ParseEnv(cmd.Env)
	if err != nil {
		return "", nil, &vmexec.SystemError{Op: op, Err: fmt.Errorf("Command.Env: %w", err)}
	}
	return shell, env, nil
}
