// Package wsmantest is a WS-Management server for tests that follows the
// WinRM remote shell protocol ([MS-WSMV] "Text-based Command Shell") closely
// enough that github.com/masterzen/winrm works against it unmodified: SOAP 1.2
// envelopes over HTTP(S) at /wsman with basic authentication, the actions
// Create and Delete of a shell resource (.../windows/shell/cmd), Command,
// Send (stdin), Receive (stdout and stderr as base64 Stream elements,
// CommandState Running or Done with ExitCode, long-polled up to the request's
// OperationTimeout, then a w:TimedOut fault as Windows does) and Signal
// (terminate, ctrl_c, ctrl_break), and wsman faults for bad requests.
//
// Commands really run on this machine, each in its own process group:
// terminate and shell deletion kill the group with SIGKILL and wait until it
// is gone, ctrl_c and ctrl_break send SIGINT and SIGQUIT. stdout and stderr
// are the process's real pipes, stdin is fed from Send requests, the exit
// code is the process's (128+N when killed by signal N).
//
// A command line whose program is powershell or pwsh runs with pwsh when it
// is installed (or Config.Interpreter is Pwsh), given the same arguments.
// Otherwise (Debian has no pwsh package) it runs with /bin/sh, and it needs
// -EncodedCommand (a wsman fault otherwise). The decoded script is
// translated; nothing else of PowerShell is emulated:
//
//   - Its leading assignments ($name = 'text', $env:NAME = 'text',
//     $name = 123, with PowerShell's single-quote rules; see SplitPrelude)
//     become sh assignments, the $env: ones exported.
//   - The rest, the body, is looked up in Config.Shims by its exact text
//     (blanks around it trimmed). A Shim with Sh runs that sh text in place
//     of the body. A Shim with StdinProgram starts "sh -s" and, once stdin
//     ended, feeds it the translated prelude and then the program decoded
//     from stdin, translated the same way, inside "{ ... } </dev/null".
//   - Any other body runs as it is, with "sh -c": tests send bodies in sh
//     syntax, or choose the script by Server.Interpreter.
//
// Any other command line (cmd.exe syntax on Windows) runs with "sh -c".
// Processes get the server's environment plus Config.Env and start in
// Config.Dir.
package wsmantest

import (
	"context"
	"crypto/subtle"
	"encoding/base64"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Interpreter says how PowerShell command lines run.
type Interpreter string

// Interpreters.
const (
	// Auto picks Pwsh when "pwsh" is on PATH, else Sh.
	Auto Interpreter = ""
	Pwsh Interpreter = "pwsh"
	Sh   Interpreter = "sh"
)

// Defaults applied to zero fields of Config.
const (
	DefaultMaxEnvelopeSize = 512000
	DefaultMaxReceiveWait  = 10 * time.Second
	DefaultWaitDelay       = 2 * time.Second
	defaultOperationWait   = 60 * time.Second
	maxEvents              = 10000
)

// Config configures a Server.
type Config struct {
	// Username and Password are the only basic-auth credentials accepted.
	Username, Password string
	// Interpreter for PowerShell command lines (default Auto).
	Interpreter Interpreter
	// Shims are the sh stand-ins for fixed PowerShell bodies, keyed by the body
	// text (compared with surrounding blanks trimmed and CRLF as LF).
	Shims map[string]Shim
	// Dir is the working directory of commands ("" = the server's).
	Dir string
	// Env holds extra "NAME=value" entries for commands.
	Env []string
	// MaxEnvelopeSize bounds a request body in bytes (default 512000, the
	// default of current Windows).
	MaxEnvelopeSize int
	// MaxReceiveWait caps how long a Receive waits for output before the
	// w:TimedOut fault, below the request's OperationTimeout (default 10s).
	MaxReceiveWait time.Duration
	// WaitDelay is how long output pipes may stay open after a command's
	// process exited (held by its children) before they are closed (default 2s).
	WaitDelay time.Duration
	// Logger receives request logs; nil discards them.
	Logger *slog.Logger
}

// Event records one request the server handled.
type Event struct {
	Action    string
	ShellID   string
	CommandID string
	// Signal is the signal code of a Signal request.
	Signal string
	// Status is the HTTP status answered.
	Status int
	// Fault is the fault subcode when the request failed.
	Fault string
}

// CommandInfo describes a command the server started.
type CommandInfo struct {
	ShellID, CommandID string
	// CommandLine is the command with its arguments as received.
	CommandLine string
	// Argv is what was executed.
	Argv []string
	// PID is the process id, also its process group id.
	PID int
	// Exited reports whether the process was reaped, with its ExitCode
	// (128+N when killed by signal N).
	Exited   bool
	ExitCode int
	// Signals lists the signal codes received for the command.
	Signals []string
	// Options are the wsman:Option headers of the Command request, such as
	// WINRS_CONSOLEMODE_STDIN.
	Options map[string]string
}

// Server is an http.Handler serving WS-Management at /wsman.
type Server struct {
	cfg    Config
	interp Interpreter
	pwsh   string
	log    *slog.Logger

	closing   chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup // process waiters and stdin feeders

	mu      sync.Mutex
	shells  map[string]*shell
	history []*command
	events  []Event
}

type shell struct {
	id   string
	cmds map[string]*command
}

type chunk struct {
	stream string
	data   []byte
}

type command struct {
	id, shellID, line string
	argv              []string
	options           map[string]string
	cmd               *exec.Cmd
	pid               int
	exited            chan struct{} // closed when the process was reaped

	stdinMu      sync.Mutex // serializes stdin writes
	stdin        io.WriteCloser
	program      []byte // stdin collected for a stdin program
	programPre   string // translated loader prelude of a stdin program
	stdinProgram bool

	mu       sync.Mutex
	out      []chunk
	notify   chan struct{} // closed and replaced when out or state changes
	done     bool
	code     int
	gone     bool // terminated or its shell deleted
	signals  []string
	stdinEnd bool
}

// New returns a Server. It starts nothing; serve it with net/http or httptest.
func New(cfg Config) (*Server, error) {
	if cfg.Username == "" {
		return nil, errors.New("wsmantest: Config.Username is empty")
	}
	if cfg.MaxEnvelopeSize <= 0 {
		cfg.MaxEnvelopeSize = DefaultMaxEnvelopeSize
	}
	if cfg.MaxReceiveWait <= 0 {
		cfg.MaxReceiveWait = DefaultMaxReceiveWait
	}
	if cfg.WaitDelay <= 0 {
		cfg.WaitDelay = DefaultWaitDelay
	}
	s := &Server{
		cfg:     cfg,
		log:     cfg.Logger,
		closing: make(chan struct{}),
		shells:  make(map[string]*shell),
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	switch cfg.Interpreter {
	case Auto:
		if p, err := exec.LookPath("pwsh"); err == nil {
			s.interp, s.pwsh = Pwsh, p
		} else {
			s.interp = Sh
		}
	case Pwsh:
		p, err := exec.LookPath("pwsh")
		if err != nil {
			return nil, fmt.Errorf("wsmantest: Config.Interpreter pwsh: %w", err)
		}
		s.interp, s.pwsh = Pwsh, p
	case Sh:
		s.interp = Sh
	default:
		return nil, fmt.Errorf("wsmantest: Config.Interpreter %q: want \"\", %q or %q", cfg.Interpreter, Pwsh, Sh)
	}
	return s, nil
}

// Interpreter returns the interpreter PowerShell command lines run with.
func (s *Server) Interpreter() Interpreter { return s.interp }

// Close kills every command, deletes every shell and waits for the processes.
// Pending Receives are answered with a fault. The Server refuses requests after.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		close(s.closing)
		s.mu.Lock()
		var cmds []*command
		for id, sh := range s.shells {
			for _, c := range sh.cmds {
				cmds = append(cmds, c)
			}
			delete(s.shells, id)
		}
		s.mu.Unlock()
		for _, c := range cmds {
			s.kill(c, syscall.SIGKILL)
			c.markGone()
		}
	})
	s.wg.Wait()
}

// Events returns the requests handled so far, oldest first.
func (s *Server) Events() []Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Event(nil), s.events...)
}

// Commands returns every command started so far, oldest first.
func (s *Server) Commands() []CommandInfo {
	s.mu.Lock()
	hist := append([]*command(nil), s.history...)
	s.mu.Unlock()
	out := make([]CommandInfo, 0, len(hist))
	for _, c := range hist {
		c.mu.Lock()
		out = append(out, CommandInfo{
			ShellID: c.shellID, CommandID: c.id, CommandLine: c.line,
			Argv: append([]string(nil), c.argv...), PID: c.pid,
			Exited: c.done, ExitCode: c.code, Signals: append([]string(nil), c.signals...),
			Options: maps.Clone(c.options),
		})
		c.mu.Unlock()
	}
	return out
}

// OpenShells returns the number of shells created and not yet deleted.
func (s *Server) OpenShells() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.shells)
}

func (s *Server) record(e Event) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.events) < maxEvents {
		s.events = append(s.events, e)
	}
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/wsman" {
		http.NotFound(w, r)
		return
	}
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	user, pass, ok := r.BasicAuth()
	if !ok || subtle.ConstantTimeCompare([]byte(user), []byte(s.cfg.Username)) != 1 ||
		subtle.ConstantTimeCompare([]byte(pass), []byte(s.cfg.Password)) != 1 {
		io.Copy(io.Discard, io.LimitReader(r.Body, int64(s.cfg.MaxEnvelopeSize)))
		w.Header().Set("WWW-Authenticate", `Basic realm="WSMAN"`)
		w.Header().Set("Content-Length", "0")
		w.WriteHeader(http.StatusUnauthorized)
		s.record(Event{Status: http.StatusUnauthorized})
		s.log.Info("wsman request unauthorized", "user", user, "remote", r.RemoteAddr)
		return
	}
	if ct := r.Header.Get("Content-Type"); !strings.Contains(strings.ToLower(ct), "application/soap+xml") {
		http.Error(w, "want Content-Type application/soap+xml", http.StatusUnsupportedMediaType)
		s.record(Event{Status: http.StatusUnsupportedMediaType})
		return
	}
	select {
	case <-s.closing:
		writeFault(w, "", faultInternal("the server is shutting down"))
		return
	default:
	}
	raw, err := io.ReadAll(http.MaxBytesReader(w, r.Body, int64(s.cfg.MaxEnvelopeSize)))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			s.fail(w, "", Event{}, faultEncodingLimit(s.cfg.MaxEnvelopeSize))
			return
		}
		return // client went away
	}
	var env reqEnvelope
	if err := xml.Unmarshal(raw, &env); err != nil {
		s.fail(w, "", Event{}, faultInvalid("The request is not a valid SOAP envelope: %v", err))
		return
	}
	h := &env.Header
	h.Action = strings.TrimSpace(h.Action)
	h.MessageID = strings.TrimSpace(h.MessageID)
	ev := Event{Action: h.Action, ShellID: h.selector("ShellId")}
	if h.MessageID == "" {
		s.fail(w, "", ev, faultInvalid("The request has no a:MessageID header."))
		return
	}
	if uri := strings.TrimSpace(h.ResourceURI); uri != ResourceCmd {
		s.fail(w, h.MessageID, ev, faultResource(uri))
		return
	}
	if v := strings.TrimSpace(h.MaxEnvelopeSize); v != "" {
		if n, err := strconv.Atoi(v); err != nil || n < 8192 {
			s.fail(w, h.MessageID, ev, faultInvalid("MaxEnvelopeSize %q is not a number of at least 8192.", v))
			return
		}
	}
	var body string
	var f *Fault
	switch h.Action {
	case ActionCreate:
		body, ev.ShellID, f = s.create(r, &env)
	case ActionDelete:
		f = s.deleteShell(ev.ShellID)
	case ActionCommand:
		body, ev.CommandID, f = s.command(&env)
	case ActionSend:
		body, ev.CommandID, f = s.send(&env)
	case ActionReceive:
		body, ev.CommandID, f = s.receive(r.Context(), &env)
		if f == nil && body == "" {
			return // client went away
		}
	case ActionSignal:
		if env.Body.Signal != nil {
			ev.CommandID = strings.TrimSpace(env.Body.Signal.CommandID)
			ev.Signal = strings.TrimSpace(env.Body.Signal.Code)
		}
		body, f = s.signal(&env)
	default:
		f = faultAction(h.Action)
	}
	if f != nil {
		s.fail(w, h.MessageID, ev, f)
		return
	}
	ev.Status = http.StatusOK
	s.record(ev)
	writeEnvelope(w, http.StatusOK, h.Action+"Response", h.MessageID, body)
}

func (s *Server) fail(w http.ResponseWriter, relatesTo string, ev Event, f *Fault) {
	ev.Status, ev.Fault = http.StatusInternalServerError, f.Subcode
	s.record(ev)
	if f.Subcode != "w:TimedOut" {
		s.log.Info("wsman fault", "action", ev.Action, "shell", ev.ShellID, "fault", f.Subcode, "reason", f.Reason)
	}
	writeFault(w, relatesTo, f)
}

func (s *Server) create(r *http.Request, env *reqEnvelope) (string, string, *Fault) {
	if env.Body.Shell == nil {
		return "", "", faultInvalid("Create of a shell needs an rsp:Shell body.")
	}
	in := strings.Fields(env.Body.Shell.InputStreams)
	out := strings.Fields(env.Body.Shell.OutputStreams)
	if len(out) == 0 {
		out = []string{"stdout", "stderr"}
	}
	for _, o := range out {
		if o != "stdout" && o != "stderr" {
			return "", "", faultInvalid("OutputStreams %q: only stdout and stderr are supported.", o)
		}
	}
	for _, i := range in {
		if i != "stdin" {
			return "", "", faultInvalid("InputStreams %q: only stdin is supported.", i)
		}
	}
	id := newUUID()
	s.mu.Lock()
	s.shells[id] = &shell{id: id, cmds: make(map[string]*command)}
	s.mu.Unlock()
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	user, _, _ := r.BasicAuth()
	body := `<x:ResourceCreated><a:Address>` + esc(scheme+"://"+r.Host+"/wsman") +
		`</a:Address><a:ReferenceParameters><w:ResourceURI>` + ResourceCmd +
		`</w:ResourceURI><w:SelectorSet><w:Selector Name="ShellId">` + id +
		`</w:Selector></w:SelectorSet></a:ReferenceParameters></x:ResourceCreated>` +
		`<rsp:Shell><rsp:ShellId>` + id + `</rsp:ShellId><rsp:ResourceUri>` + ResourceCmd +
		`</rsp:ResourceUri><rsp:Owner>` + esc(user) + `</rsp:Owner><rsp:ClientIP>` + esc(hostOf(r.RemoteAddr)) +
		`</rsp:ClientIP><rsp:IdleTimeOut>PT7200.000S</rsp:IdleTimeOut><rsp:InputStreams>stdin</rsp:InputStreams>` +
		`<rsp:OutputStreams>stdout stderr</rsp:OutputStreams></rsp:Shell>`
	return body, id, nil
}

func hostOf(addr string) string {
	if i := strings.LastIndexByte(addr, ':'); i >= 0 {
		return strings.Trim(addr[:i], "[]")
	}
	return addr
}

func (s *Server) shell(id string) (*shell, *Fault) {
	if id == "" {
		return nil, faultInvalid("The request has no ShellId selector.")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sh, ok := s.shells[id]
	if !ok {
		return nil, faultShellNotFound(id)
	}
	return sh, nil
}

func (s *Server) lookup(shellID, cmdID string) (*command, *Fault) {
	sh, f := s.shell(shellID)
	if f != nil {
		return nil, f
	}
	if cmdID == "" {
		return nil, faultInvalid("The request has no CommandId.")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := sh.cmds[cmdID]
	if !ok {
		return nil, faultCommandNotFound(cmdID)
	}
	return c, nil
}

func (s *Server) deleteShell(id string) *Fault {
	if id == "" {
		return faultInvalid("The request has no ShellId selector.")
	}
	s.mu.Lock()
	sh, ok := s.shells[id]
	delete(s.shells, id)
	s.mu.Unlock()
	if !ok {
		return faultShellNotFound(id)
	}
	for _, c := range sh.cmds {
		s.kill(c, syscall.SIGKILL)
		s.waitExit(c)
		c.markGone()
	}
	return nil
}

// command starts a process for a Command request.
func (s *Server) command(env *reqEnvelope) (string, string, *Fault) {
	shellID := env.Header.selector("ShellId")
	sh, f := s.shell(shellID)
	if f != nil {
		return "", "", f
	}
	cl := env.Body.CommandLine
	if cl == nil || strings.TrimSpace(cl.Command) == "" {
		return "", "", faultInvalid("Command needs an rsp:CommandLine with a non-empty rsp:Command.")
	}
	line := strings.TrimSpace(cl.Command)
	for _, a := range cl.Arguments {
		line += " " + a
	}
	argv, tr, f := s.argv(line)
	if f != nil {
		return "", "", f
	}
	opts := make(map[string]string)
	for _, o := range env.Header.OptionSet.Options {
		opts[o.Name] = strings.TrimSpace(o.Value)
	}
	c := &command{
		id: newUUID(), shellID: shellID, line: line, argv: argv, options: opts,
		exited: make(chan struct{}), notify: make(chan struct{}),
		stdinProgram: tr.stdinProgram, programPre: tr.sh,
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = s.cfg.Dir
	cmd.Env = append(os.Environ(), s.cfg.Env...)
	cmd.Stdout = &streamWriter{c: c, name: "stdout"}
	cmd.Stderr = &streamWriter{c: c, name: "stderr"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.WaitDelay = s.cfg.WaitDelay
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return "", "", faultInternal("stdin pipe: %v", err)
	}
	c.stdin, c.cmd = stdin, cmd
	s.mu.Lock()
	if _, ok := s.shells[shellID]; !ok {
		s.mu.Unlock()
		return "", "", faultShellNotFound(shellID)
	}
	if err := cmd.Start(); err != nil {
		s.mu.Unlock()
		return "", "", faultInternal("start %s: %v", argv[0], err)
	}
	c.pid = cmd.Process.Pid
	sh.cmds[c.id] = c
	s.history = append(s.history, c)
	s.wg.Add(1)
	s.mu.Unlock()
	go s.wait(c) // ends when the process is reaped
	s.log.Debug("wsman command started", "shell", shellID, "command", c.id, "pid", c.pid, "argv0", argv[0])
	return `<rsp:CommandResponse><rsp:CommandId>` + c.id + `</rsp:CommandId></rsp:CommandResponse>`, c.id, nil
}

// argv maps a Windows command line to a process on this machine.
func (s *Server) argv(line string) ([]string, translation, *Fault) {
	cl := splitCommandLine(line)
	if !isPowerShell(cl.program) {
		return []string{"/bin/sh", "-c", line}, translation{}, nil
	}
	enc, ok := encodedCommand(cl.args)
	if s.interp == Pwsh {
		return append([]string{s.pwsh}, cl.args...), translation{}, nil
	}
	if !ok {
		return nil, translation{}, faultInvalid(
			"wsmantest runs PowerShell with sh (pwsh is not installed) and only supports -EncodedCommand: %.200s", line)
	}
	script, err := DecodeEncodedCommand(enc)
	if err != nil {
		return nil, translation{}, faultInvalid("%v", err)
	}
	tr, err := translate(script, s.cfg.Shims, false)
	if err != nil {
		return nil, translation{}, faultInvalid("%v", err)
	}
	if tr.stdinProgram {
		return []string{"/bin/sh", "-s"}, tr, nil
	}
	return []string{"/bin/sh", "-c", tr.sh}, tr, nil
}

func (s *Server) wait(c *command) {
	defer s.wg.Done()
	err := c.cmd.Wait()
	code := 0
	if ps := c.cmd.ProcessState; ps != nil {
		if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			code = 128 + int(ws.Signal())
		} else {
			code = ps.ExitCode()
		}
	} else if err != nil {
		code = 1
	}
	c.mu.Lock()
	c.done, c.code = true, code
	c.changed()
	c.mu.Unlock()
	close(c.exited)
	s.log.Debug("wsman command exited", "command", c.id, "pid", c.pid, "code", code)
}

// waitExit waits for the process to be reaped, bounded: exec's WaitDelay
// guarantees Wait returns soon after the process is gone.
func (s *Server) waitExit(c *command) {
	t := time.NewTimer(s.cfg.WaitDelay + 10*time.Second)
	defer t.Stop()
	select {
	case <-c.exited:
	case <-t.C:
		s.log.Warn("wsman command not reaped after kill", "command", c.id, "pid", c.pid)
	}
}

// kill signals the command's process group; SIGKILL waits until it is gone.
func (s *Server) kill(c *command, sig syscall.Signal) {
	if !killGroup(c.pid, sig, 5*time.Second) {
		s.log.Warn("wsman process group survived SIGKILL", "command", c.id, "pgid", c.pid)
	}
}

// changed wakes Receives waiting on c; c.mu must be held.
func (c *command) changed() {
	close(c.notify)
	c.notify = make(chan struct{})
}

func (c *command) markGone() {
	c.mu.Lock()
	c.gone = true
	c.changed()
	c.mu.Unlock()
	c.stdinMu.Lock()
	c.stdin.Close()
	c.stdinMu.Unlock()
}

// streamWriter appends process output to a command's buffer.
type streamWriter struct {
	c    *command
	name string
}

func (w *streamWriter) Write(p []byte) (int, error) {
	w.c.mu.Lock()
	defer w.c.mu.Unlock()
	w.c.out = append(w.c.out, chunk{w.name, append([]byte(nil), p...)})
	w.c.changed()
	return len(p), nil
}

func (s *Server) send(env *reqEnvelope) (string, string, *Fault) {
	snd := env.Body.Send
	if snd == nil || len(snd.Streams) == 0 {
		return "", "", faultInvalid("Send needs an rsp:Send body with an rsp:Stream.")
	}
	var cmdID string
	for _, st := range snd.Streams {
		cmdID = strings.TrimSpace(st.CommandID)
		if st.Name != "stdin" {
			return "", cmdID, faultInvalid("Send: stream %q is not an input stream.", st.Name)
		}
		c, f := s.lookup(env.Header.selector("ShellId"), cmdID)
		if f != nil {
			return "", cmdID, f
		}
		data, err := base64.StdEncoding.DecodeString(strings.TrimSpace(st.Data))
		if err != nil {
			return "", cmdID, faultInvalid("Send: stream data is not base64: %v", err)
		}
		end := st.End == "true" || st.End == "1"
		if f := s.feed(c, data, end); f != nil {
			return "", cmdID, f
		}
	}
	return `<rsp:SendResponse/>`, cmdID, nil
}

// feed writes stdin data to a command, or collects it for a stdin program.
func (s *Server) feed(c *command, data []byte, end bool) *Fault {
	c.stdinMu.Lock()
	defer c.stdinMu.Unlock()
	c.mu.Lock()
	closed := c.stdinEnd
	c.stdinEnd = c.stdinEnd || end
	c.mu.Unlock()
	if closed {
		return faultInvalid("Send: stdin of command %s already ended.", c.id)
	}
	if !c.stdinProgram {
		if len(data) > 0 {
			if _, err := c.stdin.Write(data); err != nil {
				if !errors.Is(err, os.ErrClosed) && !errors.Is(err, syscall.EPIPE) {
					return faultInternal("write stdin of command %s: %v", c.id, err)
				}
				// The process is gone or closed its stdin (exec closes
				// the pipe once it reaped it): nobody reads the data, as
				// for a command that exited on Windows. Its exit code
				// comes with the next Receive.
				s.log.Debug("wsman stdin dropped: the command no longer reads it", "command", c.id, "bytes", len(data), "err", err)
			}
		}
		if end {
			c.stdin.Close()
		}
		return nil
	}
	c.program = append(c.program, data...)
	if !end {
		return nil
	}
	src, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(string(c.program)), ""))
	if err != nil {
		c.stdin.Close()
		return faultInvalid("stdin program of command %s is not base64: %v", c.id, err)
	}
	tr, err := translate(string(src), s.cfg.Shims, true)
	if err != nil {
		c.stdin.Close()
		return faultInvalid("stdin program of command %s: %v", c.id, err)
	}
	text := c.programPre + "{\n" + tr.sh + "\n} </dev/null\n"
	s.wg.Add(1)
	go func(w io.WriteCloser) { // ends when sh read it all or died
		defer s.wg.Done()
		io.WriteString(w, text)
		w.Close()
	}(c.stdin)
	c.program = nil
	return nil
}

func (s *Server) receive(ctx context.Context, env *reqEnvelope) (string, string, *Fault) {
	rcv := env.Body.Receive
	if rcv == nil {
		return "", "", faultInvalid("Receive needs an rsp:Receive body.")
	}
	cmdID := strings.TrimSpace(rcv.DesiredStream.CommandID)
	c, f := s.lookup(env.Header.selector("ShellId"), cmdID)
	if f != nil {
		return "", cmdID, f
	}
	want := map[string]bool{}
	for _, st := range strings.Fields(rcv.DesiredStream.Streams) {
		if st != "stdout" && st != "stderr" {
			return "", cmdID, faultInvalid("Receive: unknown stream %q.", st)
		}
		want[st] = true
	}
	if len(want) == 0 {
		want["stdout"], want["stderr"] = true, true
	}
	wait := defaultOperationWait
	if d, ok := parseDuration(env.Header.OperationTimeout); ok {
		wait = d
	}
	wait = min(wait, s.cfg.MaxReceiveWait)
	limit := 150 * 1024
	if n, err := strconv.Atoi(strings.TrimSpace(env.Header.MaxEnvelopeSize)); err == nil {
		limit = n
	}
	// Base64 grows data by 4/3; leave room for the envelope and element tags.
	limit = max((limit-4096)*3/4, 1024)
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		c.mu.Lock()
		if c.gone {
			c.mu.Unlock()
			return "", cmdID, faultCommandNotFound(cmdID)
		}
		if len(c.out) > 0 || c.done {
			body := c.takeResponse(want, limit)
			c.mu.Unlock()
			return body, cmdID, nil
		}
		ch := c.notify
		c.mu.Unlock()
		select {
		case <-ch:
		case <-timer.C:
			return "", cmdID, faultTimedOut()
		case <-ctx.Done():
			return "", cmdID, nil
		case <-s.closing:
			return "", cmdID, faultInternal("the server is shutting down")
		}
	}
}

// takeResponse removes up to limit bytes of buffered output and renders a
// ReceiveResponse; c.mu must be held.
func (c *command) takeResponse(want map[string]bool, limit int) string {
	var b strings.Builder
	b.WriteString(`<rsp:ReceiveResponse>`)
	n := 0
	for len(c.out) > 0 && n < limit {
		ch := &c.out[0]
		take := min(len(ch.data), limit-n)
		if want[ch.stream] {
			b.WriteString(`<rsp:Stream Name="` + ch.stream + `" CommandId="` + c.id + `">` +
				base64.StdEncoding.EncodeToString(ch.data[:take]) + `</rsp:Stream>`)
		}
		n += take
		if take == len(ch.data) {
			c.out = c.out[1:]
		} else {
			ch.data = ch.data[take:]
		}
	}
	if c.done && len(c.out) == 0 {
		for _, st := range []string{"stdout", "stderr"} {
			if want[st] {
				b.WriteString(`<rsp:Stream Name="` + st + `" CommandId="` + c.id + `" End="true"></rsp:Stream>`)
			}
		}
		b.WriteString(`<rsp:CommandState CommandId="` + c.id + `" State="` + StateDone +
			`"><rsp:ExitCode>` + strconv.Itoa(c.code) + `</rsp:ExitCode></rsp:CommandState>`)
	} else {
		b.WriteString(`<rsp:CommandState CommandId="` + c.id + `" State="` + StateRunning + `"/>`)
	}
	b.WriteString(`</rsp:ReceiveResponse>`)
	return b.String()
}

func (s *Server) signal(env *reqEnvelope) (string, *Fault) {
	sig := env.Body.Signal
	if sig == nil {
		return "", faultInvalid("Signal needs an rsp:Signal body.")
	}
	shellID, cmdID := env.Header.selector("ShellId"), strings.TrimSpace(sig.CommandID)
	c, f := s.lookup(shellID, cmdID)
	if f != nil {
		return "", f
	}
	code := strings.TrimSpace(sig.Code)
	c.mu.Lock()
	c.signals = append(c.signals, code)
	c.mu.Unlock()
	switch code {
	case SignalTerminate:
		s.kill(c, syscall.SIGKILL)
		s.waitExit(c)
		s.mu.Lock()
		if sh, ok := s.shells[shellID]; ok {
			delete(sh.cmds, cmdID)
		}
		s.mu.Unlock()
		c.markGone()
	case SignalCtrlC:
		s.kill(c, syscall.SIGINT)
	case SignalCtrlBreak:
		s.kill(c, syscall.SIGQUIT)
	default:
		return "", faultInvalid("Signal code %q is not supported.", code)
	}
	return `<rsp:SignalResponse/>`, nil
}
