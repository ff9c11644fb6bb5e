package fake

import (
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
)

// HostileSpec makes the fake's answers hostile, for tests of what the
// manager does with a plugin's replies, which are input too (issue 19).
type HostileSpec struct {
	// ListExtra adds this many made-up running instances, carrying
	// ListLabels, to every List answer.
	ListExtra  int               `json:"list_extra"`
	ListLabels map[string]string `json:"list_labels"`
	// ConnectAddress replaces the address of every ConnectInfo answer.
	ConnectAddress string `json:"connect_address"`
	// Hang names operations that never answer: each call waits until its
	// caller gives up.
	Hang []Op `json:"hang"`
	// Slow delays every answer but Init's and Shutdown's by this much.
	Slow providers.Duration `json:"slow"`
}

// hostileMaxListExtra bounds ListExtra: enough for any test of a huge list.
const hostileMaxListExtra = 1_000_000

// check reports the first invalid field of s.
func (s *HostileSpec) check() error {
	if s.ListExtra < 0 || s.ListExtra > hostileMaxListExtra {
		return fmt.Errorf("list_extra %d is not in 0-%d", s.ListExtra, hostileMaxListExtra)
	}
	for i, op := range s.Hang {
		if !slices.Contains(allOps, op) || op == OpInit {
			return fmt.Errorf("hang[%d]: %q is not one of %v but init", i, op, allOps)
		}
	}
	return nil
}

// applyHostileLocked makes the operations s names hang. f.mu is held.
func (f *Fake) applyHostileLocked(s *HostileSpec) {
	f.hostile = s
	for _, op := range s.Hang {
		if f.holds[op] == nil {
			f.holds[op] = make(chan struct{}) // never closed: the call waits for its context
		}
	}
}

// hostileList returns list with the made-up instances of a hostile spec
// added. f.mu is held.
func (f *Fake) hostileList(list []providers.Instance) []providers.Instance {
	if f.hostile == nil || f.hostile.ListExtra == 0 {
		return list
	}
	now := f.opts.Now()
	for i := range f.hostile.ListExtra {
		list = append(list, providers.Instance{
			ID:        fmt.Sprintf("made-up-%07d", i),
			State:     providers.StateRunning,
			Labels:    maps.Clone(f.hostile.ListLabels),
			CreatedAt: now,
		})
	}
	return list
}

// hostileConnectInfo returns ci with the address of a hostile spec.
// f.mu is held.
func (f *Fake) hostileConnectInfo(ci providers.ConnectInfo) providers.ConnectInfo {
	if f.hostile != nil && f.hostile.ConnectAddress != "" {
		ci.Address = f.hostile.ConnectAddress
	}
	return ci
}

// hostileDelay is how long a call of op waits before it answers.
func (f *Fake) hostileDelay(op Op) time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.hostile == nil || op == OpInit || op == OpShutdown {
		return 0
	}
	return time.Duration(f.hostile.Slow)
}
