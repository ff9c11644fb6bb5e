package main

import (
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/fleet"
	"github.com/mayfly-ci/mayfly/fleet/sim"
	"github.com/mayfly-ci/mayfly/manager/config"
)

// TestSimOptionsFromHostedConfig: the hosted config's fleet reaches the
// simulator unchanged, through the one fleet.Limits type.
func TestSimOptionsFromHostedConfig(t *testing.T) {
	cfg, err := config.Load("../../testdata/hosted-gcp-linux.toml")
	if err != nil {
		t.Fatal(err)
	}
	var o sim.Options
	if err := simOptions(cfg, 0, &o); err != nil {
		t.Fatal(err)
	}
	want := fleet.Limits{MaxUses: 1, MaxGrowthRate: 100, MaxInstances: 1000, OnDemandWithin: config.DefaultOnDemandWithin, BootTimeout: config.DefaultConnectTimeout, CheckInterval: 3 * time.Second}
	if o.Limits != want {
		t.Errorf("limits %+v, want %+v", o.Limits, want)
	}
	if o.MaxJobs != 1000 || o.Schedule.Default.IdleCount != 50 || len(o.Schedule.Entries) != 2 || o.Schedule.Entries[1].Policy.IdleCount != 700 {
		t.Errorf("max jobs %d, schedule %+v", o.MaxJobs, o.Schedule)
	}
	if err := simOptions(cfg, 1, &o); err == nil {
		t.Error("runner 1 of a one-runner config accepted")
	}
}
