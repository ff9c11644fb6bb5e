package winrm

import (
	"context"
	"encoding/base64"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/masterzen/winrm"
	"github.com/masterzen/winrm/soap"

	"github.com/mayfly-ci/mayfly/vmexec"
)

// Run runs cmd.Script with cmd.Shell (default "powershell"; "pwsh" or a path
// to either) in a new shell and streams its output to cmd.Stdout and
// cmd.Stderr as the server returns it. It returns the script's exit code with
// a nil error when the script finished, whatever the code. When ctx ends
// first, the command gets the terminate signal, the shell is deleted, and Run
// returns a *vmexec.AbortedError. Transport failures give a
// *vmexec.SystemError. No write reaches cmd.Stdout or cmd.Stderr after Run
// returned.
func (c *Client) Run(ctx context.Context, cmd vmexec.Command) (int, error) {
	shell, err := checkShell(cmd.Shell)
	if err != nil {
		return -1, &vmexec.SystemError{Op: "run", Err: err}
	}
	env, err := vmexec.ParseEnv(cmd.Env)
	if err != nil {
		return -1, &vmexec.SystemError{Op: "run", Err: fmt.Errorf("Command.Env: %w", err)}
	}
	prog, err := program(env, cmd.Script)
	if err != nil {
		return -1, &vmexec.SystemError{Op: "run", Err: fmt.Errorf("Command: %w", err)}
	}
	line, err := encodeCommand(shell, prelude()+loaderBody)
	if err != nil {
		return -1, &vmexec.SystemError{Op: "run", Err: err}
	}
	if ctx.Err() != nil {
		return -1, &vmexec.AbortedError{Cause: context.Cause(ctx), Killed: true}
	}
	if !c.begin() {
		return -1, &vmexec.SystemError{Op: "run", Err: ErrClosed}
	}
	defer c.ops.Done()
	octx, done := c.opContext(ctx)
	defer done()

	shellID, err := c.createShell(octx)
	if err != nil {
		// Nothing was started: no process can survive.
		return -1, c.failure(ctx, "run", err, nil)
	}
	out := &outputs{stdout: cmd.Stdout, stderr: cmd.Stderr}
	code, err := c.execute(octx, shellID, line, base64Lines([]byte(prog)), out)
	if err != nil {
		kerr := c.kill(shellID, err)
		return -1, c.failure(ctx, "run", err, &kerr)
	}
	kctx, cancel := c.killContext()
	defer cancel()
	if err := c.deleteShell(kctx, shellID); err != nil {
		c.log.Warn("winrm delete shell after run", "shell", shellID, "err", err)
	}
	if out.err != nil {
		return code, &vmexec.SystemError{Op: "run: write output", Err: out.err}
	}
	return code, nil
}

// failure classifies err of an operation: an *vmexec.AbortedError when ctx
// ended, a *vmexec.SystemError otherwise. kerr, when not nil, is the result of
// killing the remote processes.
func (c *Client) failure(ctx context.Context, op string, err error, kerr *error) error {
	if ctx.Err() != nil {
		ae := &vmexec.AbortedError{Cause: context.Cause(ctx), Killed: true}
		if kerr != nil && *kerr != nil {
			ae.Killed, ae.KillErr = false, *kerr
		}
		return ae
	}
	if c.closeCtx.Err() != nil {
		err = ErrClosed
	}
	if kerr != nil && *kerr != nil {
		err = fmt.Errorf("%w (remote processes may survive: %v)", err, *kerr)
	}
	return &vmexec.SystemError{Op: op, Err: err}
}

// kill ends the processes of a shell whose command failed or was aborted:
// the shell's deletion ends every process in it, so the terminate signal is
// only a courtesy. Bounded by KillTimeout.
func (c *Client) kill(shellID string, cause error) error {
	kctx, cancel := c.killContext()
	defer cancel()
	var ce *commandError
	if errors.As(cause, &ce) && ce.commandID != "" {
		_, err := c.post(kctx, winrm.NewSignalRequest(c.url, shellID, ce.commandID, c.params), c.t.RequestTimeout)
		if err != nil && !isNotFound(err) {
			c.log.Debug("winrm terminate signal", "shell", shellID, "command", ce.commandID, "err", err)
		}
	}
	if err := c.deleteShell(kctx, shellID); err != nil {
		c.log.Warn("winrm could not delete the shell of an interrupted command", "shell", shellID, "err", err)
		return err
	}
	return nil
}

// commandError is a failure after the command started, carrying its id so
// that it can be signalled.
type commandError struct {
	commandID string
	err       error
}

func (e *commandError) Error() string { return e.err.Error() }
func (e *commandError) Unwrap() error { return e.err }

// outputs forwards a command's streams to the caller's writers. All writes
// happen on the goroutine of the operation, so they are serialized; after a
// write error the stream is still drained and the first error kept.
type outputs struct {
	stdout, stderr io.Writer
	err            error
}

func (o *outputs) write(stream string, p []byte) {
	w := o.stdout
	if stream == "stderr" {
		w = o.stderr
	}
	if w == nil || o.err != nil || len(p) == 0 {
		return
	}
	if _, err := w.Write(p); err != nil {
		o.err = fmt.Errorf("%s: %w", stream, err)
	}
}

// execute runs one command line in a shell: starts it, sends stdin and
// closes it, then receives output until the command is done, and sends the
// final terminate signal the protocol asks for. Errors after the command
// started are *commandError.
func (c *Client) execute(ctx context.Context, shellID, line string, stdin []byte, out *outputs) (int, error) {
	resp, err := c.post(ctx, c.newCommandRequest(shellID, line), c.t.RequestTimeout)
	if err != nil {
		// The command may have started if the reply was lost; deleting the shell ends it.
		return -1, &commandError{err: fmt.Errorf("start command: %w", err)}
	}
	cmdID, err := winrm.ParseExecuteCommandResponse(string(resp))
	cmdID = strings.TrimSpace(cmdID)
	if err != nil || cmdID == "" {
		return -1, &commandError{err: fmt.Errorf("start command: no CommandId in the response (%v)", err)}
	}
	if err := c.sendInput(ctx, shellID, cmdID, stdin); err != nil {
		return -1, &commandError{commandID: cmdID, err: err}
	}
	code, err := c.receive(ctx, shellID, cmdID, out)
	if err != nil {
		return -1, &commandError{commandID: cmdID, err: err}
	}
	// [MS-WSMV] 3.1.4.14: a Signal must follow the last Receive of a command.
	if _, err := c.post(ctx, winrm.NewSignalRequest(c.url, shellID, cmdID, c.params), c.t.RequestTimeout); err != nil && !isNotFound(err) {
		c.log.Debug("winrm final signal", "shell", shellID, "command", cmdID, "err", err)
	}
	return code, nil
}

// newCommandRequest is winrm.NewExecuteCommandRequest with stdin as a pipe.
// masterzen sets WINRS_CONSOLEMODE_STDIN to TRUE, with which WinRM hands
// stdin to the process as console input; every command here reads its
// stdin as piped data, so the option is FALSE, as pywinrm's users (Ansible)
// set it when they send stdin. cmd.exe still starts the command.
func (c *Client) newCommandRequest(shellID, line string) *soap.SoapMessage {
	msg := soap.NewMessage()
	msg.Header().
		To(c.url).
		ReplyTo("http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous").
		MaxEnvelopeSize(c.params.EnvelopeSize).
		Id("uuid:" + newUUID()).
		Locale(c.params.Locale).
		Timeout(c.params.Timeout).
		Action("http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Command").
		ResourceURI("http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd").
		ShellId(shellID).
		AddOption(soap.NewHeaderOption("WINRS_CONSOLEMODE_STDIN", "FALSE")).
		AddOption(soap.NewHeaderOption("WINRS_SKIP_CMD_SHELL", "FALSE")).
		Build()
	body := msg.CreateBodyElement("CommandLine", soap.DOM_NS_WIN_SHELL)
	// The line is checked to hold nothing but a program path, flags and base64.
	msg.CreateElement(body, "Command", soap.DOM_NS_WIN_SHELL).SetContent("<![CDATA[" + line + "]]>")
	return msg
}

// sendInput sends data on stdin in messages that fit MaxEnvelopeSize, the
// last one marked End.
func (c *Client) sendInput(ctx context.Context, shellID, cmdID string, data []byte) error {
	per := (c.t.MaxEnvelopeSize - 4096) / 4 * 3
	for first := true; first || len(data) > 0; first = false {
		n := min(per, len(data))
		last := n == len(data)
		msg := winrm.NewSendInputRequest(c.url, shellID, cmdID, data[:n], last, c.params)
		if _, err := c.post(ctx, msg, c.t.RequestTimeout); err != nil {
			return fmt.Errorf("send stdin: %w", err)
		}
		data = data[n:]
	}
	return nil
}

type receiveEnvelope struct {
	Body struct {
		Response *receiveResponse `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell ReceiveResponse"`
	} `xml:"http://www.w3.org/2003/05/soap-envelope Body"`
}

type receiveResponse struct {
	Streams []struct {
		Name      string `xml:"Name,attr"`
		CommandID string `xml:"CommandId,attr"`
		End       string `xml:"End,attr"`
		Data      string `xml:",chardata"`
	} `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell Stream"`
	State *struct {
		CommandID string  `xml:"CommandId,attr"`
		State     string  `xml:"State,attr"`
		ExitCode  *string `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell ExitCode"`
	} `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell CommandState"`
}

const stateDone = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Done"

// receive polls output until the command is done. The server holds each
// Receive up to OperationTimeout; a w:TimedOut fault only means there was no
// output meanwhile. The loop ends when the command is done or ctx ends.
func (c *Client) receive(ctx context.Context, shellID, cmdID string, out *outputs) (int, error) {
	timeout := c.t.OperationTimeout + c.t.RequestTimeout
	for {
		msg := winrm.NewGetOutputRequest(c.url, shellID, cmdID, "stdout stderr", c.params)
		resp, err := c.post(ctx, msg, timeout)
		var fe *FaultError
		if errors.As(err, &fe) && fe.TimedOut() {
			continue
		}
		if err != nil {
			return -1, fmt.Errorf("receive output: %w", err)
		}
		var env receiveEnvelope
		if err := xml.Unmarshal(resp, &env); err != nil {
			return -1, fmt.Errorf("receive output: %w", err)
		}
		rr := env.Body.Response
		if rr == nil {
			return -1, errors.New("receive output: no ReceiveResponse in the response")
		}
		for _, st := range rr.Streams {
			if st.CommandID != "" && st.CommandID != cmdID {
				continue
			}
			data, err := base64.StdEncoding.DecodeString(strings.TrimSpace(st.Data))
			if err != nil {
				return -1, fmt.Errorf("receive output: %s stream: %w", st.Name, err)
			}
			out.write(st.Name, data)
		}
		if s := rr.State; s != nil && s.State == stateDone && (s.CommandID == "" || s.CommandID == cmdID) {
			if s.ExitCode == nil {
				return -1, errors.New("receive output: command done without an exit code")
			}
			code, err := strconv.ParseInt(strings.TrimSpace(*s.ExitCode), 10, 64)
			if err != nil {
				return -1, fmt.Errorf("receive output: exit code %q: %w", *s.ExitCode, err)
			}
			return int(code), nil
		}
	}
}
