package manager

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/providers"
)

// The job journal is the crash-safe record of one running job, kept so
// that a manager that dies (kill -9, a crash, a hand-over) can be replaced
// by one that finds the job again and finishes it with its true result.
// It is one file per job, JSON lines appended in order, mode 0600 (it holds
// the job token and the VM's credentials), under <state dir>/jobs. It
// records, before each becomes true: the job (id, token, GitLab URL,
// runner, payload and the runner options its scripts were made with), the
// manager's own trace lines, the instance and how to reach it, the job's
// deadline, each stage's section times and attempt starts, the stages it
// stopped and why, a cancel from GitLab, the result, and the trace offset
// GitLab acknowledged. The trace itself is not kept: a new manager writes
// it again from these records and the stages' output, which stays on the
// VM, byte for byte, and GitLab's 416 tells where to resume.
//
// Records are single writes of whole lines: a manager killed mid-write
// leaves at most a torn last line, which is ignored. The job and instance
// records are synced to disk; the others follow the page cache, which
// survives the death of the process.

// Journal record kinds.
const (
	recJob      = "job"
	recText     = "text"
	recLease    = "lease"
	recDeadline = "deadline"
	recSection  = "sect"
	recAttempt  = "att"
	recStop     = "stop"
	recCancel   = "cancel"
	recResult   = "result"
	recAcked    = "acked"
)

// journalRecord is one line of a job journal.
type journalRecord struct {
	Kind string    `json:"k"`
	At   time.Time `json:"at,omitzero"`

	// job
	Runner  string               `json:"runner,omitempty"`
	URL     string               `json:"url,omitempty"`
	JobID   int64                `json:"job_id,omitempty"`
	Token   string               `json:"token,omitempty"`
	Payload json.RawMessage      `json:"payload,omitempty"`
	Options *buildscript.Options `json:"options,omitempty"`
	Version string               `json:"version,omitempty"`

	// text
	Text string `json:"text,omitempty"`

	// lease
	Instance string                 `json:"instance,omitempty"`
	Connect  *providers.ConnectInfo `json:"connect,omitempty"`
	Dir      string                 `json:"dir,omitempty"`

	// sect, att, stop
	Key    string `json:"key,omitempty"`
	End    bool   `json:"end,omitempty"`
	Reason string `json:"reason,omitempty"`

	// result
	State         string `json:"state,omitempty"`
	FailureReason string `json:"failure_reason,omitempty"`
	ExitCode      int    `json:"exit_code,omitempty"`
	Message       string `json:"message,omitempty"`

	// acked
	Offset int `json:"offset,omitempty"`
}

// journalState is what a job journal says, read back.
type journalState struct {
	job      journalRecord // the job record
	texts    []string      // the manager's trace lines, in order
	lease    *journalRecord
	deadline time.Time
	sections map[string]time.Time // key "/start" or "/end"
	attempts map[string]time.Time
	stops    map[string]buildscript.StopReason
	canceled bool
	result   *journalRecord
	acked    int
}

func newJournalState() *journalState {
	return &journalState{sections: map[string]time.Time{}, attempts: map[string]time.Time{}, stops: map[string]buildscript.StopReason{}}
}

// apply takes one record into the state.
func (s *journalState) apply(r journalRecord) {
	switch r.Kind {
	case recJob:
		s.job = r
	case recText:
		s.texts = append(s.texts, r.Text)
	case recLease:
		rr := r
		s.lease = &rr
	case recDeadline:
		s.deadline = r.At
	case recSection:
		s.sections[sectionMark(r.Key, r.End)] = r.At
	case recAttempt:
		s.attempts[r.Key] = r.At
	case recStop:
		s.stops[r.Key] = buildscript.StopReason(r.Reason)
	case recCancel:
		s.canceled = true
	case recResult:
		rr := r
		s.result = &rr
	case recAcked:
		s.acked = max(s.acked, r.Offset)
	}
}

func sectionMark(key string, end bool) string {
	if end {
		return key + "/end"
	}
	return key + "/start"
}

// jobJournal appends to one job's journal. It implements
// buildscript.Progress over the state it holds, so a resumed Plan.Run
// reads what an earlier process recorded and records the rest.
type jobJournal struct {
	path string
	now  func() time.Time

	mu     sync.Mutex
	f      *os.File
	state  *journalState
	err    error // the first write error; later records are dropped
	frozen bool  // handed over: records are dropped
}

// journalDir is where the job journals of a state directory live.
func journalDir(stateDir string) string { return filepath.Join(stateDir, "jobs") }

// journalPath names the journal of job id of a runner.
func journalPath(dir, runner string, id int64) string {
	sum := sha256.Sum256([]byte(runner))
	return filepath.Join(dir, fmt.Sprintf("job-%d-%s.journal", id, hex.EncodeToString(sum[:4])))
}

// createJobJournal starts the journal of a job with its job record. The
// record is written to a temporary file that is then renamed into place,
// so a journal is never found empty or torn in its first line (which
// would leave the job running in GitLab with nothing to finish it with):
// a manager killed before the rename leaves no journal, one killed after
// it a whole one. The file and its directory are synced after the rename;
// the process's death does not need it (the page cache survives it), a
// power loss does.
func createJobJournal(dir string, rec journalRecord, now func() time.Time) (*jobJournal, error) {
	rec.Kind = recJob
	line, err := json.Marshal(rec)
	if err != nil {
		return nil, fmt.Errorf("job journal: %w", err)
	}
	line = append(line, '\n')
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("job journal: %w", err)
	}
	path := journalPath(dir, rec.Runner, rec.JobID)
	tmp := path + ".new"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("job journal: %w", err)
	}
	if _, err := f.Write(line); err != nil {
		f.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("job journal: %w", err)
	}
	if _, err := os.Stat(path); err == nil {
		f.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("job journal: %s exists already", path)
	}
	if err := os.Rename(tmp, path); err != nil {
		f.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("job journal: %w", err)
	}
	j := &jobJournal{path: path, now: now, f: f, state: newJournalState()}
	j.state.apply(rec)
	if err := f.Sync(); err != nil {
		j.err = fmt.Errorf("job journal %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil { // the new name, durable too
		_ = d.Sync()
		d.Close()
	}
	return j, nil
}

// openJobJournal reopens a journal read by readJobJournal, to append.
func openJobJournal(path string, state *journalState, now func() time.Time) (*jobJournal, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("job journal: %w", err)
	}
	// A torn last line goes: the next record starts a line of its own.
	b, err := os.ReadFile(path)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("job journal: %w", err)
	}
	if keep := int64(bytes.LastIndexByte(b, '\n') + 1); keep < int64(len(b)) {
		if err := f.Truncate(keep); err != nil {
			f.Close()
			return nil, fmt.Errorf("job journal: drop a torn line: %w", err)
		}
	}
	return &jobJournal{path: path, now: now, f: f, state: state}, nil
}

// append writes one record as one line, synced when sync is set.
func (j *jobJournal) append(r journalRecord, sync bool) error {
	if j == nil {
		return nil
	}
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("job journal %s: %w", j.path, err)
	}
	b = append(b, '\n')
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.frozen {
		return nil
	}
	j.state.apply(r)
	if j.err != nil {
		return j.err
	}
	if _, err := j.f.Write(b); err != nil {
		j.err = fmt.Errorf("job journal %s: %w", j.path, err)
		return j.err
	}
	if sync {
		if err := j.f.Sync(); err != nil {
			j.err = fmt.Errorf("job journal %s: %w", j.path, err)
			return j.err
		}
	}
	return nil
}

// text records a line the manager writes to the trace, before it does.
func (j *jobJournal) text(s string) { j.append(journalRecord{Kind: recText, Text: s}, false) }

// leased records the instance the job runs on and how to reach it.
func (j *jobJournal) leased(id string, ci providers.ConnectInfo, dir string) error {
	return j.append(journalRecord{Kind: recLease, Instance: id, Connect: &ci, Dir: dir}, true)
}

func (j *jobJournal) setDeadline(t time.Time) {
	j.append(journalRecord{Kind: recDeadline, At: t}, false)
}
func (j *jobJournal) acked(offset int) {
	j.append(journalRecord{Kind: recAcked, Offset: offset}, false)
}

func (j *jobJournal) cancel() {
	if j != nil {
		j.append(journalRecord{Kind: recCancel, At: j.now()}, false)
	}
}

func (j *jobJournal) result(r jobResult) {
	j.append(journalRecord{Kind: recResult, State: r.state, FailureReason: r.failureReason, ExitCode: r.exitCode, Message: r.message}, false)
}

// Section implements buildscript.Progress.
func (j *jobJournal) Section(key string, end bool) time.Time {
	j.mu.Lock()
	t, ok := j.state.sections[sectionMark(key, end)]
	j.mu.Unlock()
	if ok {
		return t
	}
	t = j.now()
	j.append(journalRecord{Kind: recSection, Key: key, End: end, At: t}, false)
	return t
}

// Attempt implements buildscript.Progress.
func (j *jobJournal) Attempt(id string) time.Time {
	j.mu.Lock()
	t, ok := j.state.attempts[id]
	j.mu.Unlock()
	if ok {
		return t
	}
	t = j.now()
	j.append(journalRecord{Kind: recAttempt, Key: id, At: t}, false)
	return t
}

// Started implements buildscript.Progress.
func (j *jobJournal) Started(id string) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	_, ok := j.state.attempts[id]
	return ok
}

// Stopped implements buildscript.Progress.
func (j *jobJournal) Stopped(id string) (buildscript.StopReason, bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	why, ok := j.state.stops[id]
	return why, ok
}

// RecordStop implements buildscript.Progress.
func (j *jobJournal) RecordStop(id string, why buildscript.StopReason) {
	j.append(journalRecord{Kind: recStop, Key: id, Reason: string(why), At: j.now()}, false)
}

// freeze drops every later record: the job is handed over, and nothing
// this process does to it any more must reach the next one.
func (j *jobJournal) freeze() {
	if j == nil {
		return
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	j.frozen = true
}

// ackedOffset returns the last trace offset recorded as acknowledged.
func (j *jobJournal) ackedOffset() int {
	if j == nil {
		return 0
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.state.acked
}

// close closes the file, keeping the journal (a hand-over).
func (j *jobJournal) close() {
	if j == nil {
		return
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	j.f.Close()
}

// remove ends the journal: the job's end is known to GitLab.
func (j *jobJournal) remove() error {
	if j == nil {
		return nil
	}
	j.close()
	if err := os.Remove(j.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove job journal: %w", err)
	}
	return removeTraceCopy(j.path)
}

// readJobJournal reads a journal. A torn last line is ignored; a damaged
// line before it ends the reading with an error, and the state read so far
// (nil when not even the job record was read).
func readJobJournal(path string) (*journalState, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read job journal: %w", err)
	}
	st := newJournalState()
	lines := bytes.Split(b, []byte("\n"))
	torn := len(lines[len(lines)-1]) > 0 // no newline after the last line
	lines = lines[:len(lines)-1]         // the torn line, or the empty string after the last newline
	_ = torn                             // a torn last line is simply not read
	for i, line := range lines {
		var r journalRecord
		if err := json.Unmarshal(line, &r); err != nil {
			return partial(st), fmt.Errorf("job journal %s: line %d damaged: %w", path, i+1, err)
		}
		if i == 0 && r.Kind != recJob {
			return nil, fmt.Errorf("job journal %s: line 1: a %q record, want the job", path, r.Kind)
		}
		st.apply(r)
	}
	if st.job.Kind != recJob {
		return nil, fmt.Errorf("job journal %s: no job record (torn before the first line ended)", path)
	}
	if err := st.job.validate(); err != nil {
		return nil, fmt.Errorf("job journal %s: %w", path, err)
	}
	return st, nil
}

// partial returns st when it holds a job record, else nil.
func partial(st *journalState) *journalState {
	if st.job.Kind != recJob || st.job.validate() != nil {
		return nil
	}
	return st
}

// validate checks a job record has what finishing the job needs.
func (r journalRecord) validate() error {
	switch {
	case r.JobID <= 0:
		return fmt.Errorf("job record: job_id %d", r.JobID)
	case r.Token == "":
		return errors.New("job record: no token")
	case r.URL == "":
		return errors.New("job record: no GitLab URL")
	case r.Runner == "":
		return errors.New("job record: no runner")
	}
	return nil
}

// listJobJournals returns the journals of a state directory, in name order.
func listJobJournals(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("job journals: %w", err)
	}
	var out []string
	for _, e := range entries {
		if !e.IsDir() && strings.HasSuffix(e.Name(), ".journal") {
			out = append(out, filepath.Join(dir, e.Name()))
		}
	}
	sort.Strings(out)
	return out, nil
}

// recoverNewJournals finishes the creation of journals a manager was
// killed in the middle of: one whose job record was written whole is
// renamed into place, to be resumed; one without a whole record is
// removed (nothing can finish its job: GitLab fails it as stuck).
func recoverNewJournals(dir string) (recovered, removed []string, err error) {
	news, err := filepath.Glob(filepath.Join(dir, "*.journal.new"))
	if err != nil {
		return nil, nil, fmt.Errorf("job journals: %w", err)
	}
	for _, tmp := range news {
		path := strings.TrimSuffix(tmp, ".new")
		if _, err := os.Stat(path); err != nil {
			if st, err := readJobJournal(tmp); st != nil && err == nil {
				if err := os.Rename(tmp, path); err != nil {
					return recovered, removed, fmt.Errorf("job journals: %w", err)
				}
				recovered = append(recovered, path)
				continue
			}
		}
		if err := os.Remove(tmp); err != nil {
			return recovered, removed, fmt.Errorf("job journals: %w", err)
		}
		removed = append(removed, tmp)
	}
	return recovered, removed, nil
}
