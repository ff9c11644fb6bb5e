package sim

import (
	"fmt"

	"github.com/mayfly-ci/mayfly/manager/config"
)

// FromConfig fills the fleet settings of opts from runner i of a loaded
// config: schedule, MaxUses, MaxGrowthRate, MaxInstances, CheckInterval and
// MaxJobs (the smaller positive of concurrent and the runner's limit).
func FromConfig(cfg *config.Config, i int, opts *Options) error {
	if i < 0 || i >= len(cfg.Runners) {
		return fmt.Errorf("config %s: no runner %d (it has %d)", cfg.Path, i, len(cfg.Runners))
	}
	r := &cfg.Runners[i]
	opts.Schedule = r.Fleet.Schedule
	opts.MaxUses = r.Fleet.MaxUses
	opts.MaxGrowthRate = r.Fleet.MaxGrowthRate
	opts.MaxInstances = r.Fleet.MaxInstances
	opts.OnDemandWithin = r.Fleet.OnDemandWithin
	opts.CheckInterval = cfg.CheckInterval
	opts.MaxJobs = cfg.Concurrent
	if r.Limit > 0 && (opts.MaxJobs <= 0 || r.Limit < opts.MaxJobs) {
		opts.MaxJobs = r.Limit
	}
	opts.MaxJobs = max(opts.MaxJobs, 0)
	if r.Fleet.Connector.OS == "windows" && opts.Provider.Boot.Median == 0 {
		opts.Provider = DefaultProvider("windows")
	}
	return nil
}
