package aws_test

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/plugins/aws"
	"github.com/mayfly-ci/mayfly/plugins/aws/awsfake"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/conformance"
)

func conformanceOptions(t *testing.T) conformance.Options {
	fault := func(action, code string, times int) func(t *testing.T) json.RawMessage {
		return func(t *testing.T) json.RawMessage {
			e := newEnv(t, awsfake.Options{PendingDuration: 100 * time.Millisecond})
			e.srv.FailNext(action, code, "", times)
			return e.with()
		}
	}
	bad := newEnv(t, awsfake.Options{})
	return conformance.Options{
		Settings: func(t *testing.T) json.RawMessage {
			return newEnv(t, awsfake.Options{PendingDuration: 200 * time.Millisecond, ShuttingDownDuration: 200 * time.Millisecond}).with()
		},
		InvalidSettings: bad.with("instance_typo", "t3.micro"),
		ReadyTimeout:    20 * time.Second,
		PollInterval:    50 * time.Millisecond,
		CallTimeout:     20 * time.Second,
		Faults: []conformance.Fault{
			// Both subnets out of capacity once: the fallback runs dry.
			{Name: "NoCapacityInAnySubnet", Settings: fault("RunInstances", "InsufficientInstanceCapacity", 2), Op: "create", Want: providers.KindCapacityExhausted, WantScope: "us-east-1"},
			{Name: "InstanceLimit", Settings: fault("RunInstances", "InstanceLimitExceeded", 1), Op: "create", Want: providers.KindQuotaExceeded, WantScope: "us-east-1"},
			{Name: "VcpuLimit", Settings: fault("RunInstances", "VcpuLimitExceeded", 1), Op: "create", Want: providers.KindQuotaExceeded, WantScope: "us-east-1"},
			{Name: "RunThrottled", Settings: fault("RunInstances", "RequestLimitExceeded", 1), Op: "create", Want: providers.KindRateLimited, WantRetryAfter: 100 * time.Millisecond},
			{Name: "DescribeThrottled", Settings: fault("DescribeInstances", "RequestLimitExceeded", 1), Op: "list", Want: providers.KindRateLimited, WantRetryAfter: 100 * time.Millisecond},
			{Name: "AuthFailure", Settings: fault("DescribeInstances", "UnauthorizedOperation", 1), Op: "list", Want: providers.KindPermanent},
			// The SDK retries an internal error twice; the third one counts.
			{Name: "InternalErrorPersists", Settings: fault("DescribeInstances", "InternalError", 3), Op: "list", Want: providers.KindTransient},
		},
	}
}

func TestConformanceInProcess(t *testing.T) {
	conformance.Run(t, func(t *testing.T) providers.Provider {
		return aws.New(aws.Options{})
	}, conformanceOptions(t))
}

func TestConformancePlugin(t *testing.T) {
	conformance.Run(t, func(t *testing.T) providers.Provider { return startPlugin(t) }, conformanceOptions(t))
}
