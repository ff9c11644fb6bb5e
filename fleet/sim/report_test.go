package sim

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/schedule"
)

func TestWriters(t *testing.T) {
	r, err := Run(smallCase(PolicyTaskscaler, schedule.Policy{Style: schedule.Taskscaler, IdleCount: 2, IdleTime: time.Hour, PreemptiveMode: true}))
	if err != nil {
		t.Fatal(err)
	}
	var tb bytes.Buffer
	if err := WriteTable(&tb, r); err != nil {
		t.Fatal(err)
	}
	out := tb.String()
	for _, want := range []string{"p90 s", "taskscaler", "100.0%", "taskscaler assumptions:", "INFERRED capacity formula"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	var jb bytes.Buffer
	if err := WriteJSON(&jb, r); err != nil {
		t.Fatal(err)
	}
	var back []Report
	if err := json.Unmarshal(jb.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	if len(back) != 1 || back[0].LatencyP90 != 30 || back[0].Jobs != 3 {
		t.Errorf("JSON round trip: %+v", back)
	}
}

func TestUnstartedJobsAreInfinite(t *testing.T) {
	// The pool's VMs take 5 hours to boot: within the 1-hour horizon
	// mayfly never has an instance to promise, so it never asks for a job.
	o := smallCase(PolicyMayfly, schedule.Policy{IdleCount: 2})
	o.Provider.Boot.Median = 5 * time.Hour
	o.BootTimeout = 24 * time.Hour
	o.OnDemandWithin = 90 * time.Second
	o.Horizon = time.Hour
	r, err := Run(o)
	if err != nil {
		t.Fatal(err)
	}
	if r.Started != 0 || r.LatencyP50 != -1 || r.LatencyMax != -1 || r.WithinSLO != 0 {
		t.Errorf("got %+v", r)
	}
	var tb bytes.Buffer
	if err := WriteTable(&tb, r); err != nil || !strings.Contains(tb.String(), "inf") {
		t.Errorf("table: %v\n%s", err, tb.String())
	}
}
