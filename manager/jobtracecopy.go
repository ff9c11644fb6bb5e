package manager

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
)

// traceCopy keeps, beside a job's journal, a copy of the job's trace as
// GitLab receives it (masked): every byte reaches the copy before it can
// go to GitLab. A manager that resumes the job rebuilds the trace from the
// journal and the stages' output on the VM; when it cannot (the VM is
// gone or unreachable, the journal damaged), it writes the copy instead,
// so that the line saying why the job failed lands after what GitLab
// already has, and the trace still matches its checksum. Mode 0600, like
// the journal; removed with it.
type traceCopy struct {
	path  string
	limit int64 // bytes past the output limit are not kept

	mu  sync.Mutex
	f   *os.File
	off int64
	err error // the first write error; the copy then stops
}

// traceCopyPath names the trace copy of a journal.
func traceCopyPath(journal string) string {
	return strings.TrimSuffix(journal, ".journal") + ".trace"
}

// createTraceCopy starts the trace copy of a new job.
func createTraceCopy(path string, limit int) (*traceCopy, error) {
	return openTraceCopyFlags(path, limit, os.O_TRUNC)
}

// openTraceCopy opens a resumed job's trace copy to write from its start:
// the job writes the same bytes over the old copy, which keeps its length,
// so nothing GitLab has is lost from it should this manager die too.
func openTraceCopy(path string, limit int) (*traceCopy, error) {
	return openTraceCopyFlags(path, limit, 0)
}

func openTraceCopyFlags(path string, limit, flags int) (*traceCopy, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|flags, 0o600)
	if err != nil {
		return nil, fmt.Errorf("trace copy: %w", err)
	}
	return &traceCopy{path: path, limit: int64(limit) + 64<<10, f: f}, nil
}

// Write keeps p in the copy; it never fails, so the trace goes on
// without its copy when the disk refuses.
func (c *traceCopy) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil && c.off < c.limit {
		keep := p[:min(int64(len(p)), c.limit-c.off)]
		if _, err := c.f.WriteAt(keep, c.off); err != nil {
			c.err = fmt.Errorf("trace copy %s: %w", c.path, err)
		}
	}
	c.off += int64(len(p))
	return len(p), nil
}

// close closes the file, keeping the copy.
func (c *traceCopy) close() {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.f.Close()
}

// readTraceCopy returns the trace copy of a journal, or nil.
func readTraceCopy(journal string) []byte {
	b, err := os.ReadFile(traceCopyPath(journal))
	if err != nil {
		return nil
	}
	return b
}

// removeTraceCopy removes the trace copy of a journal.
func removeTraceCopy(journal string) error {
	if err := os.Remove(traceCopyPath(journal)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove trace copy: %w", err)
	}
	return nil
}

// teeTrace writes to the trace copy, then to the trace.
type teeTrace struct {
	copy  *traceCopy
	trace io.Writer
}

func (t teeTrace) Write(p []byte) (int, error) {
	t.copy.Write(p)
	return t.trace.Write(p)
}
