package fleet

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
)

func TestJournalRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "journal")
	live, trusted, err := loadJournal(path)
	if err != nil || trusted || len(live) != 0 {
		t.Fatalf("missing journal: live %v trusted %v err %v", live, trusted, err)
	}
	j, err := createJournal(path, []string{"old-1"})
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"a-1", "a-2", "a-3"} {
		if err := j.Acquired(id); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"a-2", "old-1", "never-acquired"} {
		if err := j.Gone(id); err != nil {
			t.Fatal(err)
		}
	}
	if !j.Has("a-1") || j.Has("a-2") || j.Len() != 2 {
		t.Fatalf("live set wrong: len %d", j.Len())
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	live, trusted, err = loadJournal(path)
	if err != nil || !trusted {
		t.Fatalf("reload: trusted %v err %v", trusted, err)
	}
	if got := slices.Sorted(maps.Keys(live)); !slices.Equal(got, []string{"a-1", "a-3"}) {
		t.Fatalf("reloaded live %v, want [a-1 a-3]", got)
	}
	lines, _ := readLines(path)
	if lines[0] != journalHeader {
		t.Fatalf("first line %q", lines[0])
	}
}

func TestJournalDamagedIsNotTrusted(t *testing.T) {
	for name, content := range map[string]string{
		"empty":       "",
		"torn tail":   journalHeader + "\na x-1\na x-",
		"bad header":  "something else\na x-1\n",
		"bad op":      journalHeader + "\nz x-1\n",
		"missing id":  journalHeader + "\na\n",
		"spaces":      journalHeader + "\na x 1\n",
		"binary junk": journalHeader + "\n\x00\x01\n",
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "journal")
			if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			if _, trusted, err := loadJournal(path); trusted || err != nil {
				t.Fatalf("trusted %v err %v, want untrusted", trusted, err)
			}
		})
	}
}

func TestJournalCompacts(t *testing.T) {
	path := filepath.Join(t.TempDir(), "journal")
	j, err := createJournal(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	const n = 5000
	for i := range n {
		id := fmt.Sprintf("i-%d", i)
		if err := j.Acquired(id); err != nil {
			t.Fatal(err)
		}
		if i%10 != 0 { // keep every tenth live
			if err := j.Gone(id); err != nil {
				t.Fatal(err)
			}
		}
	}
	lines, err := readLines(path)
	if err != nil {
		t.Fatal(err)
	}
	if max := 1 + 2*(n/10) + journalSlack + 2; len(lines) > max {
		t.Fatalf("journal has %d lines for %d live ids, want at most %d", len(lines), n/10, max)
	}
	live, trusted, err := loadJournal(path)
	if err != nil || !trusted || len(live) != n/10 {
		t.Fatalf("after compaction: %d live, trusted %v, err %v", len(live), trusted, err)
	}
}

func TestJournalConcurrentAcquired(t *testing.T) {
	path := filepath.Join(t.TempDir(), "journal")
	j, err := createJournal(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for g := range 50 {
		wg.Go(func() {
			for i := range 20 {
				id := fmt.Sprintf("g%d-%d", g, i)
				if err := j.Acquired(id); err != nil {
					t.Error(err)
				}
				if i%2 == 0 {
					if err := j.Gone(id); err != nil {
						t.Error(err)
					}
				}
			}
		})
	}
	wg.Wait()
	j.Close()
	live, trusted, err := loadJournal(path)
	if err != nil || !trusted || len(live) != 50*10 {
		t.Fatalf("%d live, trusted %v, err %v; want 500", len(live), trusted, err)
	}
}

func TestMemoryJournal(t *testing.T) {
	j, err := createJournal("", []string{"x"})
	if err != nil {
		t.Fatal(err)
	}
	if err := j.Acquired("y"); err != nil {
		t.Fatal(err)
	}
	if !j.Has("x") || !j.Has("y") || j.Close() != nil {
		t.Fatal("memory journal")
	}
	if _, trusted, _ := loadJournal(""); trusted {
		t.Fatal("an in-memory journal is trusted after a restart")
	}
}
