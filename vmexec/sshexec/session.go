package sshexec

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"
	"sync"
	"time"

	"github.com/mayfly-ci/mayfly/vmexec"
	"golang.org/x/crypto/ssh"
)

// session is one exec channel with its exit status watched.
type session struct {
	ch     ssh.Channel
	got    chan struct{} // closed when exit-status or exit-signal arrived
	closed chan struct{} // closed when the channel's requests ended (channel closed)
	code   int
	signal string
}

// openExec opens a session channel and starts command, giving up when ctx ends.
func (c *Client) openExec(ctx context.Context, op, command string) (*session, error) {
	type result struct {
		s   *session
		err error
	}
	r := make(chan result, 1)
	go func() { // ends when the server answers or the connection closes
		for attempt := 1; ; attempt++ {
			ch, reqs, err := c.client.OpenChannel("session", nil)
			if err != nil {
				r <- result{nil, err}
				return
			}
			s := watch(ch, reqs)
			ok, err := ch.SendRequest("exec", true, ssh.Marshal(struct{ Command string }{command}))
			if err == nil && !ok {
				err = errors.New("server refused the exec request")
			}
			if err == nil {
				r <- result{s, nil}
				return
			}
			ch.Close()
			// dropbear sometimes closes a new session before it answers
			// the exec request while another session of the connection
			// ends. Nothing ran: the command's input, which is all it
			// runs, is only sent once the request is accepted. Try again.
			if !errors.Is(err, io.EOF) || attempt == maxExecAttempts || c.Err() != nil || ctx.Err() != nil {
				r <- result{nil, err}
				return
			}
			c.log.Debug("ssh session closed before its exec request was answered; retrying", "attempt", attempt)
			time.Sleep(time.Duration(attempt) * 10 * time.Millisecond)
		}
	}()
	select {
	case x := <-r:
		if x.err != nil {
			return nil, &vmexec.SystemError{Op: op, Err: c.connErr(x.err)}
		}
		return x.s, nil
	case <-ctx.Done():
		go func() { // close the channel if it opens after all
			if x := <-r; x.s != nil {
				x.s.ch.Close()
			}
		}()
		return nil, &vmexec.AbortedError{Cause: context.Cause(ctx), Killed: true}
	case <-c.done:
		return nil, &vmexec.SystemError{Op: op, Err: c.Err()}
	}
}

// watch consumes the channel's requests, which must always be read, and
// records the exit status or signal.
func watch(ch ssh.Channel, reqs <-chan *ssh.Request) *session {
	s := &session{ch: ch, got: make(chan struct{}), closed: make(chan struct{})}
	go func() { // ends when the channel closes
		defer close(s.closed)
		seen := false
		for req := range reqs {
			switch req.Type {
			case "exit-status":
				if !seen && len(req.Payload) >= 4 {
					s.code = int(binary.BigEndian.Uint32(req.Payload))
					seen = true
					close(s.got)
				}
			case "exit-signal":
				var sig struct {
					Signal     string
					CoreDumped bool
					Error      string
					Lang       string
				}
				if !seen && ssh.Unmarshal(req.Payload, &sig) == nil {
					s.code, s.signal = 128+signalNumber(sig.Signal), sig.Signal
					seen = true
					close(s.got)
				}
			}
			if req.WantReply {
				req.Reply(false, nil)
			}
		}
	}()
	return s
}

// exited reports whether the exit status arrived.
func (s *session) exited() bool {
	select {
	case <-s.got:
		return true
	default:
		return false
	}
}

// signalNumber maps RFC 4254 signal names to Linux numbers; unknown gives 0.
func signalNumber(name string) int {
	switch name {
	case "HUP":
		return 1
	case "INT":
		return 2
	case "QUIT":
		return 3
	case "ILL":
		return 4
	case "ABRT":
		return 6
	case "FPE":
		return 8
	case "KILL":
		return 9
	case "USR1":
		return 10
	case "SEGV":
		return 11
	case "USR2":
		return 12
	case "PIPE":
		return 13
	case "ALRM":
		return 14
	case "TERM":
		return 15
	}
	return 0
}

// exec runs a helper command with stdin, collecting a bounded amount of stderr.
func (c *Client) exec(ctx context.Context, op, command string, stdin []byte) (code int, stderr string, err error) {
	s, err := c.openExec(ctx, op, command)
	if err != nil {
		return -1, "", err
	}
	defer s.ch.Close()
	var mu sync.Mutex
	errBuf := &capWriter{max: maxStderr}
	outDone, errDone := make(chan struct{}), make(chan struct{})
	go func() { io.Copy(io.Discard, s.ch); close(outDone) }()
	go func() {
		w := &syncWriter{mu: &mu, w: errBuf}
		io.Copy(w, s.ch.Stderr())
		close(errDone)
	}()
	go func() { // ends when written or the channel closes
		if len(stdin) > 0 {
			s.ch.Write(stdin)
		}
		s.ch.CloseWrite()
	}()
	select {
	case <-s.got:
		// Let stderr drain for the error message, briefly.
		tm := time.NewTimer(time.Second)
		select {
		case <-errDone:
		case <-tm.C:
		case <-c.done:
		}
		tm.Stop()
		mu.Lock()
		defer mu.Unlock()
		return s.code, errBuf.String(), nil
	case <-s.closed:
		if s.exited() {
			mu.Lock()
			defer mu.Unlock()
			return s.code, errBuf.String(), nil
		}
		return -1, "", &vmexec.SystemError{Op: op, Err: c.endedWithoutStatus()}
	case <-ctx.Done():
		return -1, "", &vmexec.AbortedError{Cause: context.Cause(ctx)}
	case <-c.done:
		return -1, "", &vmexec.SystemError{Op: op, Err: c.Err()}
	}
}

// capWriter keeps the first max bytes written to it.
type capWriter struct {
	max int
	b   []byte
}

func (w *capWriter) Write(p []byte) (int, error) {
	if room := w.max - len(w.b); room > 0 {
		w.b = append(w.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

func (w *capWriter) String() string { return strings.TrimSpace(string(w.b)) }

// Upload writes content to path with the permission bits of mode, through a
// temporary file renamed into place only when every byte arrived.
func (c *Client) Upload(ctx context.Context, path string, content []byte, mode fs.FileMode) error {
	if err := validateUploadPath(path); err != nil {
		return &vmexec.SystemError{Op: "upload", Err: err}
	}
	op := "upload " + path
	code, stderr, err := c.exec(ctx, op, uploadCommand(path, len(content), uint32(mode.Perm())), content)
	if err != nil {
		return err
	}
	if code != 0 {
		return &vmexec.SystemError{Op: op, Err: fmt.Errorf("remote exit status %d: %s", code, stderr)}
	}
	return nil
}
