package sshexec

import (
	"context"
	"sync"
)

// spareShell is a session started ahead of need: its shell runs and waits
// for a script on its stdin (see PrestartShell).
type spareShell struct {
	shell string
	ready chan struct{} // closed when s or err is set
	s     *session
	err   error
}

// spareState is the Client's one spare shell, if any.
type spareState struct {
	mu    sync.Mutex
	spare *spareShell
}

// PrestartShell starts, in the background, a session whose shell (sh,
// bash, ...) waits for the script of the next Stream with that shell, so
// that the Stream does not wait for the session to open and the shell to
// start: on a warm connection, the first stage of a job starts at once.
// A spare that died meanwhile is not used. There is one spare at a time;
// Close ends it with the connection.
func (c *Client) PrestartShell(shell string) {
	if !shellName.MatchString(shell) || c.Err() != nil {
		return
	}
	c.spares.mu.Lock()
	defer c.spares.mu.Unlock()
	if c.spares.spare != nil {
		return
	}
	sp := &spareShell{shell: shell, ready: make(chan struct{})}
	c.spares.spare = sp
	c.wg.Add(1)
	go func() { // ends when the session opened or failed to: bounded by the connection
		defer c.wg.Done()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go func() { // ends with the open
			select {
			case <-c.done:
				cancel()
			case <-ctx.Done():
			}
		}()
		s, err := c.openExec(ctx, "stream", streamCommand(shell))
		sp.s, sp.err = s, err
		close(sp.ready)
		if err != nil {
			c.log.Debug("spare shell not started", "shell", shell, "err", err)
		}
	}()
}

// takeSpare returns the spare session for shell when there is one that
// still runs, waiting for one being opened while ctx allows. The caller
// owns it.
func (c *Client) takeSpare(ctx context.Context, shell string) *session {
	c.spares.mu.Lock()
	sp := c.spares.spare
	if sp == nil || sp.shell != shell {
		c.spares.mu.Unlock()
		return nil
	}
	c.spares.spare = nil
	c.spares.mu.Unlock()
	select {
	case <-sp.ready:
	case <-ctx.Done():
		go func() { // ends when the open ends
			<-sp.ready
			if sp.s != nil {
				sp.s.ch.Close()
			}
		}()
		return nil
	}
	if sp.err != nil {
		return nil
	}
	select {
	case <-sp.s.closed: // its channel closed while it waited
	case <-sp.s.got: // the shell exited while it waited
	default:
		return sp.s
	}
	sp.s.ch.Close()
	return nil
}

// streamCommand is the exec request of a Stream: the shell reads its
// script from stdin.
func streamCommand(shell string) string { return "exec " + shell + " -s" }
