package fleet

import (
	"errors"
	"fmt"
)

// Claim takes into the books, as acquired, an instance that a manager
// before this one leased to a job this one resumes. It must be called
// before Run: the start-up reconciliation then neither deletes it as used
// nor adopts it as idle, and keeps it recorded as acquired in the journal,
// so that it is deleted when its lease ends, or at the next start should
// this manager die first. An instance the provider no longer lists is lost
// at the first list after Run starts, as any acquired instance is. The
// lease has no connect info: the caller has its own record of it.
func (f *Fleet) Claim(id string) (*Lease, error) {
	if id == "" {
		return nil, errors.New("claim: empty instance id")
	}
	if f.running.Load() {
		return nil, fmt.Errorf("claim %s: the fleet runs already; claims come before Run", id)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.books[id] != nil {
		return nil, fmt.Errorf("claim %s: claimed twice", id)
	}
	now := f.clock.Now()
	f.seq++
	in := &instance{id: id, state: StateAcquired, since: now, createdAt: now, addedSeq: f.seq,
		uses: 0, journaled: true, lost: make(chan struct{})}
	f.books[id] = in
	f.counts[StateAcquired]++
	f.log.Info("instance claimed for a resumed job", "instance", id)
	return &Lease{f: f, in: in, inst: f.instanceOf(in)}, nil
}

// claimedLocked returns the ids of instances claimed for resumed jobs and
// still held, to keep in a new journal. f.mu is held.
func (f *Fleet) claimedLocked() []string {
	var ids []string
	for _, in := range f.books {
		if in.state == StateAcquired && in.journaled {
			ids = append(ids, in.id)
		}
	}
	return ids
}
