package sim

import (
	"fmt"
	"slices"
	"time"
)

// runOracle is the clairvoyant lower bound: every job finds a VM that
// became ready exactly when the runner picks the job up (booted for the
// provider's median boot time before), and the VM is deleted when the job
// ends. Idle time is 0; boot and deletion time are still billed. The
// runner still polls: a job is picked up at the first of the other
// policies' CheckInterval ticks at or after its arrival, so the latency is
// the wait for that tick and no policy can do better.
func runOracle(o *Options) Report {
	boot := o.Provider.Boot.Median
	start := o.Jobs[0].Arrival.Add(-o.Warmup) // the first tick, as in newWorld
	type edge struct {
		at time.Time
		d  int
	}
	edges := make([]edge, 0, 2*len(o.Jobs))
	lat := make([]time.Duration, len(o.Jobs))
	var busy time.Duration
	for i, j := range o.Jobs {
		busy += j.Duration
		wait := (o.CheckInterval - j.Arrival.Sub(start)%o.CheckInterval) % o.CheckInterval
		lat[i] = wait
		pickup := j.Arrival.Add(wait)
		edges = append(edges, edge{pickup.Add(-boot), 1}, edge{pickup.Add(j.Duration + o.Provider.DeleteTime), -1})
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
	r.Assumptions = []string{fmt.Sprintf("oracle: knows every arrival; one VM per job, ready when the job is picked up at the runner's next poll (every %s); no failures", o.CheckInterval)}
	return r
}
