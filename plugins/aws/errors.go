package aws

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"

	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/smithy-go"

	"github.com/mayfly-ci/mayfly/providers"
)

// EC2 error codes by the providers.Kind they map to. Sources: "Error codes
// for the Amazon EC2 API" (docs.aws.amazon.com/AWSEC2/latest/APIReference/
// errors-overview.html).
var (
	// capacityCodes: the zone of this subnet cannot launch the instance
	// now; another subnet (zone) may. RunInstances falls back on them.
	capacityCodes = map[string]bool{
		"InsufficientInstanceCapacity":         true,
		"InsufficientHostCapacity":             true,
		"InsufficientReservedInstanceCapacity": true,
		"InsufficientCapacity":                 true,
		"UnfulfillableCapacity":                true,
		"InsufficientFreeAddressesInSubnet":    true,
		"SpotMaxPriceTooLow":                   true,
		// The instance type is not offered in this subnet's zone.
		"Unsupported": true,
	}
	quotaCodes = map[string]bool{
		"InstanceLimitExceeded":        true,
		"VcpuLimitExceeded":            true,
		"MaxSpotInstanceCountExceeded": true,
		"VolumeLimitExceeded":          true,
		"MaxIOPSLimitExceeded":         true,
		"AddressLimitExceeded":         true,
		"ResourceLimitExceeded":        true,
	}
	throttleCodes = map[string]bool{
		"RequestLimitExceeded":  true,
		"Throttling":            true,
		"ThrottlingException":   true,
		"RequestThrottled":      true,
		"EC2ThrottledException": true,
	}
	notFoundCodes = map[string]bool{
		"InvalidInstanceID.NotFound":  true,
		"InvalidInstanceID.Malformed": true,
	}
	permanentCodes = map[string]bool{
		"AuthFailure":                 true,
		"UnauthorizedOperation":       true,
		"Blocked":                     true,
		"OptInRequired":               true,
		"PendingVerification":         true,
		"UnsupportedOperation":        true,
		"SignatureDoesNotMatch":       true,
		"MissingAuthenticationToken":  true,
		"IdempotentParameterMismatch": true,
		"InvalidClientTokenId":        true,
	}
	// transientCodes are retried by the SDK (a few quick attempts) and
	// reported as transient when they persist.
	transientCodes = map[string]bool{
		"InternalError":           true,
		"InternalFailure":         true,
		"Unavailable":             true,
		"ServiceUnavailable":      true,
		"RequestTimeout":          true,
		"RequestTimeoutException": true,
	}
)

// errorCode returns the EC2 error code of err, or "".
func errorCode(err error) string {
	if apiErr, ok := errors.AsType[smithy.APIError](err); ok {
		return apiErr.ErrorCode()
	}
	return ""
}

func isCapacity(err error) bool { return capacityCodes[errorCode(err)] }

// classify turns an SDK error of action into a classified providers
// error. scope goes with quota and capacity errors.
func (p *Provider) classify(st state, action string, err error, scope string) error {
	if err == nil {
		return nil
	}
	if _, ok := errors.AsType[*providers.Error](err); ok {
		return err // already classified (local rate limit, closed)
	}
	wrapped := fmt.Errorf("ec2 %s: %w", action, err)
	code := errorCode(err)
	switch {
	case throttleCodes[code]:
		err := st.limit.throttled(action, wrapped)
		wait, _ := providers.IsRateLimited(err)
		p.log.Warn("EC2 throttled the plugin", "action", action, "code", code, "pause", wait)
		return err
	case quotaCodes[code]:
		return providers.QuotaExceeded(scope, wrapped)
	case capacityCodes[code]:
		return providers.CapacityExhausted(scope, wrapped)
	case notFoundCodes[code]:
		return &providers.Error{Kind: providers.KindNotFound, Err: wrapped}
	case permanentCodes[code]:
		return providers.Permanent(wrapped)
	case transientCodes[code]:
		return providers.Transient(wrapped)
	case code == "MissingParameter" || strings.HasPrefix(code, "Invalid"):
		return providers.InvalidArgument(wrapped)
	case code != "":
		if re, ok := errors.AsType[*awshttp.ResponseError](err); ok && re.HTTPStatusCode() >= 500 {
			return providers.Transient(wrapped)
		}
		return wrapped
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return providers.Transient(wrapped)
	}
	if _, ok := errors.AsType[net.Error](err); ok {
		return providers.Transient(wrapped)
	}
	if re, ok := errors.AsType[*awshttp.ResponseError](err); ok && re.HTTPStatusCode() >= 500 {
		return providers.Transient(wrapped)
	}
	return wrapped
}
