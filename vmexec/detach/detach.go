// Package detach runs the stages of a job on a machine with a POSIX shell,
// detached from the connection: each stage runs under a small supervisor
// started with setsid, which keeps the stage's output, exit status and its
// own identity in files of a job directory on the machine. The connection
// only starts supervisors and follows the files, so when it breaks, or the
// process that holds it dies, the stages go on, and a Runner made later
// (by a restarted manager) finds them again by their IDs and follows their
// output from any byte offset.
//
// One session does the work of a run that goes well: the first Run writes
// the job's scripts and files (once per job), starts a supervisor for the
// stage and the chain of stages given in Stage.Then, and follows them all;
// later Runs of the chained stages read what that session already follows.
// On the machine only shell builtins run on that path, besides mkdir,
// mkfifo, setsid, the stages' own commands, and dd while following: the
// supervisor wakes the follower through a FIFO when a stage starts or
// ends, so that the follower neither polls nor sleeps to see it.
//
// The runner needs sh, setsid, mkdir, mv, rm, rmdir, sleep (with
// fractions) and dd on the machine, and /proc: busybox is enough. Without
// mkfifo it polls.
package detach

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/mayfly-ci/mayfly/vmexec"
)

// Stage is one attempt of one stage.
type Stage struct {
	// ID names the attempt on the machine: letters, digits, _ and -.
	ID string
	// Script is the program text for Options.Shell.
	Script string
	// Env holds "NAME=value" pairs exported to the script.
	Env []string
	// From is the byte offset of the output to stream from.
	From int64
	// Then are the stages the supervisor starts after this one, in order,
	// each only if the one before it exited 0.
	Then []Stage
}

// File is a file the first session writes on the machine, mode 0600.
type File struct {
	Path    string
	Content []byte
}

// Defaults of Options.
const (
	DefaultReconnectTimeout = 2 * time.Minute
	DefaultNoServerTimeout  = 15 * time.Second
	DefaultKillGrace        = 2 * time.Second
	DefaultDrainTimeout     = 5 * time.Second
	DefaultMaxBuffer        = 16 << 20
)

// Options configure a Runner.
type Options struct {
	// Dir is the job's directory on the machine: absolute, made 0700.
	Dir string
	// Shell runs the stages and their supervisor: sh (default) or bash.
	Shell string
	// Scripts are stage scripts known in advance, written with the first
	// session so that later stages need no upload.
	Scripts []string
	// Files are written with the first session (file variables).
	Files []File
	// Exec runs the sessions: the job's connection.
	Exec vmexec.Executor
	// Redial, if set, opens a new connection when the one in use broke.
	Redial func(ctx context.Context) (vmexec.Executor, error)
	// ReconnectTimeout bounds reconnecting after the connection broke,
	// before Run and Stop give up (default 2m).
	ReconnectTimeout time.Duration
	// NoServerTimeout bounds reconnecting to a machine that answers but
	// has no SSH server any more, as when a job killed it: every attempt
	// for this long was refused, reset, or closed before the handshake
	// ended (default 15s). A machine that does not answer at all (a
	// network outage) gets the whole ReconnectTimeout.
	NoServerTimeout time.Duration
	// KillGrace is the time between SIGTERM and SIGKILL in Stop (default 2s).
	KillGrace time.Duration
	// DrainTimeout is how long processes a stage left behind may run on
	// after it exited before they are killed (default 5s).
	DrainTimeout time.Duration
	// MaxBuffer bounds the output held for chained stages not yet asked
	// for (default 16 MiB); beyond it they are read again later.
	MaxBuffer int
	// Logger receives the runner's events; nil: slog.Default().
	Logger *slog.Logger
}

// maxFruitless bounds sessions in a row that end early for another reason
// than a broken connection without following anything.
const maxFruitless = 5

// ErrLost is wrapped by errors of Run when the stage cannot be found or
// followed: its supervisor is gone without a result (the machine restarted,
// or it was killed), or the job directory cannot be written.
var ErrLost = errors.New("stage lost")

var (
	idRE    = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]*$`)
	shellRE = regexp.MustCompile(`^[A-Za-z0-9_./+-]+$`)
)

// Runner runs the stages of one job on one machine. It is safe for
// concurrent use.
type Runner struct {
	opts Options
	log  *slog.Logger

	ctx    context.Context // ends with Close: the sessions' parent
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	exec     vmexec.Executor
	written  map[string]bool // names in D/f known written
	filesOK  bool
	streams  map[string]*stream
	sessions map[*session]struct{}
	buffered int // bytes held by streams nobody reads yet
	closed   bool
}

// New checks opts and returns a Runner. Nothing happens on the machine
// until the first Run.
func New(opts Options) (*Runner, error) {
	switch {
	case opts.Exec == nil:
		return nil, errors.New("detach: Options.Exec is nil")
	case !path.IsAbs(opts.Dir) || path.Clean(opts.Dir) != opts.Dir || strings.ContainsAny(opts.Dir, "\x00\r\n"):
		return nil, fmt.Errorf("detach: Options.Dir %q: want a clean absolute path", opts.Dir)
	}
	if opts.Shell == "" {
		opts.Shell = "sh"
	}
	if !shellRE.MatchString(opts.Shell) {
		return nil, fmt.Errorf("detach: Options.Shell %q: want a program name or path", opts.Shell)
	}
	for i, f := range opts.Files {
		if !path.IsAbs(f.Path) || path.Clean(f.Path) != f.Path || strings.ContainsAny(f.Path, "\x00\r\n") {
			return nil, fmt.Errorf("detach: Options.Files[%d].Path %q: want a clean absolute path", i, f.Path)
		}
		if bytes.IndexByte(f.Content, 0) >= 0 {
			return nil, fmt.Errorf("detach: Options.Files[%d] %s: contains a NUL byte", i, f.Path)
		}
	}
	if opts.ReconnectTimeout <= 0 {
		opts.ReconnectTimeout = DefaultReconnectTimeout
	}
	if opts.NoServerTimeout <= 0 {
		opts.NoServerTimeout = DefaultNoServerTimeout
	}
	if opts.KillGrace <= 0 {
		opts.KillGrace = DefaultKillGrace
	}
	if opts.DrainTimeout <= 0 {
		opts.DrainTimeout = DefaultDrainTimeout
	}
	if opts.MaxBuffer <= 0 {
		opts.MaxBuffer = DefaultMaxBuffer
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Runner{
		opts: opts, log: log.With("job_dir", opts.Dir), ctx: ctx, cancel: cancel,
		exec: opts.Exec, written: map[string]bool{}, streams: map[string]*stream{}, sessions: map[*session]struct{}{},
	}, nil
}

// Close stops following (the stages run on) and waits for the sessions to
// end. It does not close the connection.
func (r *Runner) Close() error {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	r.cancel()
	r.wg.Wait()
	return nil
}

// scriptName is the file name of a script or env file, by content.
func scriptName(content string) string {
	sum := sha256.Sum256([]byte(content))
	return hex.EncodeToString(sum[:10])
}

// envFile is the text of a stage's env file.
func envFile(env []vmexec.EnvVar) string {
	var b strings.Builder
	for _, v := range env {
		b.WriteString("export " + v.Name + "=" + quote(v.Value) + "\n")
	}
	return b.String()
}

// spec is the supervisor's SPEC of s, and the files it needs.
func (r *Runner) spec(s Stage) (string, []fileWrite, error) {
	if !idRE.MatchString(s.ID) {
		return "", nil, fmt.Errorf("stage ID %q: want letters, digits, _, . and -", s.ID)
	}
	if strings.IndexByte(s.Script, 0) >= 0 {
		return "", nil, fmt.Errorf("stage %s: the script contains a NUL byte", s.ID)
	}
	env, err := vmexec.ParseEnv(s.Env)
	if err != nil {
		return "", nil, fmt.Errorf("stage %s: %w", s.ID, err)
	}
	e := envFile(env)
	sn, en := scriptName(s.Script), scriptName(e)+".env"
	return s.ID + ":" + sn + ":" + en, []fileWrite{{Name: sn, Content: s.Script}, {Name: en, Content: e}}, nil
}

// Run implements stagerun.Runner: it starts s unless it was started, and
// follows its output from s.From to out until it ends.
func (r *Runner) Run(ctx context.Context, s Stage, out io.Writer) (int, error) {
	if ctx.Err() != nil {
		return -1, fmt.Errorf("stage %s: %w", s.ID, context.Cause(ctx))
	}
	delivered := s.From
	reconnectBy := time.Time{}
	fruitless := 0 // sessions in a row that ended early without a transport failure or progress
	for {
		st, err := r.streamFor(s, delivered)
		if err != nil {
			return -1, err
		}
		code, n, res := st.consume(ctx, delivered, out)
		progressed := n > delivered
		delivered = n
		switch res.kind {
		case resEnded:
			r.forget(st)
			return code, nil
		case resLost:
			r.forget(st)
			return -1, fmt.Errorf("stage %s: %w: %s", s.ID, ErrLost, res.reason)
		case resCanceled:
			return -1, fmt.Errorf("stage %s: %w", s.ID, context.Cause(ctx))
		case resWrite:
			r.forget(st)
			return -1, fmt.Errorf("stage %s: write output: %w", s.ID, res.err)
		}
		// The session ended before the stage did: follow again from where
		// we are, on a new connection when this one broke.
		r.forget(st)
		if progressed {
			fruitless = 0
		} else if fruitless++; fruitless >= maxFruitless && !vmexec.IsSystemFailure(res.err) {
			return -1, fmt.Errorf("stage %s: following keeps failing: %w", s.ID, res.err)
		}
		if res.err != nil && vmexec.IsSystemFailure(res.err) {
			if reconnectBy.IsZero() {
				reconnectBy = time.Now().Add(r.opts.ReconnectTimeout)
			}
			if err := r.reconnect(ctx, reconnectBy, res.err); err != nil {
				return -1, fmt.Errorf("stage %s: %w", s.ID, err)
			}
		}
		s.Then = nil // the chain was started; it is followed one by one now
	}
}

// streamFor returns the stream that follows s from offset from, starting a
// session when no live one follows it.
func (r *Runner) streamFor(s Stage, from int64) (*stream, error) {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil, fmt.Errorf("stage %s: runner closed", s.ID)
	}
	if st := r.streams[s.ID]; st != nil && st.usable(from) {
		r.mu.Unlock()
		return st, nil
	}
	r.mu.Unlock()
	return r.startSession(s, from)
}

// forget drops st when it is still the stream of its stage.
func (r *Runner) forget(st *stream) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.streams[st.id] == st {
		delete(r.streams, st.id)
	}
	r.buffered -= st.drop()
}

// startSession starts a session that starts s (and its chain) unless it
// was started, and follows it from offset from.
func (r *Runner) startSession(s Stage, from int64) (*stream, error) {
	specs := []string{}
	var files []fileWrite
	follow := []string{s.ID}
	sp, fw, err := r.spec(s)
	if err != nil {
		return nil, err
	}
	specs, files = append(specs, sp), append(files, fw...)
	for _, n := range s.Then {
		sp, fw, err := r.spec(n)
		if err != nil {
			return nil, err
		}
		specs, files = append(specs, sp), append(files, fw...)
		follow = append(follow, n.ID)
	}
	for _, sc := range r.opts.Scripts {
		files = append(files, fileWrite{Name: scriptName(sc), Content: sc})
	}
	files = append(files, fileWrite{Name: "sup.sh", Content: supervisorScript})

	r.mu.Lock()
	var todo []fileWrite
	seen := map[string]bool{}
	for _, f := range files {
		if !r.written[f.Name] && !seen[f.Name] {
			seen[f.Name] = true
			todo = append(todo, f)
		}
	}
	if !r.filesOK {
		for _, f := range r.opts.Files {
			todo = append(todo, fileWrite{Path: f.Path, Content: string(f.Content)})
		}
	}
	tok := newToken()
	ss := &session{r: r, token: tok, names: todo, chain: map[string]*stream{}}
	ctx, cancel := context.WithCancel(r.ctx)
	ss.cancel = cancel
	// Every stage the session may follow has its stream now, so that a Run
	// of a chained stage waits for this session rather than start another.
	for i, id := range follow {
		st := newStream(id, 0, ss)
		if i == 0 {
			st.base = from
			ss.current = st
		}
		if old := r.streams[id]; old != nil {
			r.buffered -= old.drop()
		}
		r.streams[id] = st
		ss.chain[id] = st
	}
	first := ss.current
	r.sessions[ss] = struct{}{}
	exec := r.exec
	r.mu.Unlock()

	script := sessionScript{
		dir: r.opts.Dir, token: tok, files: todo, launch: specs, shell: r.opts.Shell,
		drainSec: int((r.opts.DrainTimeout + time.Second - 1) / time.Second), follow: follow, from: from,
	}.String()
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		defer cancel()
		var stderr capWriter
		dm := &demux{tok: []byte(tok), s: ss}
		cmd := vmexec.Command{Script: script, Shell: "sh", Stdout: dm, Stderr: &stderr}
		var code int
		var err error
		if st, ok := exec.(vmexec.Streamer); ok {
			code, err = st.Stream(ctx, cmd) // the follower ends itself (see followFunctions)
		} else {
			code, err = exec.Run(ctx, cmd)
		}
		r.log.Debug("follow session ended", "stage", s.ID, "exit_code", code, "err", err, "stderr", strings.TrimSpace(stderr.String()))
		if err == nil && !ss.finished() {
			err = &vmexec.SystemError{Op: "follow", Err: fmt.Errorf("session ended early: %s", strings.TrimSpace(stderr.String()))}
		}
		ss.end(err)
	}()
	return first, nil
}

// reconnect replaces a broken connection, retrying until by, or for
// NoServerTimeout while the machine answers without an SSH server.
func (r *Runner) reconnect(ctx context.Context, by time.Time, cause error) error {
	if r.opts.Redial == nil {
		return fmt.Errorf("connection lost, no way to reconnect: %w", cause)
	}
	r.log.Warn("connection to the machine lost; reconnecting to follow the stages", "err", cause)
	var noServerSince time.Time // start of the attempts in a row that met no SSH server
	for attempt := 1; ; attempt++ {
		start := time.Now()
		// Each attempt is bounded by NoServerTimeout, so that one that
		// meets no SSH server is seen as such in time.
		deadline := start.Add(r.opts.NoServerTimeout)
		if by.Before(deadline) {
			deadline = by
		}
		rctx, cancel := context.WithDeadline(ctx, deadline)
		e, err := r.opts.Redial(rctx)
		cancel()
		if err == nil {
			r.mu.Lock()
			old := r.exec
			r.exec = e
			r.mu.Unlock()
			if old != nil && old != e {
				old.Close()
			}
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("reconnect: %w", context.Cause(ctx))
		}
		if !noServer(err) {
			noServerSince = time.Time{}
		} else if noServerSince.IsZero() {
			noServerSince = start
		}
		if !noServerSince.IsZero() && time.Since(noServerSince) >= r.opts.NoServerTimeout {
			return fmt.Errorf("%w: the machine has no SSH server any more (every connection for %s refused or closed): %v (connection lost: %v)",
				ErrLost, time.Since(noServerSince).Round(time.Second), err, cause)
		}
		if !time.Now().Before(by) {
			return fmt.Errorf("%w: no connection within %s after %d attempts: %v (connection lost: %v)", ErrLost, r.opts.ReconnectTimeout, attempt, err, cause)
		}
		t := time.NewTimer(min(time.Duration(attempt)*time.Second, 5*time.Second))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
	}
}

// noServer reports whether a failed dial met a machine that answers
// without an SSH server: the connection was refused or reset, or closed
// before the SSH handshake ended. A network outage gives timeouts instead.
func noServer(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

// Stop implements stagerun.Runner: see stopFunctions.
func (r *Runner) Stop(ctx context.Context, id string) error {
	if !idRE.MatchString(id) {
		return fmt.Errorf("stop: stage ID %q: want letters, digits, _, . and -", id)
	}
	by := time.Now().Add(r.opts.ReconnectTimeout)
	for {
		r.mu.Lock()
		exec := r.exec
		r.mu.Unlock()
		tok := newToken()
		var out, stderr capWriter
		_, err := exec.Run(ctx, vmexec.Command{Script: stopScript(r.opts.Dir, tok, id, int((r.opts.KillGrace+time.Second-1)/time.Second)), Shell: "sh", Stdout: &out, Stderr: &stderr})
		res := out.String()
		switch {
		case err == nil && strings.Contains(res, tok+" s"):
			return nil
		case err == nil && strings.Contains(res, tok+" l "):
			_, why, _ := strings.Cut(res, tok+" l ")
			return fmt.Errorf("stop stage %s: %s", id, strings.TrimSpace(why))
		case err == nil:
			return fmt.Errorf("stop stage %s: no answer from the machine: %s", id, strings.TrimSpace(stderr.String()))
		case ctx.Err() != nil:
			return fmt.Errorf("stop stage %s: %w", id, context.Cause(ctx))
		case vmexec.IsSystemFailure(err):
			if rerr := r.reconnect(ctx, by, err); rerr != nil {
				return fmt.Errorf("stop stage %s: %w", id, rerr)
			}
		default:
			return fmt.Errorf("stop stage %s: %w", id, err)
		}
	}
}

// newToken returns a random marker that stage output cannot predict.
func newToken() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic("detach: crypto/rand: " + err.Error())
	}
	return "mf" + hex.EncodeToString(b[:])
}

// capWriter keeps the first 64 KiB written to it.
type capWriter struct {
	mu sync.Mutex
	b  []byte
}

func (w *capWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if room := 64<<10 - len(w.b); room > 0 {
		w.b = append(w.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

func (w *capWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return string(w.b)
}
