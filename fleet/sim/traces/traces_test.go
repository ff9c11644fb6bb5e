package traces

import (
	"path/filepath"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/fleet/sim"
)

func TestShapes(t *testing.T) {
	eval := 0
	for _, sh := range Shapes {
		t.Run(sh.Name, func(t *testing.T) {
			a, b := sh.Generate(7), sh.Generate(7)
			if len(a) < 1000 || !reflect.DeepEqual(a, b) {
				t.Fatalf("%d jobs; two generations with one seed equal: %v", len(a), reflect.DeepEqual(a, b))
			}
			if reflect.DeepEqual(a, sh.Generate(8)) {
				t.Error("seeds 7 and 8 give the same trace")
			}
			if !slices.IsSortedFunc(a, func(x, y sim.Job) int { return x.Arrival.Compare(y.Arrival) }) {
				t.Error("not sorted by arrival")
			}
			for _, j := range a {
				if j.OS != sh.OS || j.Duration < 10*time.Second || j.Duration > 3*time.Hour || j.Arrival.Before(Epoch) {
					t.Fatalf("job %+v out of the shape's bounds", j)
				}
			}
		})
		if sh.Evaluation {
			eval++
		}
	}
	if eval < 6 || eval == len(Shapes) {
		t.Errorf("%d evaluation shapes of %d: want at least 6, and tuning ones too", eval, len(Shapes))
	}
	if _, err := Lookup("nope"); err == nil {
		t.Error("Lookup of an unknown shape succeeded")
	}
}

// TestRepositoryTraces: testdata/traces holds each shape at the default
// seed, as gentraces writes it.
func TestRepositoryTraces(t *testing.T) {
	for _, sh := range Shapes {
		got, err := sim.LoadTrace(filepath.Join("../../../testdata/traces", sh.Name+".csv"))
		if err != nil {
			t.Fatal(err)
		}
		want := sh.Generate(20261102)
		for i := range want {
			want[i].Duration = want[i].Duration.Round(time.Second)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s.csv differs from the shape at seed 20261102: regenerate with go run ./fleet/sim/cmd/gentraces", sh.Name)
		}
	}
}
