package sim

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"text/tabwriter"
	"time"
)

// Report is the outcome of one simulation run. Latencies are in seconds.
type Report struct {
	Policy string `json:"policy"`
	Trace  string `json:"trace,omitempty"`
	Jobs   int    `json:"jobs"`
	// Started counts jobs that started before the horizon; the others
	// count as over the SLO and with an infinite latency.
	Started int `json:"started"`
	// LatencyP50, P90 and P99 are queue-to-start latencies in seconds
	// (-1: infinite, i.e. that share of jobs never started).
	LatencyP50 float64 `json:"latency_p50_s"`
	LatencyP90 float64 `json:"latency_p90_s"`
	LatencyP99 float64 `json:"latency_p99_s"`
	LatencyMax float64 `json:"latency_max_s"`
	// WithinSLO is the share of jobs started within SLOSeconds.
	WithinSLO  float64 `json:"within_slo"`
	SLOSeconds float64 `json:"slo_s"`
	// VM-hours: idle (ready, no job), booting (requested, creating or
	// failed), busy (running a job), deleting (billed until deleted).
	IdleVMHours     float64 `json:"idle_vm_hours"`
	BootVMHours     float64 `json:"boot_vm_hours"`
	BusyVMHours     float64 `json:"busy_vm_hours"`
	DeletingVMHours float64 `json:"deleting_vm_hours"`
	TotalVMHours    float64 `json:"total_vm_hours"`
	// APICalls counts provider calls (create, delete, and for policies
	// that list instances, list calls estimated from their poll cadence).
	APICalls       int     `json:"api_calls"`
	APICallsPerJob float64 `json:"api_calls_per_job"`
	// APICallsByCall splits APICalls by call (the runtime fleet's
	// policies, counted at the simulated provider).
	APICallsByCall map[string]int `json:"api_calls_by_call,omitempty"`
	// InstancesCreated counts the VMs created. For the runtime fleet's
	// policies it is at most Jobs + IdleTargetRises + BootFailures (issue
	// 20: no VM is created that neither a job nor the idle target asked
	// for, failures aside).
	InstancesCreated int `json:"instances_created"`
	// IdleTargetRises sums the rises of the idle target over the run (the
	// runtime fleet's policies).
	IdleTargetRises int `json:"idle_target_rises,omitempty"`
	// DeletedUnused counts VMs deleted after they became ready without
	// running a job (idle past IdleTime, or surplus).
	DeletedUnused int `json:"deleted_unused"`
	// DeletedUnusedWhileWaiting counts VMs deleted unused while a job
	// that had been taken waited for a VM (issue 20's invariant: 0).
	DeletedUnusedWhileWaiting int `json:"deleted_unused_while_waiting"`
	PeakInstances             int `json:"peak_instances"`
	BootFailures              int `json:"boot_failures"`
	// MaxIdleTarget is the highest idle target a mayfly or predictive
	// scaler pass computed (0 for the other policies).
	MaxIdleTarget int `json:"max_idle_target,omitempty"`
	// OnDemandJobs counts jobs taken before an instance was idle for them
	// (mayfly's on-demand window; docker-machine with IdleCount 0).
	OnDemandJobs int `json:"on_demand_jobs"`
	// SimulatedHours is the simulated span.
	SimulatedHours float64 `json:"simulated_hours"`
	// Assumptions names the modelling choices the figures depend on.
	Assumptions []string `json:"assumptions,omitempty"`
	// Series holds periodic samples when Options.SeriesStep is set.
	Series []Sample `json:"series,omitempty"`
}

// Sample is the fleet at one instant.
type Sample struct {
	Time     time.Time `json:"time"`
	Booting  int       `json:"booting"`
	Idle     int       `json:"idle"`
	Busy     int       `json:"busy"`
	Deleting int       `json:"deleting"`
	Pending  int       `json:"pending"`
	// OldestWait is how long the oldest pending job has waited, in seconds.
	OldestWait float64 `json:"oldest_wait_s"`
}

func (w *world) sample(t time.Time) {
	s := Sample{
		Time:     t,
		Booting:  w.count[vmRequested] + w.count[vmCreating] + w.count[vmFailed],
		Idle:     w.count[vmIdle],
		Busy:     w.count[vmBusy],
		Deleting: w.count[vmDeleting],
		Pending:  len(w.pending) - w.pendHead,
	}
	if s.Pending > 0 {
		s.OldestWait = t.Sub(w.jobs[w.pending[w.pendHead]].Arrival).Seconds()
	}
	w.series = append(w.series, s)
}

const (
	pollInterval      = 2 * time.Second
	reconcileInterval = time.Minute
)

func (w *world) report() Report {
	r := Report{Policy: w.o.Policy, Trace: w.o.Trace, Jobs: len(w.jobs), Started: w.started, SLOSeconds: w.o.SLO.Seconds()}
	fillLatency(&r, w.latency, len(w.jobs), w.o.SLO)
	h := func(d time.Duration) float64 { return d.Hours() }
	r.IdleVMHours = h(w.stateNS[vmIdle])
	r.BootVMHours = h(w.stateNS[vmRequested] + w.stateNS[vmCreating] + w.stateNS[vmFailed])
	r.BusyVMHours = h(w.stateNS[vmBusy])
	r.DeletingVMHours = h(w.stateNS[vmDeleting])
	r.TotalVMHours = r.IdleVMHours + r.BootVMHours + r.BusyVMHours + r.DeletingVMHours
	r.APICalls = w.cloud.calls
	if w.ctl.polls() {
		span := w.lastAdvance.Sub(w.start)
		r.APICalls += int(w.creatingTime/pollInterval) + int((span-w.creatingTime)/reconcileInterval)
	}
	if w.finished > 0 {
		r.APICallsPerJob = float64(r.APICalls) / float64(w.finished)
	}
	r.PeakInstances = w.peak
	r.BootFailures = w.failures
	r.SimulatedHours = w.lastAdvance.Sub(w.start).Hours()
	r.Assumptions = w.ctl.assumptions()
	r.InstancesCreated = w.created
	r.DeletedUnused = w.deletedUnused
	r.DeletedUnusedWhileWaiting = w.wastedWhileWaiting
	if rf, ok := w.ctl.(*runtimeFleet); ok {
		r.MaxIdleTarget = rf.maxTarget
		r.IdleTargetRises = rf.targetRises
		r.OnDemandJobs = rf.onDemand
		r.APICallsByCall = rf.cloud.calls
		// The fleet keeps the invariant's count too; both must be 0.
		r.DeletedUnusedWhileWaiting = max(r.DeletedUnusedWhileWaiting, rf.f.Gauges().DeletedUnusedWhileWaiting)
	}
	if d, ok := w.ctl.(*dockerMachine); ok {
		r.OnDemandJobs = d.onDemand
	}
	r.Series = w.series
	return r
}

// fillLatency sets the latency fields; jobs beyond len(lat) never started.
func fillLatency(r *Report, lat []time.Duration, jobs int, slo time.Duration) {
	s := slices.Clone(lat)
	slices.Sort(s)
	q := func(p float64) float64 {
		if jobs == 0 {
			return 0
		}
		i := int(p*float64(jobs)+0.999999) - 1 // nearest rank
		i = max(i, 0)
		if i >= len(s) {
			return -1
		}
		return s[i].Seconds()
	}
	r.LatencyP50, r.LatencyP90, r.LatencyP99 = q(0.5), q(0.9), q(0.99)
	if len(s) < jobs {
		r.LatencyMax = -1
	} else if len(s) > 0 {
		r.LatencyMax = s[len(s)-1].Seconds()
	}
	n, _ := slices.BinarySearch(s, slo+1)
	if jobs > 0 {
		r.WithinSLO = float64(n) / float64(jobs)
	}
}

// WriteJSON writes reports as an indented JSON array.
func WriteJSON(w io.Writer, reports ...Report) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(reports); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	return nil
}

// WriteTable writes reports as an aligned text table, one row each, then
// the assumptions of each policy once.
func WriteTable(w io.Writer, reports ...Report) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "trace\tpolicy\tjobs\tstarted\tp50 s\tp90 s\tp99 s\twithin SLO\tidle VM-h\ttotal VM-h\tAPI calls/job\tpeak VMs\tVMs created\tdeleted unused while jobs waited\t")
	lat := func(v float64) string {
		if v < 0 {
			return "inf"
		}
		return fmt.Sprintf("%.1f", v)
	}
	for _, r := range reports {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%s\t%s\t%s\t%.1f%%\t%.1f\t%.1f\t%.2f\t%d\t%d\t%d\t\n",
			r.Trace, r.Policy, r.Jobs, r.Started, lat(r.LatencyP50), lat(r.LatencyP90), lat(r.LatencyP99),
			100*r.WithinSLO, r.IdleVMHours, r.TotalVMHours, r.APICallsPerJob, r.PeakInstances, r.InstancesCreated, r.DeletedUnusedWhileWaiting)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	seen := map[string]bool{}
	for _, r := range reports {
		if seen[r.Policy] || len(r.Assumptions) == 0 {
			continue
		}
		seen[r.Policy] = true
		fmt.Fprintf(w, "\n%s assumptions:\n", r.Policy)
		for _, a := range r.Assumptions {
			if _, err := fmt.Fprintf(w, "  - %s\n", a); err != nil {
				return fmt.Errorf("write report: %w", err)
			}
		}
	}
	return nil
}
