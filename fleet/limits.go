package fleet

import (
	"fmt"
	"time"
)

// Limits are a fleet's bounds and cadences: the one type the runner's
// configuration (manager/config), the runtime fleet (Config), its pure
// decisions (Decide, Reservable) and the simulator (fleet/sim) share.
// Zero values take the defaults named.
type Limits struct {
	// MaxUses is how many jobs an instance runs before it is deleted
	// (MaxBuilds, max_use_count); 0 means 1.
	MaxUses int
	// MaxGrowthRate caps instances being created (requested, creating,
	// provisioning) at once (MaxGrowthRate, max_growth_rate); 0 = no cap.
	MaxGrowthRate int
	// MaxInstances caps instances in every state, deleting included
	// (limit, max_instances); 0 = no cap.
	MaxInstances int
	// OnDemandWithin turns on taking jobs before an instance is idle for
	// them (see Reservable); 0 keeps docker+machine's refusal (only idle
	// instances, unless IdleCount is 0). When MaxInstances, MaxGrowthRate
	// or the creation breaker stop a new instance, a job is still taken
	// for one on its way if that one is expected within OnDemandWithin.
	OnDemandWithin time.Duration
	// BootTimeout is how long an instance may take from creation to
	// ready before the watchdog deletes it and counts a provider failure
	// (default 10m in Config; 0 in Decide: forever).
	BootTimeout time.Duration
	// CheckInterval is how often the runner asks for jobs (check_interval):
	// part of the lead time of the predictive policy (default 3s).
	CheckInterval time.Duration
	// ListInterval is how often the provider's list is read
	// (update_interval): the longest a preempted or vanished instance can
	// go unnoticed (default 1m).
	ListInterval time.Duration
	// ListIntervalBooting is how often the list is read while an instance
	// is due to finish booting (update_interval_when_expecting; default 2s).
	ListIntervalBooting time.Duration
}

// Validate reports the first negative field.
func (l Limits) Validate() error {
	for _, f := range []struct {
		name string
		v    int
	}{{"MaxUses", l.MaxUses}, {"MaxGrowthRate", l.MaxGrowthRate}, {"MaxInstances", l.MaxInstances}} {
		if f.v < 0 {
			return fmt.Errorf("%s must not be negative, got %d", f.name, f.v)
		}
	}
	for _, f := range []struct {
		name string
		v    time.Duration
	}{
		{"OnDemandWithin", l.OnDemandWithin}, {"BootTimeout", l.BootTimeout}, {"CheckInterval", l.CheckInterval},
		{"ListInterval", l.ListInterval}, {"ListIntervalBooting", l.ListIntervalBooting},
	} {
		if f.v < 0 {
			return fmt.Errorf("%s must not be negative, got %s", f.name, f.v)
		}
	}
	return nil
}

// WithDefaults returns l with the defaults of the zero fields filled in.
func (l Limits) WithDefaults() Limits {
	if l.MaxUses == 0 {
		l.MaxUses = 1
	}
	set := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	set(&l.BootTimeout, DefaultBootTimeout)
	set(&l.CheckInterval, DefaultCheckInterval)
	set(&l.ListInterval, DefaultListInterval)
	set(&l.ListIntervalBooting, DefaultListIntervalBooting)
	return l
}

// Defaults of Limits.
const (
	// DefaultBootTimeout bounds creation to ready.
	DefaultBootTimeout = 10 * time.Minute
	// DefaultCheckInterval is gitlab-runner's default check_interval.
	DefaultCheckInterval = 3 * time.Second
	// DefaultListInterval is taskscaler's default update_interval.
	DefaultListInterval = time.Minute
	// DefaultListIntervalBooting is taskscaler's default
	// update_interval_when_expecting.
	DefaultListIntervalBooting = 2 * time.Second
)
