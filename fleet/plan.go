package fleet

import (
	"cmp"
	"slices"
	"time"

	"github.com/mayfly-ci/mayfly/schedule"
)

// InstanceView is one instance of the books as Decide sees it.
type InstanceView struct {
	ID    string
	State State
	// CreatedAt is when the provider returned the instance's id (or when a
	// restarted fleet adopted it); the boot watchdog counts from here.
	CreatedAt time.Time
	// IdleSince is when the instance last became idle: ready after
	// creation, or back from a job with uses left. An acquisition that got
	// no job does not reset it.
	IdleSince time.Time
	// Uses is how many jobs the instance has run.
	Uses int
}

// Snapshot is the fleet's books at one instant: the input of Decide.
type Snapshot struct {
	Now time.Time
	// Instances holds every instance with an id that is not gone.
	Instances []InstanceView
	// Requested is the number of instances asked for by Create calls that
	// have not returned.
	Requested int
	// Reserved is the number of jobs promised an instance and not yet
	// handed one: reservations (GitLab may still have no job for them)
	// and Waiting. An idle instance a promise may take is never surplus.
	Reserved int
	// Waiting is the number of jobs that came and wait for an instance
	// (blocked Acquire calls, included in Reserved): demand the scaler
	// creates instances for, on top of the idle target.
	Waiting int
	// Breaker is the creation circuit breaker of the provider.
	Breaker Breaker
	// Demand is the measured traffic, used when the policy is Predictive.
	Demand Demand
}

// Reason says why an instance is deleted. It is a metric label value.
type Reason string

// Deletion reasons.
const (
	ReasonIdleTime      Reason = "idle_time"      // surplus idle past IdleTime
	ReasonMaxUses       Reason = "max_uses"       // ran its MaxUses jobs
	ReasonBootTimeout   Reason = "boot_timeout"   // not ready within BootTimeout
	ReasonFailed        Reason = "failed"         // provider reported failure, or provisioning failed
	ReasonOverLimit     Reason = "over_limit"     // more instances than MaxInstances
	ReasonSystemFailure Reason = "system_failure" // its job ended with a system failure
	ReasonLost          Reason = "lost"           // vanished or preempted while acquired
	ReasonOrphan        Reason = "orphan"         // carries our labels but is not in the books
	ReasonRecovery      Reason = "recovery"       // may have run a job before a manager restart
	ReasonShutdown      Reason = "shutdown"       // DeleteOnShutdown
	ReasonJournal       Reason = "journal_error"  // its acquisition could not be made durable
)

// Deletion is one instance Decide wants deleted.
type Deletion struct {
	ID     string
	Reason Reason
}

// Hold reasons: why Decide created fewer instances than the idle target asks.
const (
	HeldGrowthRate   = "max_growth_rate"
	HeldMaxInstances = "max_instances"
	HeldBackoff      = "backoff"
	HeldCircuitOpen  = "circuit_open"
)

// Plan is what one scaler pass decided.
type Plan struct {
	// IdleTarget is the number of idle instances the policy asks for.
	IdleTarget int
	// Counts are the instances by state before the plan is applied.
	Counts [NumStates]int
	// Create is the number of instances to request in one Create call.
	Create int
	// Held names the limit that cut Create below the need, if any.
	Held string
	// Delete lists instances to delete, with the reason.
	Delete []Deletion
	// Wake is the earliest time at which the decision may change without
	// any event in between (an idle instance reaching IdleTime, a boot
	// deadline, the end of a backoff); zero when there is none.
	Wake time.Time
}

// Decide is the scaler's decision, a pure function of the books, the policy
// in force and the limits, so that the simulator can replay it.
//
// The rules follow gitlab-runner's docker+machine autoscaler, adjusted
// where noted:
//   - failed instances, instances not ready within BootTimeout and idle
//     instances that have used up MaxUses are deleted;
//   - available = idle + requested + creating + provisioning; the target
//     is policy.IdleTarget(acquired) (or PredictiveTarget from s.Demand
//     when policy.Predictive is set, recomputed at least every
//     PredictiveReevaluate) plus the jobs waiting for an instance (taken
//     on demand, or blocked Acquire calls);
//   - while available is above the target, idle instances idle for longer
//     than IdleTime are deleted, the longest idle first, but never so many
//     that fewer idle instances remain than promises;
//   - while available is below the target, instances are created, bounded
//     by MaxGrowthRate (instances not yet ready), MaxInstances (instances in
//     any state, deleting included) and the creation circuit breaker
//     (nothing during a backoff; one probe instance at a time while open).
func Decide(s Snapshot, p schedule.Policy, l Limits) Plan {
	now := s.Now
	var plan Plan
	wake := func(t time.Time) {
		if plan.Wake.IsZero() || t.Before(plan.Wake) {
			plan.Wake = t
		}
	}
	maxUses := max(l.MaxUses, 1)

	inflight := s.Requested
	inUse := 0
	total := s.Requested
	plan.Counts[StateRequested] = s.Requested
	idle := make([]int, 0, 16)
	for i := range s.Instances {
		in := &s.Instances[i]
		if in.State == StateGone {
			continue
		}
		plan.Counts[in.State]++
		total++
		switch in.State {
		case StateCreating, StateProvisioning:
			if l.BootTimeout > 0 {
				deadline := in.CreatedAt.Add(l.BootTimeout)
				if !now.Before(deadline) {
					plan.Delete = append(plan.Delete, Deletion{in.ID, ReasonBootTimeout})
					continue
				}
				wake(deadline)
			}
			inflight++
		case StateIdle:
			if in.Uses >= maxUses {
				plan.Delete = append(plan.Delete, Deletion{in.ID, ReasonMaxUses})
				continue
			}
			idle = append(idle, i)
		case StateAcquired:
			inUse++
		case StateFailed:
			plan.Delete = append(plan.Delete, Deletion{in.ID, ReasonFailed})
		}
	}

	plan.IdleTarget = idleTarget(&s, p, inUse)
	if p.Predictive {
		wake(now.Add(PredictiveReevaluate)) // arrivals age out of the rate windows
	}
	// A promise leaves the pool as it is until its job comes (most
	// promises end in an empty poll, and replacing or adding an instance
	// for each would churn), so only the jobs waiting for an instance add
	// to the target. But an idle instance a promise will take is never
	// surplus: at least Reserved idle instances stay.
	want := plan.IdleTarget + s.Waiting
	avail := len(idle) + inflight

	byIdleSince := func(a, b int) int {
		x, y := &s.Instances[a], &s.Instances[b]
		if c := x.IdleSince.Compare(y.IdleSince); c != 0 {
			return c
		}
		return cmp.Compare(x.ID, y.ID)
	}

	// Over MaxInstances (after a lowered limit): shed idle instances.
	if l.MaxInstances > 0 && total > l.MaxInstances && len(idle) > s.Reserved {
		n := min(total-l.MaxInstances, len(idle)-s.Reserved)
		slices.SortFunc(idle, byIdleSince)
		for _, i := range idle[:n] {
			plan.Delete = append(plan.Delete, Deletion{s.Instances[i].ID, ReasonOverLimit})
		}
		idle = idle[n:]
		avail -= n
	}

	// Surplus idle instances past IdleTime, the longest idle first; never
	// those the promises will take.
	if surplus := min(avail-want, len(idle)-s.Reserved); surplus > 0 {
		expired := make([]int, 0, min(len(idle), surplus))
		var next time.Time
		for _, i := range idle {
			in := &s.Instances[i]
			if until := in.IdleSince.Add(p.IdleTime); now.After(until) {
				expired = append(expired, i)
			} else if next.IsZero() || until.Before(next) {
				next = until
			}
		}
		if len(expired) < surplus && !next.IsZero() {
			wake(next.Add(time.Nanosecond)) // gitlab-runner compares with a strict >
		}
		if len(expired) > surplus {
			slices.SortFunc(expired, byIdleSince)
			// The ones kept will expire too; look again when the first does
			// (it is already past IdleTime, so right after it is released).
			expired = expired[:surplus]
		}
		for _, i := range expired {
			plan.Delete = append(plan.Delete, Deletion{s.Instances[i].ID, ReasonIdleTime})
		}
		avail -= len(expired)
	}

	// Creation.
	need := want - avail
	if need <= 0 {
		return plan
	}
	if l.MaxGrowthRate > 0 && need > l.MaxGrowthRate-inflight {
		need, plan.Held = max(l.MaxGrowthRate-inflight, 0), HeldGrowthRate
	}
	if l.MaxInstances > 0 && need > l.MaxInstances-total {
		need, plan.Held = max(l.MaxInstances-total, 0), HeldMaxInstances
	}
	switch s.Breaker.Allow(now) {
	case 0:
		if need > 0 {
			need, plan.Held = 0, HeldBackoff
			wake(s.Breaker.RetryAt)
		}
	case 1:
		if need > 1 || (need > 0 && inflight > 0) {
			plan.Held = HeldCircuitOpen
		}
		if inflight > 0 {
			need = 0
		} else {
			need = min(need, 1)
		}
	}
	plan.Create = need
	return plan
}

// Breaker is a provider's creation circuit breaker. Every failure (a failed
// Create call, an instance that failed or did not boot in time) doubles a
// backoff during which nothing is created. Quota and capacity errors also
// open the circuit: after the backoff a single probe instance is created,
// and only its success closes the circuit again.
type Breaker struct {
	// Failures counts failures since the last success.
	Failures int
	// FailedAt is the time of the last failure.
	FailedAt time.Time
	// RetryAt is when creation may resume.
	RetryAt time.Time
	// Open is set by quota and capacity errors.
	Open bool
}

// Allow returns how many instances may be created at now: 0 (none, during
// a backoff), 1 (a probe, the circuit is open) or -1 (no limit).
func (b Breaker) Allow(now time.Time) int {
	switch {
	case now.Before(b.RetryAt):
		return 0
	case b.Open:
		return 1
	}
	return -1
}

// Fail records a failure at now. open marks a quota or capacity error.
func (b *Breaker) Fail(now time.Time, open bool, minBackoff, maxBackoff time.Duration) {
	b.Failures++
	b.FailedAt = now
	b.RetryAt = now.Add(Backoff(minBackoff, maxBackoff, b.Failures))
	b.Open = b.Open || open
}

// Succeed records that an instance created at createdAt became ready. An
// instance created before the last failure, or by the failing call itself,
// proves nothing and is ignored.
func (b *Breaker) Succeed(createdAt time.Time) {
	if b.Failures > 0 && !createdAt.After(b.FailedAt) {
		return
	}
	*b = Breaker{}
}

// Backoff returns minD doubled for every attempt after the first, capped
// at maxD.
func Backoff(minD, maxD time.Duration, attempt int) time.Duration {
	d := minD
	for i := 1; i < attempt; i++ {
		d *= 2
		if d >= maxD {
			return maxD
		}
	}
	return min(d, maxD)
}
