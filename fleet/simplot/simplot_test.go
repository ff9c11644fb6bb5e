package simplot

import (
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/fleet/sim"
	"github.com/mayfly-ci/mayfly/schedule"
)

func TestWritePNG(t *testing.T) {
	t0 := time.Date(2026, 11, 23, 0, 0, 0, 0, time.UTC)
	var jobs []sim.Job
	for i := 0; i < 40; i++ {
		jobs = append(jobs, sim.Job{Arrival: t0.Add(time.Duration(i) * 90 * time.Second), Duration: 5 * time.Minute})
	}
	r, err := sim.Run(sim.Options{
		Policy:     sim.PolicyDockerMachine,
		Trace:      "synthetic",
		Jobs:       jobs,
		Schedule:   schedule.Schedule{Default: schedule.Policy{IdleCount: 2, IdleTime: 10 * time.Minute}},
		Provider:   sim.DefaultProvider("linux"),
		SeriesStep: time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "fleet.png")
	if err := WritePNG(path, r); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("not a PNG: %v", err)
	}
	if b := img.Bounds(); b.Dx() < 500 || b.Dy() < 300 {
		t.Errorf("picture is %dx%d", b.Dx(), b.Dy())
	}

	r.Series = nil
	if err := WritePNG(path, r); err == nil || !strings.Contains(err.Error(), "no series") {
		t.Errorf("WritePNG without a series: %v", err)
	}
}
