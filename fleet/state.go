package fleet

import "fmt"

// State is the lifecycle state of an instance in the fleet's books.
//
//	requested → creating → provisioning → idle ⇄ acquired → deleting → gone
//	                ↘            ↘          ↘        ↘          ↗
//	                 failed ─────────────────────────────────→ deleting
//
// An instance that leaves acquired after running a job never returns to
// idle unless it has uses left (MaxUses > 1); with MaxUses 1 it is deleted.
type State int

// Instance states.
const (
	// StateRequested: a Create call for it is in flight; it has no id yet.
	StateRequested State = iota
	// StateCreating: the provider knows it and has not reported it running.
	StateCreating
	// StateProvisioning: running; connect info and the provisioner run.
	StateProvisioning
	// StateIdle: ready and waiting to be acquired.
	StateIdle
	// StateAcquired: handed out to a job.
	StateAcquired
	// StateDeleting: deletion requested, not yet confirmed by the provider.
	StateDeleting
	// StateFailed: the provider reported it failed, it did not boot in time
	// or it could not be provisioned; deletion follows.
	StateFailed
	// StateGone: the provider confirmed deletion or no longer lists it.
	StateGone
)

// NumStates is the number of states, for arrays indexed by State.
const NumStates = int(StateGone) + 1

var stateNames = [NumStates]string{"requested", "creating", "provisioning", "idle", "acquired", "deleting", "failed", "gone"}

// String returns the state's lower-case name, as used in metric labels.
func (s State) String() string {
	if s >= 0 && int(s) < NumStates {
		return stateNames[s]
	}
	return fmt.Sprintf("state(%d)", int(s))
}

// MarshalText implements encoding.TextMarshaler.
func (s State) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// transitions lists the legal moves between states.
var transitions = [NumStates][NumStates]bool{
	StateRequested:    {StateCreating: true, StateGone: true},
	StateCreating:     {StateProvisioning: true, StateFailed: true, StateDeleting: true, StateGone: true},
	StateProvisioning: {StateIdle: true, StateFailed: true, StateDeleting: true, StateGone: true},
	StateIdle:         {StateAcquired: true, StateFailed: true, StateDeleting: true, StateGone: true},
	StateAcquired:     {StateIdle: true, StateDeleting: true, StateGone: true},
	StateDeleting:     {StateGone: true},
	StateFailed:       {StateDeleting: true, StateGone: true},
}

// CanTransition reports whether an instance may move from one state to
// another.
func CanTransition(from, to State) bool {
	if from < 0 || int(from) >= NumStates || to < 0 || int(to) >= NumStates {
		return false
	}
	return transitions[from][to]
}
