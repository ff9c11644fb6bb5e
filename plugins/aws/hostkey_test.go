package aws

import (
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"

	"github.com/mayfly-ci/mayfly/providers"
)

const (
	edKey    = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHtOReNwl7HPAz5EUR/6mRdACoNszPBcSS9tCUeot7CE"
	ecdsaKey = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBHN14OCnYTeMh09qRzmWhtXsCgMOQu5S4WLksyBkQsNFil50MPdN8EoE0hh4dw70UzctiMXmQW/vStGeeyLv7OA="
)

func TestParseHostKey(t *testing.T) {
	tests := []struct {
		name, console, want string
	}{
		{"empty", "", ""},
		{"no block yet", "[ 0.0] Linux version 6.1\r\ncloud-init running\r\n", ""},
		{"unterminated", "-----BEGIN SSH HOST KEY KEYS-----\r\n" + edKey + " root@h\r\n", ""},
		{"prefers ed25519", "boot\r\n-----BEGIN SSH HOST KEY KEYS-----\r\n" + ecdsaKey + " root@h\r\n" + edKey + " root@h\r\n-----END SSH HOST KEY KEYS-----\r\n", edKey},
		{"ecdsa only", "-----BEGIN SSH HOST KEY KEYS-----\n" + ecdsaKey + " root@h\n-----END SSH HOST KEY KEYS-----\n", ecdsaKey},
		{"garbage lines skipped", "-----BEGIN SSH HOST KEY KEYS-----\nnot a key\n" + edKey + "\n-----END SSH HOST KEY KEYS-----", edKey},
		{"first block wins", "-----BEGIN SSH HOST KEY KEYS-----\n" + ecdsaKey + "\n-----END SSH HOST KEY KEYS-----\n-----BEGIN SSH HOST KEY KEYS-----\n" + edKey + "\n-----END SSH HOST KEY KEYS-----\n", ecdsaKey},
	}
	for _, tt := range tests {
		if got := parseHostKey(tt.console); got != tt.want {
			t.Errorf("%s: parseHostKey = %q, want %q", tt.name, got, tt.want)
		}
	}
}

func TestMapState(t *testing.T) {
	tests := []struct {
		state  types.InstanceStateName
		reason string
		want   providers.State
		why    string
	}{
		{types.InstanceStateNamePending, "", providers.StateCreating, ""},
		{types.InstanceStateNameRunning, "", providers.StateRunning, ""},
		{types.InstanceStateNameShuttingDown, "Client.UserInitiatedShutdown", providers.StateDeleting, ""},
		{types.InstanceStateNameTerminated, "Client.UserInitiatedShutdown", providers.StateGone, ""},
		{types.InstanceStateNameShuttingDown, "Server.SpotInstanceTermination", providers.StateGone, ReasonSpotInterrupted},
		{types.InstanceStateNameTerminated, "Server.SpotInstanceTermination", providers.StateGone, ReasonSpotInterrupted},
		{types.InstanceStateNameStopping, "Server.SpotInstanceShutdown", providers.StateGone, ReasonSpotInterrupted},
		{types.InstanceStateNameStopped, "Server.SpotInstanceShutdown", providers.StateGone, ReasonSpotInterrupted},
		{types.InstanceStateNameStopped, "Client.UserInitiatedShutdown", providers.StateFailed, "stopped"},
		{types.InstanceStateNameStopped, "Server.ScheduledStop", providers.StateFailed, "stopped: scheduled retirement"},
		{types.InstanceStateNameTerminated, "Server.InsufficientInstanceCapacity", providers.StateGone, "launch failed: Server.InsufficientInstanceCapacity"},
		{types.InstanceStateNameTerminated, "Client.InstanceInitiatedShutdown", providers.StateGone, "shut down from inside the instance"},
	}
	for _, tt := range tests {
		inst := types.Instance{State: &types.InstanceState{Name: tt.state}}
		if tt.reason != "" {
			inst.StateReason = &types.StateReason{Code: aws.String(tt.reason)}
		}
		got, why := mapState(inst)
		if got != tt.want || why != tt.why {
			t.Errorf("%s/%s → %s (%q), want %s (%q)", tt.state, tt.reason, got, why, tt.want, tt.why)
		}
	}
}
