package fake

import (
	"errors"
	"maps"
	"sync"

	"github.com/mayfly-ci/mayfly/providers"
)

// InjectError makes the next times calls of op fail with err (times < 0:
// every call until ClearFaults). A failing Create creates nothing.
func (f *Fake) InjectError(op Op, times int, err error) {
	if times == 0 {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.faults = append(f.faults, &fault{op: op, remaining: times, err: err})
}

// FailDeletes makes the next times deletions of instance id fail with a
// transient error; other ids in the same call are still deleted.
func (f *Fake) FailDeletes(id string, times int) {
	if times == 0 {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.faults = append(f.faults, &fault{
		op: OpDelete, id: id, remaining: times,
		err: providers.Transient(errors.New("injected delete failure")),
	})
}

// FailBoots makes the next n created instances end up failed instead of
// running when their boot delay is over.
func (f *Fake) FailBoots(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failBoots += n
}

// ClearFaults drops every pending fault and boot failure.
func (f *Fake) ClearFaults() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.faults = nil
	f.failBoots = 0
}

// SetQuota changes the cap on instances that may exist at once (0: none).
func (f *Fake) SetQuota(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.opts.Quota = n
}

// Vanish removes instance id as if it were deleted behind the provider's
// back. It reports whether the instance existed.
func (f *Fake) Vanish(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.instances[id]
	delete(f.instances, id)
	_ = f.save()
	return ok
}

// Preempt marks instance id failed with reason "preempted", as a cloud does
// with a reclaimed spot VM. It reports whether the instance existed.
func (f *Fake) Preempt(id string) bool {
	return f.SetState(id, providers.StateFailed, "preempted")
}

// SetState forces the state and reason of instance id. It reports whether
// the instance existed.
func (f *Fake) SetState(id string, state providers.State, reason string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	in, ok := f.instances[id]
	if !ok {
		return false
	}
	in.State, in.Reason = state, reason
	if state == providers.StateDeleting {
		in.DeletedAt = f.opts.Now()
	}
	_ = f.save()
	return true
}

// Hold makes calls of op block, after being counted, until release is
// called or their context ends. Holding an op twice shares one hold; the
// first release ends it. release may be called more than once.
func (f *Fake) Hold(op Op) (release func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ch, ok := f.holds[op]
	if !ok {
		ch = make(chan struct{})
		f.holds[op] = ch
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			f.mu.Lock()
			defer f.mu.Unlock()
			if f.holds[op] == ch {
				delete(f.holds, op)
				close(ch)
			}
		})
	}
}

// Calls returns how many calls of op have been made.
func (f *Fake) Calls(op Op) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[op]
}

// CallCounts returns the number of calls per operation.
func (f *Fake) CallCounts() map[Op]int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.calls)
}

// Instances returns the instances like List does, without counting a call
// or consuming faults.
func (f *Fake) Instances() []providers.Instance {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.advance(f.opts.Now())
	return f.snapshot()
}
