package main

import (
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/fleet"
)

func TestStatusLine(t *testing.T) {
	at := time.Date(2026, 11, 2, 9, 30, 0, 0, time.UTC)
	for _, tt := range []struct {
		name string
		st   fleet.Status
		want []string
	}{
		{"empty", fleet.Status{Runner: "linux", Time: at}, []string{"09:30:00 fleet linux: no instances; idle target 0"}},
		{"calls per job", fleet.Status{
			Runner: "linux", Time: at, IdleTarget: 2, Counts: map[string]int{"idle": 2, "acquired": 1},
			JobsDone: 10, APICalls: map[string]int{"create": 10, "delete": 9, "list": 3},
		}, []string{"1 acquired, 2 idle", "10 jobs, 2.20 provider calls/job (create 1.00, delete 0.90, list 0.30)"}},
		{"invariant broken", fleet.Status{Runner: "linux", Time: at, DeletedUnusedWhileWaiting: 3}, []string{"3 deleted unused while jobs waited"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := statusLine(tt.st)
			for _, w := range tt.want {
				if !strings.Contains(got, w) {
					t.Errorf("status line %q lacks %q", got, w)
				}
			}
		})
	}
}
