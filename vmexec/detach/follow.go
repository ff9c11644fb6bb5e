package detach

import (
	"bytes"
	"context"
	"io"
	"slices"
	"strconv"
	"strings"
)

// session is one connection session following a chain of stages.
type session struct {
	r      *Runner
	token  string
	names  []fileWrite // files this session writes
	cancel context.CancelFunc
	chain  map[string]*stream // the streams of the stages it may follow, by ID

	// guarded by r.mu
	current *stream
	done    bool // "x" seen
	ended   bool
}

func (ss *session) finished() bool {
	ss.r.mu.Lock()
	defer ss.r.mu.Unlock()
	return ss.done
}

// end records that the session's command returned with err.
func (ss *session) end(err error) {
	r := ss.r
	r.mu.Lock()
	defer r.mu.Unlock()
	ss.ended = true
	delete(r.sessions, ss)
	for _, st := range ss.chain {
		if !st.ended && st.lost == "" && !st.broken {
			st.broken = true
			st.err = err
			st.signal()
		}
	}
}

// marker handles one marker line of the session (without the token).
func (ss *session) marker(line string) {
	r := ss.r
	r.mu.Lock()
	defer r.mu.Unlock()
	f := strings.Fields(line)
	if len(f) == 0 {
		return
	}
	cur := ss.current
	switch f[0] {
	case "w": // the files are written
		for _, fw := range ss.names {
			if fw.Path != "" {
				r.filesOK = true
			} else {
				r.written[fw.Name] = true
			}
		}
	case "e":
		if cur == nil {
			return
		}
		code := -1
		if len(f) > 1 {
			if n, err := strconv.Atoi(f[1]); err == nil {
				code = n
			}
		}
		if code < 0 {
			cur.lost = "the stage ended without a readable exit status"
		} else {
			cur.ended, cur.code = true, code
		}
		cur.signal()
	case "n":
		if len(f) < 2 {
			return
		}
		ss.current = ss.chain[f[1]] // nil (data dropped) for an ID it was not started with
	case "l":
		why := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), "l"))
		if cur != nil {
			cur.lost = why
			cur.signal()
		}
	case "u": // a chained stage was not started after all: nothing to follow
		if cur != nil {
			cur.broken = true
			cur.signal()
		}
		ss.current = nil
	case "x":
		ss.done = true
		ss.current = nil
	}
}

// data appends output of the current stage.
func (ss *session) data(p []byte) {
	if len(p) == 0 {
		return
	}
	r := ss.r
	r.mu.Lock()
	defer r.mu.Unlock()
	cur := ss.current
	if cur == nil || cur.dropped {
		return
	}
	cur.buf = append(cur.buf, p...)
	r.buffered += len(p)
	cur.signal()
	if !cur.reading && r.buffered > r.opts.MaxBuffer {
		// Nobody reads this chained stage yet: let it be read again later.
		r.log.Warn("output of chained stages not yet asked for exceeds the buffer; it will be read again", "stage", cur.id, "buffered", r.buffered)
		r.buffered -= cur.drop()
		cur.broken = true
		ss.cancel()
	}
}

// stream is the output of one stage as one session follows it.
type stream struct {
	id      string
	ss      *session
	base    int64 // offset of buf[0] in the stage's output
	buf     []byte
	ended   bool
	code    int
	lost    string
	broken  bool  // the session ended (or gave up) before the stage did
	err     error // why the session ended
	dropped bool
	reading bool // a Run is consuming it
	notify  chan struct{}
}

func newStream(id string, base int64, ss *session) *stream {
	return &stream{id: id, ss: ss, base: base, notify: make(chan struct{})}
}

// signal wakes the reader; r.mu is held.
func (st *stream) signal() {
	close(st.notify)
	st.notify = make(chan struct{})
}

// drop releases the buffer and returns its size; r.mu is held.
func (st *stream) drop() int {
	n := len(st.buf)
	st.buf, st.dropped = nil, true
	return n
}

// usable reports whether a Run from offset from can read st; r.mu is held.
func (st *stream) usable(from int64) bool {
	return !st.dropped && !st.broken && st.base <= from && (st.lost == "" || st.base+int64(len(st.buf)) >= from)
}

type resultKind int

const (
	resEnded resultKind = iota
	resLost
	resCanceled
	resBroken
	resWrite
)

type consumeResult struct {
	kind   resultKind
	reason string
	err    error
}

// consume writes st's output from offset from to out until the stage
// ends, the stream breaks, or ctx ends. It returns the exit code and the
// offset reached.
func (st *stream) consume(ctx context.Context, from int64, out io.Writer) (int, int64, consumeResult) {
	r := st.ss.r
	r.mu.Lock()
	st.reading = true
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		st.reading = false
		r.mu.Unlock()
	}()
	for {
		r.mu.Lock()
		var chunk []byte
		if end := st.base + int64(len(st.buf)); end > from && from >= st.base {
			chunk = slices.Clone(st.buf[from-st.base:])
			// What is read is no longer needed.
			r.buffered -= len(st.buf)
			st.buf = st.buf[:0]
			st.base = end
		}
		ended, code, lost, broken, err, notify := st.ended, st.code, st.lost, st.broken, st.err, st.notify
		r.mu.Unlock()
		if len(chunk) > 0 {
			if _, werr := out.Write(chunk); werr != nil {
				return -1, from, consumeResult{kind: resWrite, err: werr}
			}
			from += int64(len(chunk))
			continue
		}
		switch {
		case ended:
			return code, from, consumeResult{kind: resEnded}
		case lost != "":
			return -1, from, consumeResult{kind: resLost, reason: lost}
		case broken:
			return -1, from, consumeResult{kind: resBroken, err: err}
		}
		select {
		case <-notify:
		case <-ctx.Done():
			return -1, from, consumeResult{kind: resCanceled}
		}
	}
}

// demux splits a session's stdout into stage output and marker lines.
type demux struct {
	tok      []byte
	s        *session
	pending  []byte
	inMarker bool
}

func (d *demux) Write(p []byte) (int, error) {
	d.pending = append(d.pending, p...)
	for {
		if d.inMarker {
			i := bytes.IndexByte(d.pending, '\n')
			if i < 0 {
				if len(d.pending) > 4096 { // not a marker of ours after all
					d.inMarker = false
					continue
				}
				return len(p), nil
			}
			d.s.marker(string(d.pending[:i]))
			d.pending = d.pending[i+1:]
			d.inMarker = false
			continue
		}
		if i := bytes.Index(d.pending, d.tok); i >= 0 {
			d.s.data(d.pending[:i])
			d.pending = d.pending[i+len(d.tok):]
			d.inMarker = true
			continue
		}
		keep := partialSuffix(d.pending, d.tok)
		d.s.data(d.pending[:len(d.pending)-keep])
		d.pending = append([]byte(nil), d.pending[len(d.pending)-keep:]...)
		return len(p), nil
	}
}

// partialSuffix returns the length of the longest suffix of b that is a
// proper prefix of tok.
func partialSuffix(b, tok []byte) int {
	for n := min(len(b), len(tok)-1); n > 0; n-- {
		if bytes.Equal(b[len(b)-n:], tok[:n]) {
			return n
		}
	}
	return 0
}
