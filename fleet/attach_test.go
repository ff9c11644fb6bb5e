package fleet

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/fake"
	"github.com/mayfly-ci/mayfly/schedule"
)

// fakeAttach is an attachment that records being closed.
type fakeAttach struct {
	id     string
	mu     sync.Mutex
	closes int
}

func (a *fakeAttach) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.closes++
	return nil
}

func (a *fakeAttach) closed() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.closes
}

// attacher makes an attachment per instance it provisions.
type attacher struct {
	mu  sync.Mutex
	all map[string]*fakeAttach
}

func (p *attacher) Provision(context.Context, providers.Instance, providers.ConnectInfo) error {
	panic("the fleet must call ProvisionAttach on an Attacher")
}

func (p *attacher) ProvisionAttach(_ context.Context, inst providers.Instance, _ providers.ConnectInfo) (Attachment, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	a := &fakeAttach{id: inst.ID}
	p.all[inst.ID] = a
	return a, nil
}

func (p *attacher) get(id string) *fakeAttach {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.all[id]
}

// The attachment a provisioner leaves with an instance reaches the lease,
// stays open while the instance is idle or leased, and is closed when the
// instance is deleted after its job, and at shutdown for idle instances.
func TestAttachmentFollowsTheInstance(t *testing.T) {
	p := &attacher{all: map[string]*fakeAttach{}}
	h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 2}), Provisioner: p}, fake.Options{})
	h.start()
	h.until(time.Minute, time.Second, "2 idle", func() bool { return h.f.Available() == 2 })

	l := h.acquire()
	a := p.get(l.ID())
	if a == nil || l.Attachment() != Attachment(a) {
		t.Fatalf("lease attachment %v, want the provisioner's %v", l.Attachment(), a)
	}
	if a.closed() != 0 {
		t.Fatal("the attachment of a leased instance was closed")
	}
	l.Release(JobSucceeded) // MaxUses 1: deleted
	h.settle()
	if a.closed() != 1 {
		t.Errorf("attachment closed %d times after the instance's deletion, want 1", a.closed())
	}

	h.until(time.Minute, time.Second, "pool refilled", func() bool { return h.f.Available() == 2 })
	var idle []*fakeAttach
	for _, in := range h.f.Status().Instances {
		if in.State == StateIdle {
			idle = append(idle, p.get(in.ID))
		}
	}
	held := h.acquire()
	h.stop()
	for _, x := range idle {
		if x.id == held.ID() {
			if x.closed() != 0 {
				t.Errorf("the leased instance's attachment was closed at shutdown")
			}
			continue
		}
		if x.closed() != 1 {
			t.Errorf("idle instance %s: attachment closed %d times at shutdown, want 1", x.id, x.closed())
		}
	}
	held.Release(JobSucceeded)
	if x := p.get(held.ID()); x.closed() != 1 {
		t.Errorf("the leased instance's attachment closed %d times after its release, want 1", x.closed())
	}
}
