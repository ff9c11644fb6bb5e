package fleet

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
)

// journalHeader is the first line of every journal file.
const journalHeader = "mayfly-fleet-journal v1"

// journal is a small crash-safe record of the instances that were handed
// out to a job and are not yet known to be gone. It is an append-only text
// file: "a <id>" when an instance is acquired (synced to disk before
// Acquire returns), "g <id>" when it is gone. It is rewritten with only the
// live ids when dead lines outnumber them.
//
// A restarted fleet deletes every instance the journal names. Without a
// readable journal it cannot tell a never-used instance from a used one,
// and deletes all instances carrying its labels.
type journal struct {
	path string // "" keeps the journal in memory only

	mu      sync.Mutex // guards everything below but synced
	f       *os.File
	live    map[string]struct{}
	lines   int    // lines in the file after the header
	written uint64 // records written

	syncMu sync.Mutex // serialises fsync; guards synced
	synced uint64     // records known to be on disk
}

// loadJournal reads the journal at path. It returns the ids recorded as
// acquired and not gone, and whether the file was present and intact. A
// missing file is not an error but is not trusted either.
func loadJournal(path string) (live map[string]struct{}, trusted bool, err error) {
	live = map[string]struct{}{}
	if path == "" {
		return live, false, nil
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return live, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read journal %s: %w", path, err)
	}
	if len(b) == 0 || b[len(b)-1] != '\n' {
		return live, false, nil // empty or torn
	}
	lines := strings.Split(string(b[:len(b)-1]), "\n")
	if lines[0] != journalHeader {
		return live, false, nil
	}
	for _, line := range lines[1:] {
		op, id, ok := strings.Cut(line, " ")
		if !ok || id == "" || strings.ContainsAny(id, " \t\r") {
			return live, false, nil
		}
		switch op {
		case "a":
			live[id] = struct{}{}
		case "g":
			delete(live, id)
		default:
			return live, false, nil
		}
	}
	return live, true, nil
}

// createJournal replaces the file at path with a journal holding ids as
// live, durably (write to a temporary file, fsync, rename, fsync the
// directory), and opens it for appending.
func createJournal(path string, ids []string) (*journal, error) {
	j := &journal{path: path, live: make(map[string]struct{}, len(ids))}
	for _, id := range ids {
		j.live[id] = struct{}{}
	}
	if path == "" {
		return j, nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("journal %s: %w", path, err)
	}
	f, err := j.rewrite()
	if err != nil {
		return nil, err
	}
	j.f = f
	j.lines = len(j.live)
	return j, nil
}

// rewrite writes the live set to a new file that replaces the journal and
// returns it open for appending. j.mu is held (or j is unshared).
func (j *journal) rewrite() (*os.File, error) {
	var buf bytes.Buffer
	buf.WriteString(journalHeader + "\n")
	for _, id := range slices.Sorted(maps.Keys(j.live)) {
		buf.WriteString("a " + id + "\n")
	}
	dir := filepath.Dir(j.path)
	tmp, err := os.CreateTemp(dir, filepath.Base(j.path)+".tmp*")
	if err != nil {
		return nil, fmt.Errorf("journal %s: %w", j.path, err)
	}
	fail := func(err error) (*os.File, error) {
		tmp.Close()
		os.Remove(tmp.Name())
		return nil, fmt.Errorf("journal %s: %w", j.path, err)
	}
	if _, err := tmp.Write(buf.Bytes()); err != nil {
		return fail(err)
	}
	if err := tmp.Sync(); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp.Name(), j.path); err != nil {
		return fail(err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync() // best effort: not every file system syncs directories
		d.Close()
	}
	return tmp, nil
}

// Acquired durably records that id was handed out. It returns once the
// record is on disk; concurrent calls share one fsync.
func (j *journal) Acquired(id string) error {
	j.mu.Lock()
	j.live[id] = struct{}{}
	if j.f == nil {
		j.mu.Unlock()
		return nil
	}
	_, err := j.f.WriteString("a " + id + "\n")
	j.lines++
	j.written++
	mine := j.written
	f := j.f
	j.mu.Unlock()
	if err != nil {
		return fmt.Errorf("journal %s: record %s: %w", j.path, id, err)
	}

	j.syncMu.Lock()
	defer j.syncMu.Unlock()
	if j.synced >= mine {
		return nil // an fsync that started after our write covered it
	}
	j.mu.Lock()
	upto := j.written
	if j.f != f {
		// Compacted meanwhile: the rewrite synced the live set, ours included.
		j.mu.Unlock()
		j.synced = max(j.synced, upto)
		return nil
	}
	j.mu.Unlock()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("journal %s: sync after %s: %w", j.path, id, err)
	}
	j.synced = max(j.synced, upto)
	return nil
}

// Gone records that id no longer exists. It is not synced: losing the
// record only makes a restarted fleet delete an id that is already gone.
func (j *journal) Gone(id string) error {
	j.mu.Lock()
	if _, ok := j.live[id]; !ok || j.f == nil {
		delete(j.live, id)
		j.mu.Unlock()
		return nil
	}
	delete(j.live, id)
	_, err := j.f.WriteString("g " + id + "\n")
	j.lines++
	compact := j.needsCompaction()
	j.mu.Unlock()
	if err != nil {
		return fmt.Errorf("journal %s: record %s gone: %w", j.path, id, err)
	}
	if compact {
		return j.compact()
	}
	return nil
}

// journalSlack is how many dead lines a journal may hold before it is
// compacted.
const journalSlack = 256

// needsCompaction reports whether dead lines outnumber live ones by far.
// j.mu is held.
func (j *journal) needsCompaction() bool {
	return j.f != nil && j.lines > 2*len(j.live)+journalSlack
}

// compact rewrites the journal with only the live ids. Locks are taken in
// the order syncMu, mu, as Acquired does.
func (j *journal) compact() error {
	j.syncMu.Lock()
	defer j.syncMu.Unlock()
	j.mu.Lock()
	defer j.mu.Unlock()
	if !j.needsCompaction() {
		return nil
	}
	f, err := j.rewrite()
	if err != nil {
		return err
	}
	j.f.Close()
	j.f = f
	j.lines = len(j.live)
	j.synced = j.written
	return nil
}

// Has reports whether id is recorded as acquired and not gone.
func (j *journal) Has(id string) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	_, ok := j.live[id]
	return ok
}

// Len returns the number of live ids.
func (j *journal) Len() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return len(j.live)
}

// Close closes the file.
func (j *journal) Close() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.f == nil {
		return nil
	}
	err := j.f.Close()
	j.f = nil
	return err
}

// readLines returns the journal file's lines, for tests and diagnostics.
func readLines(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		out = append(out, sc.Text())
	}
	return out, sc.Err()
}
