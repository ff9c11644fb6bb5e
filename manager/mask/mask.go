// Package mask hides secrets in a job log as it streams to GitLab.
//
// A Writer replaces every occurrence of each secret with [MASKED], also when
// a secret is split across two or more Write calls. It holds back only the
// bytes at the end of the stream that could still be the start of a secret
// (the longest suffix that is a proper prefix of one), so the log reaches
// GitLab with at most that delay, and never emits part of a secret that it
// could still mask.
//
// Matching is one pass over the bytes with an Aho-Corasick automaton (a DFA
// over byte classes), O(n) in the log size whatever the number of secrets.
//
// When occurrences overlap, the bytes of all of them are hidden behind a
// single [MASKED]; in particular, when one secret contains another, the
// longest one wins. Occurrences that merely touch are masked separately
// ("[MASKED][MASKED]"), as gitlab-runner does.
package mask

import (
	"errors"
	"io"
	"net/url"
	"sync"
)

// Text replaces each secret in the output.
const Text = "[MASKED]"

// maxIdleBuf bounds the pending buffer's capacity kept between writes.
const maxIdleBuf = 256 << 10

var maskText = []byte(Text)

// ErrClosed is returned by Write after Close.
var ErrClosed = errors.New("mask: write to closed writer")

// Variants returns the forms of secret that a log may show: the secret itself
// and, when they differ, its URL query-escaped and path-escaped forms (a token
// in a clone URL or a query string is printed escaped). Empty secrets give none.
func Variants(secret string) []string {
	if secret == "" {
		return nil
	}
	out := []string{secret}
	for _, v := range []string{url.QueryEscape(secret), url.PathEscape(secret)} {
		if v != secret && (len(out) < 2 || out[1] != v) {
			out = append(out, v)
		}
	}
	return out
}

// Writer masks secrets in the bytes written to it and passes the result on.
//
// A Writer is safe for concurrent use (calls are serialized by a mutex), but
// the output is only meaningful when the stream is written in order, so in
// practice one goroutine writes at a time.
type Writer struct {
	mu     sync.Mutex
	dst    io.Writer
	m      *matcher // nil when there is nothing to mask
	state  uint32   // automaton state (row offset) after the last byte
	pos    int64    // stream offset of the next byte to arrive
	base   int64    // stream offset of buf[0]: everything before is emitted
	buf    []byte   // bytes not emitted yet (at most the longest secret)
	spans  []span   // masked spans not yet fully emitted, sorted, disjoint
	err    error    // sticky error from dst
	closed bool
}

// span is a masked region [start, end) of the stream.
type span struct {
	start, end int64
	announced  bool // Text already written for it
}

// NewWriter returns a Writer that writes to dst with every occurrence of each
// secret, and of each secret's Variants, replaced by [MASKED]. Empty secrets
// are ignored; duplicates are harmless.
func NewWriter(dst io.Writer, secrets []string) *Writer {
	var pats []string
	for _, s := range secrets {
		pats = append(pats, Variants(s)...)
	}
	return &Writer{dst: dst, m: newMatcher(pats)}
}

// Write masks p and writes what is final to the underlying writer. It returns
// len(p) unless the Writer is closed; an error of the underlying writer is
// returned and then kept, failing every later call.
func (w *Writer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return 0, ErrClosed
	}
	if w.err != nil {
		return 0, w.err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if w.m == nil {
		_, err := w.dst.Write(p)
		w.err = err
		return len(p), err
	}
	w.scan(p)
	data := p // the pending bytes, from offset w.base
	if len(w.buf) > 0 {
		w.buf = append(w.buf, p...)
		data = w.buf
	}
	w.emit(data, w.pos-int64(w.m.depth[w.state/w.m.nclass]))
	return len(p), w.err
}

// Flush writes out everything held back. Matching continues across the flush
// point: a secret whose start was flushed is masked from the flush point on,
// so its head is visible. Flush is meant for the end of a stream, or where
// output must reach GitLab now even at that cost.
func (w *Writer) Flush() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err != nil {
		return w.err
	}
	if w.m != nil {
		w.emit(w.buf, w.pos)
	}
	return w.err
}

// Close flushes everything held back and makes later writes fail with
// ErrClosed. It does not close the underlying writer. Close is idempotent.
func (w *Writer) Close() error {
	err := w.Flush()
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
	return err
}

// Held returns how many bytes are held back waiting to see whether they start
// a secret.
func (w *Writer) Held() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.buf)
}

// scan runs the automaton over p and records every occurrence found.
func (w *Writer) scan(p []byte) {
	m := w.m
	next, class, outFrom := m.next, &m.class, m.outFrom
	st := w.state
	for i, b := range p {
		st = next[st+uint32(class[b])]
		if st >= outFrom {
			end := w.pos + int64(i) + 1
			w.addSpan(end-int64(m.out[st/m.nclass]), end)
		}
	}
	w.state = st
	w.pos += int64(len(p))
}

// addSpan records the occurrence [s, e), merging it with the spans it
// overlaps. Spans arrive in order of their end, so only the tail can overlap.
func (w *Writer) addSpan(s, e int64) {
	if s < w.base { // its head was flushed already
		s = w.base
	}
	announced := false
	for n := len(w.spans); n > 0 && w.spans[n-1].end > s; n = len(w.spans) {
		last := w.spans[n-1]
		s = min(s, last.start)
		e = max(e, last.end)
		announced = announced || last.announced
		w.spans = w.spans[:n-1]
	}
	w.spans = append(w.spans, span{start: s, end: e, announced: announced})
}

// emit writes the stream up to offset limit (exclusive), masking spans, and
// keeps the rest of data, the pending bytes starting at offset w.base, held
// back: those bytes may still become part of a secret.
func (w *Writer) emit(data []byte, limit int64) {
	if limit > w.base {
		cur := w.base
		for len(w.spans) > 0 && w.spans[0].start < limit {
			sp := &w.spans[0]
			if cur < sp.start {
				w.write(data[cur-w.base : sp.start-w.base])
				cur = sp.start
			}
			if !sp.announced {
				w.write(maskText)
				sp.announced = true
			}
			if sp.end > limit {
				// The span runs into the held bytes and may still grow.
				cur = limit
				break
			}
			cur = sp.end
			w.spans = w.spans[1:]
		}
		if len(w.spans) == 0 {
			w.spans = w.spans[:0:0] // drop the consumed backing array
		}
		w.write(data[cur-w.base : limit-w.base])
		data = data[limit-w.base:]
		w.base = limit
	}
	// Keep the held bytes in w.buf (data may be w.buf itself or the caller's p).
	switch {
	case cap(w.buf) > maxIdleBuf && len(data) <= maxIdleBuf/4:
		w.buf = append(make([]byte, 0, maxIdleBuf/4), data...) // shrink after a large write
	case cap(w.buf) >= len(data):
		w.buf = w.buf[:copy(w.buf[:len(data)], data)] // copy handles overlap
	default:
		w.buf = append(w.buf[:0], data...)
	}
}

func (w *Writer) write(p []byte) {
	if len(p) == 0 || w.err != nil {
		return
	}
	if _, err := w.dst.Write(p); err != nil {
		w.err = err
	}
}

// matcher is an Aho-Corasick automaton compiled to a DFA. Bytes that occur in
// no pattern share class 0, which always leads back to the root. A state is
// represented by its row offset in next (id*nclass), and states in which a
// pattern ends are numbered last, so the scan loop needs one load and one
// comparison per byte.
type matcher struct {
	class   [256]uint8
	nclass  uint32
	next    []uint32 // row offset + class -> row offset
	outFrom uint32   // row offsets >= outFrom end a pattern
	depth   []int32  // by id: length of the state's string, the bytes that may start a match
	out     []int32  // by id: length of the longest pattern ending in this state
}

func newMatcher(patterns []string) *matcher {
	var used [256]bool
	anyByte := false
	for _, p := range patterns {
		for i := 0; i < len(p); i++ {
			used[p[i]] = true
			anyByte = true
		}
	}
	if !anyByte {
		return nil
	}
	m := &matcher{nclass: 1}
	for b := 0; b < 256; b++ {
		if used[b] {
			m.class[b] = uint8(m.nclass)
			m.nclass++
		}
	}
	nc := int(m.nclass)
	// Build the trie by state id; -1 marks a missing edge.
	var next []int32
	var depth, out []int32
	newState := func(d int32) int32 {
		for i := 0; i < nc; i++ {
			next = append(next, -1)
		}
		depth = append(depth, d)
		out = append(out, 0)
		return int32(len(depth) - 1)
	}
	newState(0)
	for _, p := range patterns {
		s := int32(0)
		for i := 0; i < len(p); i++ {
			e := int(s)*nc + int(m.class[p[i]])
			if next[e] < 0 {
				next[e] = newState(depth[s] + 1)
			}
			s = next[e]
		}
		if len(p) > 0 {
			out[s] = int32(len(p))
		}
	}
	// Breadth first: failure links, complete transitions, inherited outputs.
	fail := make([]int32, len(depth))
	queue := make([]int32, 0, len(depth))
	for c := 0; c < nc; c++ {
		if t := next[c]; t < 0 {
			next[c] = 0
		} else {
			queue = append(queue, t)
		}
	}
	for len(queue) > 0 {
		s := queue[0]
		queue = queue[1:]
		if out[s] == 0 {
			out[s] = out[fail[s]] // fail[s] is shallower, so already final
		}
		for c := 0; c < nc; c++ {
			e := int(s)*nc + c
			f := next[int(fail[s])*nc+c]
			if next[e] < 0 {
				next[e] = f
				continue
			}
			fail[next[e]] = f
			queue = append(queue, next[e])
		}
	}
	// Renumber: states without output first (the root stays 0), then the rest.
	n := len(depth)
	id := make([]uint32, n)
	k := uint32(0)
	for pass := 0; pass < 2; pass++ {
		for s := 0; s < n; s++ {
			if (out[s] > 0) == (pass == 1) {
				id[s] = k
				k++
			}
			if pass == 0 && s == n-1 {
				m.outFrom = k * m.nclass
			}
		}
	}
	m.next = make([]uint32, len(next))
	m.depth = make([]int32, n)
	m.out = make([]int32, n)
	for s := 0; s < n; s++ {
		for c := 0; c < nc; c++ {
			m.next[int(id[s])*nc+c] = id[next[s*nc+c]] * m.nclass
		}
		m.depth[id[s]] = depth[s]
		m.out[id[s]] = out[s]
	}
	return m
}
