package gitlab

import (
	"math"
	"time"
)

// Backoff is the exponential backoff a Client sleeps after a 4xx or 5xx
// answer, before returning it. The official runner uses 100 ms to 60 s,
// factor 2, with jitter; zero fields take those values.
type Backoff struct {
	// Min is the first delay.
	Min time.Duration
	// Max caps the delay.
	Max time.Duration
	// Factor multiplies the delay after each consecutive failure.
	Factor float64
	// NoJitter disables the random spread (tests).
	NoJitter bool
}

type backoffState struct {
	failures int
	last     time.Time
}

func (b Backoff) withDefaults() Backoff {
	if b.Min <= 0 {
		b.Min = 100 * time.Millisecond
	}
	if b.Max <= 0 {
		b.Max = 60 * time.Second
	}
	if b.Max < b.Min {
		b.Max = b.Min
	}
	if b.Factor < 1 {
		b.Factor = 2
	}
	return b
}

// delay returns the sleep after the n-th consecutive failure (n >= 1):
// Min*Factor^(n-1) capped at Max; with jitter a uniform value between Min and that.
func (b Backoff) delay(n int, rnd func() float64) time.Duration {
	if n < 1 {
		n = 1
	}
	d := float64(b.Min) * math.Pow(b.Factor, float64(n-1))
	if d > float64(b.Max) || math.IsInf(d, 0) || math.IsNaN(d) {
		d = float64(b.Max)
	}
	if !b.NoJitter {
		d = float64(b.Min) + rnd()*(d-float64(b.Min))
	}
	return time.Duration(d)
}
