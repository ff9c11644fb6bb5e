package fleet

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the fleet's Prometheus metrics. Several fleets (one per
// [[runners]] entry) share one registry; each sets its own runner label.
// Names follow gitlab-runner's docker+machine autoscaler where the meaning
// is the same.
type metrics struct {
	states       *prometheus.GaugeVec     // runner, state
	creation     *prometheus.HistogramVec // runner
	removal      *prometheus.HistogramVec // runner
	errors       *prometheus.CounterVec   // runner, op, kind
	calls        *prometheus.CounterVec   // runner, call
	waits        *prometheus.CounterVec   // runner
	waitSeconds  *prometheus.HistogramVec // runner
	idleTarget   *prometheus.GaugeVec     // runner
	idleActual   *prometheus.GaugeVec     // runner
	deletions    *prometheus.CounterVec   // runner, reason
	wasted       *prometheus.CounterVec   // runner: deleted unused by choice while jobs waited
	acquisitions *prometheus.CounterVec   // runner
	atProvider   *prometheus.GaugeVec     // runner: our instances in the provider's last list
}

// creationBuckets span a microVM's seconds to a Windows VM's minutes.
var creationBuckets = []float64{1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 450, 600, 900}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		states: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "gitlab_runner_autoscaling_machine_states", Help: "Instances in the fleet's books, by runner and state.",
		}, []string{"runner", "state"}),
		creation: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "gitlab_runner_autoscaling_machine_creation_duration_seconds", Help: "Time from the creation request to the instance being ready (idle).", Buckets: creationBuckets,
		}, []string{"runner"}),
		removal: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "gitlab_runner_autoscaling_machine_removal_duration_seconds", Help: "Time from deciding to delete an instance to the provider confirming it.", Buckets: prometheus.ExponentialBuckets(0.5, 2, 12),
		}, []string{"runner"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mayfly_fleet_provider_errors_total", Help: "Provider failures by runner, operation and kind (provider error kinds, boot_timeout, provision).",
		}, []string{"runner", "op", "kind"}),
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mayfly_provider_calls_total", Help: "Provider API calls by runner and call (create, delete, list, connect_info): the API budget, about 2 per job at best (one create, one delete).",
		}, []string{"runner", "call"}),
		waits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mayfly_fleet_acquisitions_waited_total", Help: "Acquisitions that found no idle instance and had to wait.",
		}, []string{"runner"}),
		waitSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "mayfly_fleet_acquisition_wait_seconds", Help: "Time acquisitions waited for an idle instance (only those that waited).", Buckets: prometheus.ExponentialBuckets(0.1, 2, 14),
		}, []string{"runner"}),
		idleTarget: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "mayfly_fleet_idle_target", Help: "Idle instances the policy in force asks for.",
		}, []string{"runner"}),
		idleActual: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "mayfly_fleet_idle_instances", Help: "Idle instances ready to be acquired.",
		}, []string{"runner"}),
		deletions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mayfly_fleet_deletions_total", Help: "Instances the fleet decided to delete, by runner and reason.",
		}, []string{"runner", "reason"}),
		wasted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mayfly_fleet_deleted_unused_while_waiting_total", Help: "Instances the fleet chose to delete unused (idle_time, over_limit) while jobs were promised an instance; an invariant: must stay 0.",
		}, []string{"runner"}),
		acquisitions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mayfly_fleet_acquisitions_total", Help: "Instances handed out to jobs.",
		}, []string{"runner"}),
		atProvider: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "mayfly_fleet_provider_instances", Help: "Instances carrying this fleet's labels in the provider's last list, deleting and gone ones excluded; above the books' count means instances leak.",
		}, []string{"runner"}),
	}
	if reg == nil {
		return m, nil
	}
	err := errors.Join(
		register(reg, &m.states), register(reg, &m.creation), register(reg, &m.removal),
		register(reg, &m.errors), register(reg, &m.calls), register(reg, &m.waits),
		register(reg, &m.waitSeconds), register(reg, &m.idleTarget), register(reg, &m.idleActual),
		register(reg, &m.deletions), register(reg, &m.wasted), register(reg, &m.acquisitions), register(reg, &m.atProvider),
	)
	if err != nil {
		return nil, fmt.Errorf("register fleet metrics: %w", err)
	}
	return m, nil
}

// register registers *c, or points *c at the identical collector another
// fleet registered on the same registry.
func register[T prometheus.Collector](reg prometheus.Registerer, c *T) error {
	err := reg.Register(*c)
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) {
		if existing, ok := are.ExistingCollector.(T); ok {
			*c = existing
			return nil
		}
	}
	return err
}
