package fleet

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/schedule"
	"github.com/prometheus/client_golang/prometheus"
)

// Config configures a Fleet. Zero durations take the defaults named.
type Config struct {
	// Name is the runner's name: the providers.LabelRunner label and the
	// runner label of the metrics. Required.
	Name string
	// ManagerID identifies this manager: the providers.LabelManager label.
	// It must be unique among managers sharing a provider. Required.
	ManagerID string
	// Provider creates, lists and deletes the instances. Required. The
	// caller has already called Init and calls Shutdown after Run returns.
	Provider providers.Provider
	// ProviderMaxSize is providers.Info.MaxSize (0: none); it caps the
	// fleet like MaxInstances.
	ProviderMaxSize int
	// Schedule gives the idle policy in force at each time; SetSchedule
	// replaces it while the fleet runs.
	Schedule schedule.Schedule
	// Limits are the fleet's bounds and cadences.
	Limits
	// OrphanGrace is how long an unknown instance with our labels is
	// spared while Create calls are in flight, since it may be one of
	// theirs (default 10m).
	OrphanGrace time.Duration
	// DeleteOnShutdown deletes the instances not handed out when Run ends.
	DeleteOnShutdown bool
	// ShutdownTimeout bounds that deletion, in wall time (default 30s).
	ShutdownTimeout time.Duration
	// Provisioner makes running instances ready. nil: ready as soon as the
	// provider reports it running and its ConnectInfo validates.
	Provisioner Provisioner
	// JournalPath is the crash-safe record of acquired instances. Empty
	// keeps it in memory: then a restarted fleet deletes every instance
	// carrying its labels.
	JournalPath string
	// APIRate is the provider call budget in calls per second (default 10)
	// and APIBurst its bucket size (default 20).
	APIRate  float64
	APIBurst int
	// CallTimeout bounds every provider call, in wall time (default 5m).
	CallTimeout time.Duration
	// CreateBackoff and CreateBackoffMax bound the creation backoff
	// after failures (defaults 5s and 5m).
	CreateBackoff    time.Duration
	CreateBackoffMax time.Duration
	// CreateBatchWindow is how long the scaler waits, once it wants new
	// instances, for more to go in the same Create call (default 1s; a
	// negative value: no wait). The runner takes a burst of jobs one
	// request at a time.
	CreateBatchWindow time.Duration
	// DeleteBatchWindow is how long a deletion waits for others to go in
	// the same Delete call (default 5s; negative: no wait). The instance
	// is billed that much longer; the API budget is spared a call per job.
	DeleteBatchWindow time.Duration
	// DeleteBackoff and DeleteBackoffMax bound the wait before a failed
	// deletion is retried (defaults 1s and 1m).
	DeleteBackoff    time.Duration
	DeleteBackoffMax time.Duration
	// Clock is the source of time (default the system clock).
	Clock Clock
	// Logger receives the fleet's logs (default slog.Default()).
	Logger *slog.Logger
	// Registerer receives the metrics; nil: none.
	Registerer prometheus.Registerer
}

func (c *Config) validate() error {
	switch {
	case c.Name == "":
		return errors.New("fleet config: Name is empty")
	case c.ManagerID == "":
		return errors.New("fleet config: ManagerID is empty")
	case c.Provider == nil:
		return errors.New("fleet config: Provider is nil")
	}
	if err := c.Limits.Validate(); err != nil {
		return fmt.Errorf("fleet config: %w", err)
	}
	if c.ProviderMaxSize < 0 || c.APIBurst < 0 {
		return fmt.Errorf("fleet config: ProviderMaxSize and APIBurst must not be negative, got %d and %d", c.ProviderMaxSize, c.APIBurst)
	}
	durs := []struct {
		name string
		v    time.Duration
	}{
		{"OrphanGrace", c.OrphanGrace}, {"ShutdownTimeout", c.ShutdownTimeout}, {"CallTimeout", c.CallTimeout},
		{"CreateBackoff", c.CreateBackoff}, {"CreateBackoffMax", c.CreateBackoffMax},
		{"DeleteBackoff", c.DeleteBackoff}, {"DeleteBackoffMax", c.DeleteBackoffMax},
	}
	for _, f := range durs {
		if f.v < 0 {
			return fmt.Errorf("fleet config: %s must not be negative, got %s", f.name, f.v)
		}
	}
	if c.APIRate < 0 {
		return fmt.Errorf("fleet config: APIRate must not be negative, got %g", c.APIRate)
	}
	return nil
}

func (c *Config) defaults() {
	setDur := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	c.Limits = c.Limits.WithDefaults()
	setDur(&c.OrphanGrace, 10*time.Minute)
	setDur(&c.ShutdownTimeout, 30*time.Second)
	setDur(&c.CallTimeout, 5*time.Minute)
	setDur(&c.CreateBackoff, 5*time.Second)
	setDur(&c.CreateBackoffMax, 5*time.Minute)
	setDur(&c.CreateBatchWindow, time.Second)
	setDur(&c.DeleteBatchWindow, 5*time.Second)
	c.CreateBatchWindow = max(c.CreateBatchWindow, 0)
	c.DeleteBatchWindow = max(c.DeleteBatchWindow, 0)
	setDur(&c.DeleteBackoff, time.Second)
	setDur(&c.DeleteBackoffMax, time.Minute)
	c.CreateBackoffMax = max(c.CreateBackoffMax, c.CreateBackoff)
	c.DeleteBackoffMax = max(c.DeleteBackoffMax, c.DeleteBackoff)
	if c.APIRate == 0 {
		c.APIRate = 10
	}
	if c.APIBurst == 0 {
		c.APIBurst = 20
	}
	if c.Clock == nil {
		c.Clock = SystemClock{}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

func minPositive(a, b int) int {
	switch {
	case a <= 0:
		return b
	case b <= 0:
		return a
	}
	return min(a, b)
}
