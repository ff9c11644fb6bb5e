package gce

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"

	"cloud.google.com/go/compute/apiv1/computepb"
	"google.golang.org/api/googleapi"

	"github.com/mayfly-ci/mayfly/providers"
)

// Error reasons of the Compute API (googleapi.ErrorItem.Reason) and error
// codes of failed zone operations (Operation.error.errors[].code), as
// documented for Compute Engine.
const (
	reasonRateLimitExceeded     = "rateLimitExceeded"
	reasonUserRateLimitExceeded = "userRateLimitExceeded"
	reasonQuotaExceeded         = "quotaExceeded"
	reasonNotFound              = "notFound"
	reasonConditionNotMet       = "conditionNotMet"
	reasonResourceNotReady      = "resourceNotReady"

	codeZoneExhausted        = "ZONE_RESOURCE_POOL_EXHAUSTED"
	codeZoneExhaustedDetails = "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"
	codeQuotaExceeded        = "QUOTA_EXCEEDED"
	codeOperationRate        = "RESOURCE_OPERATION_RATE_EXCEEDED"
	codeRateLimitExceeded    = "RATE_LIMIT_EXCEEDED"
	codeResourceNotFound     = "RESOURCE_NOT_FOUND"
	codeInternal             = "INTERNAL_ERROR"
	codeResourceNotReady     = "RESOURCE_NOT_READY"
)

// quotaScopeRE finds the scope in quota messages such as
// "Quota 'CPUS' exceeded.  Limit: 24.0 in region us-east1."
var quotaScopeRE = regexp.MustCompile(`in (?:region|zone) ([a-z0-9-]+)`)

// classify turns an error of the Compute API into a providers error. zone
// is the zone of the call ("" for project-wide calls).
func classify(err error, zone string) error {
	if err == nil {
		return nil
	}
	if _, ok := errors.AsType[*providers.Error](err); ok {
		return err
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return providers.Transient(err)
	}
	gerr, ok := errors.AsType[*googleapi.Error](err)
	if !ok {
		if _, isNet := errors.AsType[net.Error](err); isNet {
			return providers.Transient(err)
		}
		return err
	}
	reasons := make([]string, 0, len(gerr.Errors))
	for _, it := range gerr.Errors {
		reasons = append(reasons, it.Reason)
	}
	has := func(want ...string) bool {
		for _, r := range reasons {
			for _, w := range want {
				if r == w {
					return true
				}
			}
		}
		return false
	}
	switch {
	case gerr.Code == http.StatusTooManyRequests,
		has(reasonRateLimitExceeded, reasonUserRateLimitExceeded):
		return providers.RateLimited(retryAfter(gerr.Header), err)
	case has(reasonQuotaExceeded):
		return providers.QuotaExceeded(quotaScope(gerr.Message, zone), err)
	case gerr.Code == http.StatusNotFound || has(reasonNotFound):
		return &providers.Error{Kind: providers.KindNotFound, Err: err}
	case gerr.Code == http.StatusPreconditionFailed || has(reasonConditionNotMet, reasonResourceNotReady):
		return providers.Transient(err)
	case gerr.Code == http.StatusBadRequest:
		return providers.InvalidArgument(err)
	case gerr.Code == http.StatusUnauthorized || gerr.Code == http.StatusForbidden:
		return providers.Permanent(err)
	case gerr.Code >= 500, gerr.Code == http.StatusConflict, gerr.Code == http.StatusRequestTimeout:
		return providers.Transient(err)
	}
	return err
}

// throttle passes err on, except that a rate-limit error pauses all API
// requests of the plugin first (pluginkit.Limiter's backoff) and then
// carries that pause as its retry-after: the fleet waits as long as the
// plugin does.
func (p *Provider) throttle(err error) error {
	retryAfter, ok := providers.IsRateLimited(err)
	if !ok {
		return err
	}
	p.mu.Lock()
	lim := p.lim
	p.mu.Unlock()
	if lim == nil {
		return err
	}
	cause := err
	if e, ok := errors.AsType[*providers.Error](err); ok {
		cause = e.Err
	}
	return lim.throttled(retryAfter, cause)
}

// retryAfter reads a Retry-After header in seconds or as an HTTP date.
func retryAfter(h http.Header) time.Duration {
	v := h.Get("Retry-After")
	if v == "" {
		return 0
	}
	if secs, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && secs >= 0 {
		return time.Duration(secs) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		if d := time.Until(t); d > 0 {
			return d.Round(time.Second)
		}
	}
	return 0
}

// quotaScope returns the region or zone a quota message names, else
// fallback's region (quotas are regional).
func quotaScope(msg, zone string) string {
	if m := quotaScopeRE.FindStringSubmatch(msg); m != nil {
		return m[1]
	}
	if zone == "" {
		return ""
	}
	return region(zone)
}

// operationError classifies the error of a finished zone operation in
// zone, or returns nil when it succeeded.
func operationError(op *computepb.Operation, zone string) error {
	items := op.GetError().GetErrors()
	if len(items) == 0 {
		if code := op.GetHttpErrorStatusCode(); code != 0 && (code < 200 || code > 299) {
			return fmt.Errorf("operation %s failed: HTTP %d %s", op.GetName(), code, op.GetHttpErrorMessage())
		}
		return nil
	}
	msgs := make([]string, 0, len(items))
	for _, it := range items {
		msgs = append(msgs, it.GetCode()+": "+it.GetMessage())
	}
	cause := fmt.Errorf("operation %s failed: %s", op.GetName(), strings.Join(msgs, "; "))
	for _, it := range items {
		switch it.GetCode() {
		case codeZoneExhausted, codeZoneExhaustedDetails:
			return providers.CapacityExhausted(zone, cause)
		case codeQuotaExceeded:
			return providers.QuotaExceeded(quotaScope(it.GetMessage(), zone), cause)
		case codeOperationRate, codeRateLimitExceeded:
			return providers.RateLimited(0, cause)
		}
	}
	switch items[0].GetCode() {
	case codeResourceNotFound:
		return providers.InvalidArgument(cause)
	case codeInternal, codeResourceNotReady:
		return providers.Transient(cause)
	}
	return cause
}
