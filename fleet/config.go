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
	// CheckInterval is how often the runner asks for jobs (check_interval):
	// part of the lead time of the predictive policy (default 3s).
	CheckInterval time.Duration
	// MaxUses is how many jobs an instance runs before it is deleted
	// (MaxBuilds, max_use_count). 0 means 1.
	MaxUses int
	// MaxGrowthRate caps instances being created at once; 0 = no cap.
	MaxGrowthRate int
	// MaxInstances caps instances in every state (limit, max_instances);
	// 0 = no cap.
	MaxInstances int
	// OnDemandWithin lets Reserve promise a job an instance that is not
	// idle yet but expected within this time (see Reservable); 0 = only
	// idle ones, unless IdleCount is 0.
	OnDemandWithin time.Duration
	// BootTimeout bounds creation to ready; a slower instance is deleted and
	// counted as a provider failure (default 10m).
	BootTimeout time.Duration
	// ReconcileInterval is how often the provider's list is compared with
	// the books when nothing is expected to change (default 1m).
	ReconcileInterval time.Duration
	// PollInterval is how often the list is read while instances are being
	// created (default 2s).
	PollInterval time.Duration
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
	ints := []struct {
		name string
		v    int
	}{{"MaxUses", c.MaxUses}, {"MaxGrowthRate", c.MaxGrowthRate}, {"MaxInstances", c.MaxInstances}, {"ProviderMaxSize", c.ProviderMaxSize}, {"APIBurst", c.APIBurst}}
	for _, f := range ints {
		if f.v < 0 {
			return fmt.Errorf("fleet config: %s must not be negative, got %d", f.name, f.v)
		}
	}
	durs := []struct {
		name string
		v    time.Duration
	}{
		{"BootTimeout", c.BootTimeout}, {"CheckInterval", c.CheckInterval}, {"OnDemandWithin", c.OnDemandWithin}, {"ReconcileInterval", c.ReconcileInterval}, {"PollInterval", c.PollInterval},
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
	setDur(&c.BootTimeout, 10*time.Minute)
	setDur(&c.CheckInterval, DefaultCheckInterval)
	setDur(&c.ReconcileInterval, time.Minute)
	setDur(&c.PollInterval, 2*time.Second)
	setDur(&c.OrphanGrace, 10*time.Minute)
	setDur(&c.ShutdownTimeout, 30*time.Second)
	setDur(&c.CallTimeout, 5*time.Minute)
	setDur(&c.CreateBackoff, 5*time.Second)
	setDur(&c.CreateBackoffMax, 5*time.Minute)
	setDur(&c.DeleteBackoff, time.Second)
	setDur(&c.DeleteBackoffMax, time.Minute)
	c.CreateBackoffMax = max(c.CreateBackoffMax, c.CreateBackoff)
	c.DeleteBackoffMax = max(c.DeleteBackoffMax, c.DeleteBackoff)
	if c.MaxUses == 0 {
		c.MaxUses = 1
	}
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
