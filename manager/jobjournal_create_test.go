package manager

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// A manager killed as it creates a journal leaves the temporary file: with
// the job record whole it becomes the journal (the job is resumed), empty
// or torn it is removed; a finished creation leaves no temporary file.
func TestJobJournalKilledAtCreation(t *testing.T) {
	j, path := testJournal(t)
	j.close()
	if _, err := os.Stat(path + ".new"); !os.IsNotExist(err) {
		t.Fatalf("temporary file left after the creation: %v", err)
	}
	whole, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Dir(path)
	for _, tt := range []struct {
		name      string
		content   []byte
		recovered bool
	}{
		{"whole", whole, true},
		{"empty", nil, false},
		{"torn", whole[:len(whole)/2], false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			os.Remove(path)
			if err := os.WriteFile(path+".new", tt.content, 0o600); err != nil {
				t.Fatal(err)
			}
			recovered, removed, err := recoverNewJournals(dir)
			if err != nil {
				t.Fatal(err)
			}
			if tt.recovered != (len(recovered) == 1) || tt.recovered == (len(removed) == 1) {
				t.Fatalf("recovered %v removed %v", recovered, removed)
			}
			if _, err := os.Stat(path + ".new"); !os.IsNotExist(err) {
				t.Errorf("temporary file still there: %v", err)
			}
			st, err := readJobJournal(path)
			if tt.recovered && (err != nil || st.job.JobID != 7) {
				t.Errorf("recovered journal: %v %+v", err, st)
			}
			if !tt.recovered && err == nil {
				t.Errorf("a journal appeared from a %s temporary file", tt.name)
			}
		})
	}
	// A second creation of the same job's journal is refused.
	rec := journalRecord{Runner: "r1", URL: "http://gitlab", JobID: 8, Token: "t"}
	first, err := createJobJournal(dir, rec, time.Now)
	if err != nil {
		t.Fatal(err)
	}
	first.close()
	if _, err := createJobJournal(dir, rec, time.Now); err == nil {
		t.Error("a second journal of job 8 was created")
	}
}
