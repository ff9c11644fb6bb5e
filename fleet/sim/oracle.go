package sim

import (
	"slices"
	"time"
)

// runOracle is the clairvoyant lower bound: every job finds a VM that
// became ready exactly at its arrival (booted for the provider's median
// boot time before), and the VM is deleted when the job ends. Latency is
// 0, idle time is 0; boot and deletion time are still billed.
func runOracle(o *Options) Report {
	boot := o.Provider.Boot.Median
	type edge struct {
		at time.Time
		d  int
	}
	edges := make([]edge, 0, 2*len(o.Jobs))
	lat := make([]time.Duration, len(o.Jobs))
	var busy time.Duration
	for _, j := range o.Jobs {
		busy += j.Duration
		edges = append(edges, edge{j.Arrival.Add(-boot), 1}, edge{j.Arrival.Add(j.Duration + o.Provider.DeleteTime), -1})
	}
	slices.SortFunc(edges, func(a, b edge) int {
		if c := a.at.Compare(b.at); c != 0 {
			return c
		}
		return a.d - b.d // ends before starts at the same instant
	})
	n, peak := 0, 0
	for _, e := range edges {
		n += e.d
		peak = max(peak, n)
	}
	jobs := len(o.Jobs)
	r := Report{Policy: PolicyOracle, Trace: o.Trace, Jobs: jobs, Started: jobs, SLOSeconds: o.SLO.Seconds()}
	fillLatency(&r, lat, jobs, o.SLO)
	r.BootVMHours = (time.Duration(jobs) * boot).Hours()
	r.BusyVMHours = busy.Hours()
	r.DeletingVMHours = (time.Duration(jobs) * o.Provider.DeleteTime).Hours()
	r.TotalVMHours = r.BootVMHours + r.BusyVMHours + r.DeletingVMHours
	r.APICalls = 2 * jobs
	r.APICallsPerJob = 2
	r.PeakInstances = peak
	last := o.Jobs[jobs-1]
	r.SimulatedHours = last.Arrival.Add(last.Duration).Sub(o.Jobs[0].Arrival.Add(-boot)).Hours()
	r.Assumptions = []string{"oracle: knows every arrival; one VM per job, created one median boot time before the arrival; no failures"}
	return r
}
