package sshexec

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"path"
	"regexp"
	"strconv"
	"strings"
	"sync"

	"github.com/mayfly-ci/mayfly/vmexec"
)

// DefaultShell interprets scripts when Command.Shell is empty.
const DefaultShell = "sh"

// markerPrefix starts the line the wrapper prints on stderr with the process
// group id of the script, before any script output.
const markerPrefix = "mayfly-pgid:"

// maxPreMarker bounds how much stderr is held back while waiting for the marker.
const maxPreMarker = 64 << 10

var shellName = regexp.MustCompile(`^[A-Za-z0-9_./+-]+$`)

// quote returns s as one single-quoted POSIX shell word.
func quote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// newToken returns a random hex string that script output cannot predict.
func newToken() string {
	var b [12]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic("sshexec: crypto/rand: " + err.Error())
	}
	return hex.EncodeToString(b[:])
}

// runCommand is the exec request for a script: the login shell (busybox ash,
// dash, bash...) forks setsid, which puts the script's shell into a new session
// and process group whose id is the shell's pid. setsid never forks here because
// its caller is a forked child, not a group leader; "exit $?" keeps the login
// shell from exec'ing it directly.
func runCommand(shell string) string {
	return "setsid " + shell + " -s; exit $?"
}

// runPayload is what the script's shell reads on stdin: a check that it leads
// its own process group, the marker with its pid, then the script in a brace
// group with stdin from /dev/null so that nothing the script runs can read the
// rest of the script or the channel.
func runPayload(token string, env []vmexec.EnvVar, script string) []byte {
	var b bytes.Buffer
	b.Grow(len(script) + 512)
	b.WriteString(`read -r _ _ _ _ mayfly_pg _ </proc/$$/stat; [ "$mayfly_pg" = "$$" ] || { echo "mayfly: script shell $$ is not a process group leader (pgid $mayfly_pg)" >&2; exit 125; }; unset mayfly_pg; `)
	fmt.Fprintf(&b, "printf '%s%s:%%s\\n' \"$$\" >&2\n{\n", markerPrefix, token)
	for _, v := range env {
		fmt.Fprintf(&b, "export %s=%s\n", v.Name, quote(v.Value))
	}
	b.WriteString(script)
	if !strings.HasSuffix(script, "\n") {
		b.WriteByte('\n')
	}
	b.WriteString("} </dev/null\n")
	return b.Bytes()
}

// killCommand terminates process group pgid: SIGTERM, then SIGKILL when the
// group is still there after graceSec seconds, and waits until it is gone, for
// at most graceSec+10 seconds. It exits 0 when the group is gone, 1 otherwise.
//
// "Gone" ignores zombies: children orphaned by the kill are reparented to PID 1,
// which may be slow to reap them (or never, in a minimal VM), and kill -0 still
// succeeds on a group of zombies. So once kill -0 succeeds, /proc decides.
// It polls every 0.1 s where sleep takes fractions (busybox, coreutils), else
// every second. kill -N -PGID is the one spelling that bash, dash and busybox
// ash all accept.
func killCommand(pgid, graceSec int) string {
	return fmt.Sprintf(`g=%[1]d; `+
		`alive() { kill -0 -$g 2>/dev/null || return 1; [ -r /proc/self/stat ] || return 0; `+
		`for f in /proc/[0-9]*/stat; do read -r _ _ s _ p _ 2>/dev/null <"$f" || continue; `+
		`[ "$p" = "$g" ] && [ "$s" != Z ] && return 0; done; return 1; }; `+
		`kill -15 -$g 2>/dev/null || exit 0; `+
		`t=10; sleep 0.01 2>/dev/null || t=1; i=0; `+
		`while alive; do `+
		`if [ $i -ge $((%[2]d*t)) ]; then kill -9 -$g 2>/dev/null; fi; `+
		`if [ $i -ge $((%[3]d*t)) ]; then echo "process group $g still present" >&2; exit 1; fi; `+
		`if [ $t = 10 ]; then sleep 0.1; else sleep 1; fi; i=$((i+1)); done; exit 0`,
		pgid, graceSec, graceSec+10)
}

// validateUploadPath checks p is a clean absolute path naming a file.
func validateUploadPath(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("path is empty")
	case !path.IsAbs(p):
		return fmt.Errorf("path %q is not absolute", p)
	case path.Clean(p) != p || p == "/":
		return fmt.Errorf("path %q is not a clean file path", p)
	case strings.ContainsAny(p, "\x00\n\r"):
		return fmt.Errorf("path %q contains NUL or newline", p)
	}
	return nil
}

// uploadCommand writes stdin to a temporary file beside p, checks that exactly
// size bytes arrived (a dropped connection must not leave a truncated file in
// place), sets mode and renames it over p. Parent directories are created.
func uploadCommand(p string, size int, mode uint32) string {
	return fmt.Sprintf(`umask 022 && mkdir -p %[1]s && umask 077 && t=%[2]s.mayfly-$$ && `+
		`if cat >"$t" && n=$(wc -c <"$t") && [ $n -eq %[3]d ] && chmod %04[4]o "$t" && mv -f "$t" %[2]s; `+
		`then exit 0; else rm -f "$t"; echo "upload incomplete or failed" >&2; exit 1; fi`,
		quote(path.Dir(p)), quote(p), size, mode)
}

// syncWriter serializes writes of stdout and stderr and keeps going after a
// write error, so the channel is still drained, remembering the first error.
// After stop, writes are discarded so nothing reaches w once Run returned.
type syncWriter struct {
	mu      *sync.Mutex
	w       io.Writer
	err     error
	stopped bool
}

func (s *syncWriter) Write(p []byte) (int, error) {
	if s.w == nil {
		return len(p), nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil || s.stopped {
		return len(p), nil
	}
	if _, err := s.w.Write(p); err != nil {
		s.err = err
	}
	return len(p), nil
}

func (s *syncWriter) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopped = true
}

func (s *syncWriter) firstErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// markerFilter sits in front of stderr: it holds output back until the marker
// line with the script's pid has passed, removes that line, and then passes
// everything through. Bytes before the marker (login shell noise) are kept.
type markerFilter struct {
	next  io.Writer
	want  []byte // markerPrefix + token + ":"
	found chan struct{}

	mu     sync.Mutex
	buf    []byte
	done   bool // marker found, given up or flushed
	pid    int
	gaveUp bool // marker line not found in the first maxPreMarker bytes or malformed
}

func newMarkerFilter(next io.Writer, token string) *markerFilter {
	return &markerFilter{
		next:  next,
		want:  []byte(markerPrefix + token + ":"),
		found: make(chan struct{}),
	}
}

func (m *markerFilter) Write(p []byte) (int, error) {
	m.mu.Lock()
	if m.done {
		m.mu.Unlock()
		return m.next.Write(p)
	}
	m.buf = append(m.buf, p...)
	i := bytes.Index(m.buf, m.want)
	if i >= 0 {
		rest := m.buf[i+len(m.want):]
		nl := bytes.IndexByte(rest, '\n')
		if nl < 0 {
			if len(m.buf) > maxPreMarker {
				return m.giveUp(len(p))
			}
			m.mu.Unlock()
			return len(p), nil
		}
		pid, err := strconv.Atoi(string(rest[:nl]))
		if err != nil || pid <= 1 {
			return m.giveUp(len(p))
		}
		before, after := m.buf[:i], rest[nl+1:]
		m.pid, m.done, m.buf = pid, true, nil
		close(m.found)
		m.mu.Unlock()
		if len(before) > 0 {
			m.next.Write(before)
		}
		if len(after) > 0 {
			m.next.Write(after)
		}
		return len(p), nil
	}
	if len(m.buf) > maxPreMarker {
		return m.giveUp(len(p))
	}
	m.mu.Unlock()
	return len(p), nil
}

// giveUp is called with m.mu held and releases it.
func (m *markerFilter) giveUp(n int) (int, error) {
	buf := m.buf
	m.buf, m.done, m.gaveUp = nil, true, true
	m.mu.Unlock()
	m.next.Write(buf)
	return n, nil
}

// PID returns the script's pid (= its process group id) once the marker passed.
func (m *markerFilter) PID() (int, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.pid, m.pid > 0
}

// flush passes on and returns stderr still held back because the marker never
// came; later writes pass straight through.
func (m *markerFilter) flush() string {
	m.mu.Lock()
	if m.done {
		m.mu.Unlock()
		return ""
	}
	buf := m.buf
	m.buf, m.done = nil, true
	m.mu.Unlock()
	m.next.Write(buf)
	return string(buf)
}

// lost reports whether the marker may have been printed but was not recognized.
func (m *markerFilter) lost() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.gaveUp
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
