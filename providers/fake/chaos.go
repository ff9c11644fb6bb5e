package fake

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
)

// ChaosSpec injects provider faults at a seeded rate, as a cloud API that
// misbehaves now and then does, for chaos tests of everything above the
// provider. Each call of an operation in Ops fails with probability Rate,
// with one of: a rate limit with Retry-After, a 5xx-like transient error,
// a quota error, a capacity stockout, and (create only) a create that makes
// its instances in the cloud but times out for the caller, so that its ids
// never reach the caller. Each created instance is also preempted with
// probability Rate, a while after its boot. The same seed gives the same
// faults for the same sequence of calls; a restarted plugin process starts
// the sequence again.
type ChaosSpec struct {
	// Rate is the probability of a fault per call, and of a preemption per
	// instance (0 to 1).
	Rate float64 `json:"rate"`
	// Seed seeds the draws.
	Seed uint64 `json:"seed"`
	// RetryAfter goes with the rate limits (default 1s).
	RetryAfter providers.Duration `json:"retry_after"`
	// PreemptWithin bounds when after its boot a doomed instance is
	// preempted (default 5s).
	PreemptWithin providers.Duration `json:"preempt_within"`
	// Ops are the operations that fail (default create, delete, list,
	// connect_info).
	Ops []Op `json:"ops"`
	// First, when set, is a fault every run gets besides those drawn: the
	// first create call fails with this kind (one of the Chaos* kinds),
	// or with "preempted" its first instance is preempted.
	First string `json:"first"`
}

// Chaos fault kinds, as written to the fault log.
const (
	ChaosRateLimited   = "rate_limited"
	ChaosServerError   = "server_error"
	ChaosQuota         = "quota_exceeded"
	ChaosStockout      = "capacity_exhausted"
	ChaosCreateTimeout = "create_timeout"
	ChaosPreempted     = "preempted"
)

// FaultLogName is the file in the state directory where every fault a
// ChaosSpec injected is appended, one line each: the kind and the
// operation (or instance).
const FaultLogName = "faults.log"

// errCreateTimeout marks a create that is to succeed in the cloud and
// time out for its caller.
var errCreateTimeout = errors.New("create times out for the caller")

func (s *ChaosSpec) check() error {
	if s.Rate < 0 || s.Rate > 1 {
		return fmt.Errorf("rate %v is not in 0-1", s.Rate)
	}
	if s.First != "" && !slices.Contains([]string{ChaosRateLimited, ChaosServerError, ChaosQuota, ChaosStockout, ChaosCreateTimeout, ChaosPreempted}, s.First) {
		return fmt.Errorf("first: %q is not a fault kind", s.First)
	}
	for i, op := range s.Ops {
		if !slices.Contains(allOps, op) || op == OpInit || op == OpShutdown {
			return fmt.Errorf("ops[%d]: %q is not one of %v but init and shutdown", i, op, allOps)
		}
	}
	return nil
}

// applyChaosLocked sets s up. f.mu is held.
func (f *Fake) applyChaosLocked(s *ChaosSpec) {
	c := *s
	if c.RetryAfter <= 0 {
		c.RetryAfter = providers.Duration(time.Second)
	}
	if c.PreemptWithin <= 0 {
		c.PreemptWithin = providers.Duration(5 * time.Second)
	}
	if len(c.Ops) == 0 {
		c.Ops = []Op{OpCreate, OpDelete, OpList, OpConnectInfo}
	}
	f.chaos = &c
	f.chaosRand = rand.New(rand.NewPCG(c.Seed, 0x6d6179666c79))
}

// chaosFault draws the fault of one call of op, if any. f.mu is held.
func (f *Fake) chaosFault(op Op) error {
	c := f.chaos
	if c == nil {
		return nil
	}
	var kind string
	if op == OpCreate && !f.chaosFirstDone && c.First != "" && c.First != ChaosPreempted {
		f.chaosFirstDone = true
		kind = c.First
	} else {
		if !slices.Contains(c.Ops, op) || f.chaosRand.Float64() >= c.Rate {
			return nil
		}
		kinds := []string{ChaosRateLimited, ChaosServerError, ChaosQuota, ChaosStockout}
		if op == OpCreate {
			kinds = append(kinds, ChaosCreateTimeout)
		}
		kind = kinds[f.chaosRand.IntN(len(kinds))]
	}
	f.logFault(kind, string(op))
	cause := fmt.Errorf("injected by the fake's chaos (%s)", kind)
	switch kind {
	case ChaosRateLimited:
		return providers.RateLimited(time.Duration(c.RetryAfter), cause)
	case ChaosServerError:
		return providers.Transient(fmt.Errorf("503 Service Unavailable: %w", cause))
	case ChaosQuota:
		return providers.QuotaExceeded("fake-chaos", cause)
	case ChaosStockout:
		return providers.CapacityExhausted("fake-chaos", cause)
	}
	return errCreateTimeout
}

// chaosPreemptAt draws when a new instance is preempted (zero: never).
// f.mu is held.
func (f *Fake) chaosPreemptAt(created time.Time) time.Time {
	c := f.chaos
	if c == nil {
		return time.Time{}
	}
	first := c.First == ChaosPreempted && !f.chaosFirstDone
	if first {
		f.chaosFirstDone = true
	}
	if !first && f.chaosRand.Float64() >= c.Rate {
		return time.Time{}
	}
	within := int64(c.PreemptWithin)
	return created.Add(f.opts.BootDelay + time.Duration(f.chaosRand.Int64N(within)+1))
}

// createTimedOut is what a create that timed out for its caller returns,
// after making its instances.
func createTimedOut() error {
	return providers.Transient(fmt.Errorf("fake create: the call timed out after the cloud accepted it: %w", context.DeadlineExceeded))
}

// logFault appends a line to the fault log, when there is a state
// directory. f.mu is held.
func (f *Fake) logFault(kind, what string) {
	f.opts.Logger.Warn("fake chaos fault", "kind", kind, "what", what)
	if f.opts.StateDir == "" {
		return
	}
	if err := os.MkdirAll(f.opts.StateDir, 0o700); err != nil {
		return
	}
	fh, err := os.OpenFile(filepath.Join(f.opts.StateDir, FaultLogName), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return
	}
	defer fh.Close()
	fmt.Fprintf(fh, "%s %s\n", kind, what)
}
