package fleet

import (
	"slices"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/schedule"
)

// InstanceStatus is one instance row of Status.
type InstanceStatus struct {
	ID        string    `json:"id"`
	State     State     `json:"state"`
	Since     time.Time `json:"since"`
	CreatedAt time.Time `json:"created_at"`
	IdleSince time.Time `json:"idle_since,omitzero"`
	Uses      int       `json:"uses"`
	Reason    Reason    `json:"reason,omitempty"`
}

// Status is a snapshot of the fleet for `mayfly fleet status` and the
// demo's live view.
type Status struct {
	Runner      string          `json:"runner"`
	Time        time.Time       `json:"time"`
	PolicyEntry int             `json:"policy_entry"` // schedule.NoEntry for the default
	Policy      schedule.Policy `json:"policy"`
	IdleTarget  int             `json:"idle_target"`
	Held        string          `json:"held,omitempty"`
	Counts      map[string]int  `json:"counts"`
	Reserved    int             `json:"reserved"` // jobs promised an instance not yet handed out
	// DeletedUnusedWhileWaiting counts instances deleted unused by the
	// fleet's choice while jobs were promised one: an invariant, always 0.
	DeletedUnusedWhileWaiting int     `json:"deleted_unused_while_waiting"`
	Breaker                   Breaker `json:"breaker"`
	// APICalls counts provider calls by kind since the fleet started.
	APICalls map[string]int `json:"api_calls"`
	// JobsDone counts jobs that ran on the fleet's instances (leases
	// released after a job).
	JobsDone  int              `json:"jobs_done"`
	Instances []InstanceStatus `json:"instances"`
}

// Status returns the fleet's current state, instances sorted by creation.
func (f *Fleet) Status() Status {
	f.mu.Lock()
	st := Status{
		Runner:                    f.cfg.Name,
		Time:                      f.clock.Now(),
		PolicyEntry:               f.policyEntry,
		Policy:                    f.policy,
		IdleTarget:                f.lastPlan.IdleTarget,
		Held:                      f.lastPlan.Held,
		Counts:                    make(map[string]int, NumStates),
		Reserved:                  f.reserved,
		DeletedUnusedWhileWaiting: f.wastedWhileWaiting,
		JobsDone:                  f.jobsDone,
		Breaker:                   f.breaker,
		Instances:                 make([]InstanceStatus, 0, len(f.books)),
	}
	for s := range NumStates {
		if State(s) != StateGone {
			st.Counts[State(s).String()] = f.counts[s]
		}
	}
	for _, in := range f.books {
		st.Instances = append(st.Instances, InstanceStatus{
			ID: in.id, State: in.state, Since: in.since, CreatedAt: in.createdAt,
			IdleSince: in.idleSince, Uses: in.uses, Reason: in.reason,
		})
	}
	f.mu.Unlock()
	st.APICalls = f.api.Calls()
	slices.SortFunc(st.Instances, func(a, b InstanceStatus) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return st
}

// CallsPerJob returns the provider calls per job done (0 before the
// first): the API budget, whose floor is 2 (one create, one delete) when
// every instance runs one job and calls are not batched.
func (st Status) CallsPerJob() float64 {
	if st.JobsDone == 0 {
		return 0
	}
	n := 0
	for _, c := range st.APICalls {
		n += c
	}
	return float64(n) / float64(st.JobsDone)
}

// Gauges are a few figures of the fleet, cheap to read often (Status
// copies every instance).
type Gauges struct {
	// IdleTarget is the idle target of the last scaler pass.
	IdleTarget int
	// Waiting counts the Acquire calls blocked waiting for an instance.
	Waiting int
	// Reserved counts the promises not yet handed an instance.
	Reserved int
	// DeletedUnusedWhileWaiting is Status's invariant counter.
	DeletedUnusedWhileWaiting int
}

// Gauges returns the fleet's gauges now.
func (f *Fleet) Gauges() Gauges {
	f.mu.Lock()
	defer f.mu.Unlock()
	return Gauges{IdleTarget: f.lastPlan.IdleTarget, Waiting: len(f.waiters), Reserved: f.reserved, DeletedUnusedWhileWaiting: f.wastedWhileWaiting}
}
