package schedule

import "time"

// Entry is one scheduled policy: in force whenever any of its periods
// contains the time (and no later entry's period does).
type Entry struct {
	Periods []Period
	Policy  Policy
}

// Active reports whether any of the entry's periods contains t.
func (e Entry) Active(t time.Time) bool {
	for _, p := range e.Periods {
		if p.Contains(t) {
			return true
		}
	}
	return false
}

// Schedule is a default policy and the entries that replace it in their periods.
type Schedule struct {
	Default Policy
	Entries []Entry
}

// NoEntry is the index At returns when the default policy is in force.
const NoEntry = -1

// maxChangeSteps bounds the transitions NextChange walks through before it
// concludes that the policy does not change.
const maxChangeSteps = 100_000

// At returns the policy in force at t and the index of the entry it comes
// from (NoEntry for the default). The last active entry wins, and its policy
// replaces every default value, as gitlab-runner does.
func (s *Schedule) At(t time.Time) (Policy, int) {
	for i := len(s.Entries) - 1; i >= 0; i-- {
		if s.Entries[i].Active(t) {
			return s.Entries[i].Policy, i
		}
	}
	return s.Default, NoEntry
}

// NextChange returns the first whole second after t at which a different
// entry (or the default) comes into force, or false when that never happens.
func (s *Schedule) NextChange(t time.Time) (time.Time, bool) {
	_, cur := s.At(t)
	for i := 0; i < maxChangeSteps; i++ {
		next, ok := s.nextTransition(t)
		if !ok {
			return time.Time{}, false
		}
		if _, idx := s.At(next); idx != cur {
			return next, true
		}
		t = next
	}
	return time.Time{}, false
}

// nextTransition returns the earliest time after t at which any period's
// membership changes.
func (s *Schedule) nextTransition(t time.Time) (time.Time, bool) {
	var best time.Time
	found := false
	for _, e := range s.Entries {
		for _, p := range e.Periods {
			if n, ok := p.nextTransition(t); ok && (!found || n.Before(best)) {
				best, found = n, true
			}
		}
	}
	return best, found
}
