package gitlab

import (
	"errors"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the API call metrics; a nil *metrics records nothing.
type metrics struct {
	statuses *prometheus.CounterVec
	duration *prometheus.HistogramVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	if reg == nil {
		return nil, nil
	}
	m := &metrics{
		statuses: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gitlab_runner_api_request_statuses_total",
			Help: "Answers of the GitLab runner API by runner, endpoint and HTTP status (\"error\" when no answer came).",
		}, []string{"runner", "endpoint", "status"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "gitlab_runner_api_request_duration_seconds",
			Help:    "Duration of GitLab runner API requests by runner and endpoint.",
			Buckets: []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"runner", "endpoint"}),
	}
	var err error
	if m.statuses, err = register(reg, m.statuses); err != nil {
		return nil, err
	}
	if m.duration, err = register(reg, m.duration); err != nil {
		return nil, err
	}
	return m, nil
}

// register registers c, reusing an identical collector another Client registered before.
func register[C prometheus.Collector](reg prometheus.Registerer, c C) (C, error) {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing, nil
			}
		}
		return c, fmt.Errorf("register gitlab client metrics: %w", err)
	}
	return c, nil
}

func (m *metrics) observe(runner, endpoint, status string, d time.Duration) {
	if m == nil {
		return
	}
	m.statuses.WithLabelValues(runner, endpoint, status).Inc()
	m.duration.WithLabelValues(runner, endpoint).Observe(d.Seconds())
}
