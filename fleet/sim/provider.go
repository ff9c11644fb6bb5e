package sim

import (
	"fmt"
	"math"
	"math/rand/v2"
	"time"
)

// Boot is a boot-time distribution: creation request to a ready VM.
type Boot struct {
	// Kind is "fixed" (always Median) or "lognormal" (median Median,
	// shape Sigma).
	Kind   string
	Median time.Duration
	Sigma  float64
}

// Provider is the simulated cloud.
type Provider struct {
	Boot Boot
	// FailureRate is the probability that a VM fails to boot; it is
	// reported failed when its boot time is over.
	FailureRate float64
	// DeleteTime is how long a VM is billed after its deletion call.
	DeleteTime time.Duration
	// APIRate is the provider's API limit in calls per second (0: none)
	// and APIBurst its bucket size (default 1). A call over the limit
	// waits for its turn.
	APIRate  float64
	APIBurst int
	// Seed seeds boot times and failures.
	Seed uint64
	// Connect is how the runtime fleet learns to reach an instance:
	// ConnectOnCreate (default), ConnectInList or ConnectByCall.
	Connect string
}

// DefaultProvider returns a provider with typical boot times: about 45 s
// for Linux and 300 s for Windows (lognormal, sigma 0.25), 20 s deletion,
// no failures and no API limit.
func DefaultProvider(os string) Provider {
	p := Provider{Boot: Boot{Kind: "lognormal", Median: 45 * time.Second, Sigma: 0.25}, DeleteTime: 20 * time.Second, Seed: 1}
	if os == "windows" {
		p.Boot.Median = 300 * time.Second
	}
	return p
}

func (p *Provider) validate() error {
	switch p.Boot.Kind {
	case "fixed", "":
	case "lognormal":
		if p.Boot.Sigma < 0 {
			return fmt.Errorf("provider: boot sigma must not be negative, got %g", p.Boot.Sigma)
		}
	default:
		return fmt.Errorf("provider: boot kind: want fixed or lognormal, got %q", p.Boot.Kind)
	}
	if p.Boot.Median < 0 {
		return fmt.Errorf("provider: boot median must not be negative, got %s", p.Boot.Median)
	}
	if p.FailureRate < 0 || p.FailureRate >= 1 {
		return fmt.Errorf("provider: failure rate must be in [0,1), got %g", p.FailureRate)
	}
	switch p.Connect {
	case "":
		p.Connect = ConnectOnCreate
	case ConnectOnCreate, ConnectInList, ConnectByCall:
	default:
		return fmt.Errorf("provider: connect: want %s, %s or %s, got %q", ConnectOnCreate, ConnectInList, ConnectByCall, p.Connect)
	}
	if p.DeleteTime < 0 || p.APIRate < 0 || p.APIBurst < 0 {
		return fmt.Errorf("provider: delete time, API rate and burst must not be negative")
	}
	return nil
}

// cloud draws boot outcomes and meters the API.
type cloud struct {
	p     Provider
	rng   *rand.Rand
	api   bucket
	calls int
}

func newCloud(p Provider) *cloud {
	return &cloud{p: p, rng: rand.New(rand.NewPCG(p.Seed, 0x6d617966)), api: newBucket(p.APIRate, p.APIBurst)}
}

// boot draws one VM's boot time and whether it fails.
func (c *cloud) boot() (time.Duration, bool) {
	d := c.p.Boot.Median
	if c.p.Boot.Kind == "lognormal" && c.p.Boot.Sigma > 0 {
		d = time.Duration(float64(d) * math.Exp(c.p.Boot.Sigma*c.rng.NormFloat64()))
	}
	failed := c.p.FailureRate > 0 && c.rng.Float64() < c.p.FailureRate
	return d, failed
}

// call counts one API call made at now and returns when it goes through.
func (c *cloud) call(now time.Time) time.Time {
	c.calls++
	return c.api.take(now)
}

// bucket is a token bucket in virtual time (GCRA).
type bucket struct {
	interval  time.Duration // per call; 0 = unlimited
	tolerance time.Duration
	tat       time.Time
}

func newBucket(rate float64, burst int) bucket {
	if rate <= 0 {
		return bucket{}
	}
	iv := time.Duration(float64(time.Second) / rate)
	return bucket{interval: iv, tolerance: time.Duration(max(burst, 1)-1) * iv}
}

func (b *bucket) take(now time.Time) time.Time {
	if b.interval == 0 {
		return now
	}
	start := now
	if early := b.tat.Add(-b.tolerance); early.After(start) {
		start = early
	}
	if b.tat.Before(start) {
		b.tat = start
	}
	b.tat = b.tat.Add(b.interval)
	return start
}
