package gce

import (
	"testing"

	"cloud.google.com/go/compute/apiv1/computepb"
	"google.golang.org/protobuf/proto"

	"github.com/mayfly-ci/mayfly/providers"
)

// TestInstanceState maps every instance status, for standard, spot and
// preemptible instances: a preempted instance (STOPPING, then TERMINATED)
// is failed with reason "preempted" from its first STOPPING, so the fleet
// takes it from a job at once.
func TestInstanceState(t *testing.T) {
	standard := &computepb.Scheduling{AutomaticRestart: proto.Bool(false)}
	spot := &computepb.Scheduling{ProvisioningModel: proto.String("SPOT")}
	preemptible := &computepb.Scheduling{Preemptible: proto.Bool(true)}
	tests := []struct {
		status     string
		sched      *computepb.Scheduling
		deleting   bool
		wantState  providers.State
		wantReason string
	}{
		{statusProvisioning, spot, false, providers.StateCreating, ""},
		{statusStaging, standard, false, providers.StateCreating, ""},
		{statusRunning, spot, false, providers.StateRunning, ""},
		{statusRunning, standard, false, providers.StateRunning, ""},
		{statusStopping, spot, false, providers.StateFailed, "preempted"},
		{statusStopping, preemptible, false, providers.StateFailed, "preempted"},
		{statusStopping, standard, false, providers.StateDeleting, ""},
		{statusTerminated, spot, false, providers.StateFailed, "preempted"},
		{statusTerminated, preemptible, false, providers.StateFailed, "preempted"},
		{statusTerminated, standard, false, providers.StateFailed, "terminated"},
		{statusStopped, standard, false, providers.StateFailed, "stopped"},
		{statusSuspended, standard, false, providers.StateFailed, "suspended"},
		{statusRepairing, standard, false, providers.StateFailed, "repairing"},
		{"PENDING_STOP", standard, false, providers.StateFailed, "unknown status PENDING_STOP"},
		// The plugin's own deletion wins over the status.
		{statusStopping, spot, true, providers.StateDeleting, ""},
		{statusTerminated, spot, true, providers.StateDeleting, ""},
		{statusRunning, standard, true, providers.StateDeleting, ""},
	}
	for _, tt := range tests {
		inst := &computepb.Instance{Status: proto.String(tt.status), Scheduling: tt.sched}
		state, reason := instanceState(inst, tt.deleting)
		if state != tt.wantState || reason != tt.wantReason {
			t.Errorf("%s (scheduling %v, deleting %t): %s %q, want %s %q", tt.status, tt.sched, tt.deleting, state, reason, tt.wantState, tt.wantReason)
		}
	}
}
