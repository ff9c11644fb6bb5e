package manager

import (
	"github.com/prometheus/client_golang/prometheus"
)

// queueStartBuckets are the buckets of the creation-to-script-start histogram.
// 120 s is a bucket edge so that "share of jobs started within 120 s" (the
// hosted runners' SLO) is exact.
var queueStartBuckets = []float64{1, 2, 5, 10, 15, 30, 45, 60, 90, 120, 180, 300, 600, 1800, 3600}

// jobDurationBuckets are the buckets of the job duration histogram.
var jobDurationBuckets = []float64{5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 10800}

// metrics are the manager's Prometheus metrics. Names follow gitlab-runner's
// where the meaning is the same.
type metrics struct {
	jobs            *prometheus.GaugeVec     // running jobs by runner and stage
	jobsTotal       *prometheus.CounterVec   // finished jobs by runner, state and failure reason
	jobDuration     *prometheus.HistogramVec // by runner
	queueToStart    *prometheus.HistogramVec // job creation to script start, by runner
	pickupToStart   *prometheus.HistogramVec // job received to script start, by runner
	concurrent      prometheus.Gauge
	limit           *prometheus.GaugeVec
	requests        *prometheus.CounterVec   // job requests by runner and outcome
	systemFailures  *prometheus.CounterVec   // jobs failed with runner_system_failure, by runner
	requestsSkipped *prometheus.CounterVec   // polls that did not ask GitLab, by runner and reason
	onDemand        *prometheus.CounterVec   // jobs taken for an instance not yet ready, by runner
	phase           *prometheus.HistogramVec // time spent in each phase of a job, by runner and phase
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		jobs: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "gitlab_runner_jobs", Help: "Jobs running now, by runner.",
		}, []string{"runner"}),
		jobsTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mayfly_jobs_finished_total", Help: "Finished jobs by runner, final state and failure reason.",
		}, []string{"runner", "state", "failure_reason"}),
		jobDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "gitlab_runner_job_duration_seconds", Help: "Job duration from pickup to final update.", Buckets: jobDurationBuckets,
		}, []string{"runner"}),
		queueToStart: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "mayfly_job_queue_to_start_seconds", Help: "Time from job creation in GitLab (time_in_queue_seconds) to the first line of its script running.", Buckets: queueStartBuckets,
		}, []string{"runner"}),
		pickupToStart: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "mayfly_job_pickup_to_start_seconds", Help: "Time from receiving a job to the first line of its script running: mayfly's own overhead, plus the boot wait of jobs taken on demand.", Buckets: prometheus.ExponentialBuckets(0.05, 2, 14),
		}, []string{"runner"}),
		concurrent: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "gitlab_runner_concurrent", Help: "The concurrent setting.",
		}),
		limit: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "gitlab_runner_limit", Help: "The limit setting of each runner (0 = none).",
		}, []string{"runner"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mayfly_job_requests_total", Help: "Job requests by runner and outcome.",
		}, []string{"runner", "outcome"}),
		systemFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mayfly_runner_system_failures_total", Help: "Jobs failed with runner_system_failure, by runner.",
		}, []string{"runner"}),
		requestsSkipped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mayfly_job_requests_skipped_total", Help: "Polls that did not ask GitLab for a job, by runner and reason.",
		}, []string{"runner", "reason"}),
		onDemand: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mayfly_jobs_on_demand_total", Help: "Jobs taken before an instance was idle, for one expected within the on-demand window, by runner.",
		}, []string{"runner"}),
		phase: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "mayfly_job_phase_seconds", Help: "Time spent in each phase of a job (request, reserve, acquire, connect, ready_check, upload, stage_<name>, trace_flush, final_update, release, reattach), by runner and phase.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 20),
		}, []string{"runner", "phase"}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.jobs, m.jobsTotal, m.jobDuration, m.queueToStart, m.pickupToStart, m.concurrent, m.limit, m.requests, m.systemFailures, m.requestsSkipped, m.onDemand, m.phase} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
