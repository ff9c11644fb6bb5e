package fake

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
)

// The chaos mode fails about Rate of the calls with every kind it names,
// the same way for the same seed; a create that times out for its caller
// still makes its instances (List shows them); some instances are
// preempted after their boot; every fault is in the fault log.
func TestChaosFaultsAtARate(t *testing.T) {
	run := func(seed uint64) (kinds map[string]int, failed int, log string) {
		dir := t.TempDir()
		f, c := newFake(t, Options{BootDelay: time.Second})
		spec, _ := json.Marshal(Settings{StateDir: dir, Chaos: &ChaosSpec{Rate: 0.3, Seed: seed}})
		if _, err := f.Init(context.Background(), spec); err != nil {
			t.Fatal(err)
		}
		kinds = map[string]int{}
		madeUnseen := 0
		for range 200 {
			before := len(f.Instances())
			ids, err := f.Create(context.Background(), 1, map[string]string{"k": "v"})
			if err == nil {
				continue
			}
			failed++
			switch kind := providers.KindOf(err); {
			case kind == providers.KindRateLimited:
				if d, _ := providers.IsRateLimited(err); d != time.Second {
					t.Errorf("rate limit with Retry-After %v, want 1s", d)
				}
				kinds[ChaosRateLimited]++
			case kind == providers.KindQuotaExceeded:
				kinds[ChaosQuota]++
			case kind == providers.KindCapacityExhausted:
				kinds[ChaosStockout]++
			case kind == providers.KindTransient && strings.Contains(err.Error(), "timed out after the cloud accepted it"):
				kinds[ChaosCreateTimeout]++
				if len(ids) != 0 || len(f.Instances()) != before+1 {
					t.Errorf("a create that timed out: ids %v, instances %d -> %d; want none returned and one made", ids, before, len(f.Instances()))
				}
				madeUnseen++
			case kind == providers.KindTransient:
				kinds[ChaosServerError]++
			default:
				t.Errorf("unexpected fault %v (%v)", err, kind)
			}
		}
		c.Advance(10 * time.Second)
		preempted := 0
		for _, in := range f.Instances() {
			if in.State == providers.StateFailed && in.Reason == "preempted" {
				preempted++
			}
		}
		if preempted < 20 || preempted > 80 {
			t.Errorf("%d of about 150 instances preempted, want about 30%%", preempted)
		}
		if madeUnseen == 0 {
			t.Error("no create timed out for its caller")
		}
		b, err := os.ReadFile(filepath.Join(dir, FaultLogName))
		if err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(string(b), "\n"); n != failed+preempted {
			t.Errorf("fault log has %d lines, want %d faults + %d preemptions", n, failed, preempted)
		}
		lines := strings.Split(string(b), "\n")
		slices.Sort(lines) // preemptions are found in map order
		return kinds, failed, strings.Join(lines, "\n")
	}
	kinds, failed, log1 := run(7)
	if failed < 35 || failed > 85 {
		t.Errorf("%d of 200 creates failed, want about 60", failed)
	}
	for _, k := range []string{ChaosRateLimited, ChaosServerError, ChaosQuota, ChaosStockout, ChaosCreateTimeout} {
		if kinds[k] == 0 {
			t.Errorf("no %s fault in 200 creates: %v", k, kinds)
		}
	}
	if _, _, log2 := run(7); log2 != log1 {
		t.Error("the same seed gave other faults")
	}
}

func TestChaosSpecChecked(t *testing.T) {
	f, _ := newFake(t, Options{})
	for _, spec := range []*ChaosSpec{{Rate: 1.5}, {Rate: 0.1, Ops: []Op{OpInit}}, {First: "meteor"}} {
		raw, _ := json.Marshal(Settings{Chaos: spec})
		if _, err := f.Init(context.Background(), raw); err == nil || !strings.Contains(err.Error(), `"chaos"`) {
			t.Errorf("Init with %+v: %v, want an error naming the key chaos", spec, err)
		}
	}
}

// First forces one fault a run: the first create fails with its kind, or
// the first instance is preempted.
func TestChaosFirstFault(t *testing.T) {
	for _, first := range []string{ChaosRateLimited, ChaosServerError, ChaosQuota, ChaosStockout, ChaosCreateTimeout, ChaosPreempted} {
		t.Run(first, func(t *testing.T) {
			f, c := newFake(t, Options{BootDelay: time.Second})
			raw, _ := json.Marshal(Settings{Chaos: &ChaosSpec{First: first}}) // rate 0: nothing else
			if _, err := f.Init(context.Background(), raw); err != nil {
				t.Fatal(err)
			}
			_, err1 := f.Create(context.Background(), 1, nil)
			_, err2 := f.Create(context.Background(), 1, nil)
			if err2 != nil {
				t.Errorf("second create: %v, want no fault", err2)
			}
			c.Advance(10 * time.Second)
			preempted := 0
			for _, in := range f.Instances() {
				if in.Reason == "preempted" {
					preempted++
				}
			}
			if first == ChaosPreempted {
				if err1 != nil || preempted != 1 {
					t.Errorf("first create: %v, %d preempted; want no error and one preempted", err1, preempted)
				}
				return
			}
			if err1 == nil || preempted != 0 {
				t.Errorf("first create: %v, %d preempted; want a %s fault and none preempted", err1, preempted, first)
			}
		})
	}
}
