package manager

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/providers"
)

func testJournal(t *testing.T) (*jobJournal, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "jobs")
	clock := time.Unix(1_700_000_000, 0)
	now := func() time.Time { clock = clock.Add(time.Second); return clock }
	j, err := createJobJournal(dir, journalRecord{Runner: "r1", URL: "http://gitlab", JobID: 7, Token: "tok-secret",
		Payload: []byte(`{"id":7}`), Options: &buildscript.Options{Shell: "sh"}}, now)
	if err != nil {
		t.Fatal(err)
	}
	return j, j.path
}

// What a journal records reads back the same, and the file is 0600.
func TestJobJournalRoundTrip(t *testing.T) {
	j, path := testJournal(t)
	j.text("Running with mayfly\n")
	if err := j.leased("vm-1", providers.ConnectInfo{ID: "vm-1", Address: "10.0.0.1", Port: 22, HostKey: "ssh-ed25519 AAA"}, "/builds/.mayfly/job-7"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Unix(1_700_003_600, 0)
	j.setDeadline(deadline)
	start := j.Section("00-prepare_script-0", false)
	att := j.Attempt("00-prepare_script-1")
	j.RecordStop("00-prepare_script-1", buildscript.StopStageTimeout)
	j.cancel()
	j.acked(123)
	j.result(jobResult{state: "failed", failureReason: "script_failure", exitCode: 3, message: "exit code 3"})
	j.close()

	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("journal mode %v, %v; want 0600", fi.Mode(), err)
	}
	st, err := readJobJournal(path)
	if err != nil {
		t.Fatal(err)
	}
	switch {
	case st.job.JobID != 7 || st.job.Token != "tok-secret" || st.job.Options.Shell != "sh":
		t.Errorf("job %+v", st.job)
	case len(st.texts) != 1 || st.texts[0] != "Running with mayfly\n":
		t.Errorf("texts %q", st.texts)
	case st.lease == nil || st.lease.Instance != "vm-1" || st.lease.Connect.HostKey != "ssh-ed25519 AAA" || st.lease.Dir != "/builds/.mayfly/job-7":
		t.Errorf("lease %+v", st.lease)
	case !st.deadline.Equal(deadline) || !st.canceled || st.acked != 123:
		t.Errorf("deadline %v canceled %v acked %d", st.deadline, st.canceled, st.acked)
	case !st.sections["00-prepare_script-0/start"].Equal(start) || !st.attempts["00-prepare_script-1"].Equal(att):
		t.Errorf("sections %v attempts %v", st.sections, st.attempts)
	case st.stops["00-prepare_script-1"] != buildscript.StopStageTimeout:
		t.Errorf("stops %v", st.stops)
	case st.result == nil || st.result.ExitCode != 3 || st.result.FailureReason != "script_failure":
		t.Errorf("result %+v", st.result)
	}
	// A reopened journal answers Progress from what it read.
	j2, err := openJobJournal(path, st, time.Now)
	if err != nil {
		t.Fatal(err)
	}
	if got := j2.Section("00-prepare_script-0", false); !got.Equal(start) || !j2.Started("00-prepare_script-1") {
		t.Errorf("reopened: section %v started %v", got, j2.Started("00-prepare_script-1"))
	}
	j2.close()
}

// A journal torn in the middle of a write (the manager killed then) reads
// as if the torn record had never been written; one torn inside its first
// line has no job; a damaged line before the end is an error that keeps
// what was read before it.
func TestJobJournalTornWrite(t *testing.T) {
	j, path := testJournal(t)
	j.text("one\n")
	j.text("two\n")
	j.close()
	whole, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for cut := 1; cut < len(whole); cut++ {
		if err := os.WriteFile(path, whole[:cut], 0o600); err != nil {
			t.Fatal(err)
		}
		st, err := readJobJournal(path)
		lines := strings.Count(string(whole[:cut]), "\n")
		switch {
		case lines == 0:
			if st != nil || err == nil {
				t.Fatalf("cut %d, in the job record: %v %v, want no state and an error", cut, st, err)
			}
		default:
			if err != nil || st == nil || len(st.texts) != lines-1 {
				t.Fatalf("cut %d (%d whole lines): %v, texts %v", cut, lines, err, st)
			}
			// Reopening drops the torn part: the next record is whole.
			j2, err := openJobJournal(path, st, time.Now)
			if err != nil {
				t.Fatal(err)
			}
			j2.text("three\n")
			j2.close()
			st2, err := readJobJournal(path)
			if err != nil || len(st2.texts) != lines {
				t.Fatalf("cut %d: after a record appended to the reopened journal: %v %v", cut, err, st2)
			}
		}
	}

	lines := strings.Split(string(whole), "\n")
	lines[1] = `{"k":"text","text":`
	if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")), 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := readJobJournal(path)
	if err == nil || !strings.Contains(err.Error(), "line 2 damaged") || st == nil || st.job.JobID != 7 {
		t.Errorf("damaged journal: %v, %+v; want an error naming line 2 and the job kept", err, st)
	}
}
