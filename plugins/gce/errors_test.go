package gce

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"testing"
	"time"

	"cloud.google.com/go/compute/apiv1/computepb"
	"google.golang.org/api/googleapi"
	"google.golang.org/protobuf/proto"

	"github.com/mayfly-ci/mayfly/providers"
)

func gerr(code int, reason, msg string, hdr ...string) error {
	h := http.Header{}
	for i := 0; i+1 < len(hdr); i += 2 {
		h.Set(hdr[i], hdr[i+1])
	}
	e := &googleapi.Error{Code: code, Message: msg, Header: h}
	if reason != "" {
		e.Errors = []googleapi.ErrorItem{{Reason: reason, Message: msg}}
	}
	return fmt.Errorf("call: %w", e)
}

func TestClassify(t *testing.T) {
	tests := []struct {
		name       string
		err        error
		kind       providers.Kind
		retryAfter time.Duration
		scope      string
	}{
		{"429 with Retry-After", gerr(429, "rateLimitExceeded", "Rate Limit Exceeded", "Retry-After", "7"), providers.KindRateLimited, 7 * time.Second, ""},
		{"429 without reason", gerr(429, "", "Too Many Requests"), providers.KindRateLimited, 0, ""},
		{"403 rateLimitExceeded", gerr(403, "rateLimitExceeded", "Rate Limit Exceeded"), providers.KindRateLimited, 0, ""},
		{"403 userRateLimitExceeded", gerr(403, "userRateLimitExceeded", "User Rate Limit Exceeded"), providers.KindRateLimited, 0, ""},
		{"403 quotaExceeded with region", gerr(403, "quotaExceeded", "Quota 'CPUS' exceeded.  Limit: 24.0 in region europe-west4."), providers.KindQuotaExceeded, 0, "europe-west4"},
		{"403 quotaExceeded without scope", gerr(403, "quotaExceeded", "Quota exceeded."), providers.KindQuotaExceeded, 0, "us-east1"},
		{"404", gerr(404, "notFound", "The resource was not found"), providers.KindNotFound, 0, ""},
		{"412 fingerprint", gerr(412, "conditionNotMet", "Supplied fingerprint does not match"), providers.KindTransient, 0, ""},
		{"400 invalid", gerr(400, "invalid", "Invalid value for field"), providers.KindInvalidArgument, 0, ""},
		{"403 forbidden", gerr(403, "forbidden", "Required 'compute.instances.create' permission"), providers.KindPermanent, 0, ""},
		{"401", gerr(401, "authError", "Invalid Credentials"), providers.KindPermanent, 0, ""},
		{"409 alreadyExists", gerr(409, "alreadyExists", "already exists"), providers.KindTransient, 0, ""},
		{"500", gerr(500, "backendError", "Internal Error"), providers.KindTransient, 0, ""},
		{"503", gerr(503, "", "Service Unavailable"), providers.KindTransient, 0, ""},
		{"deadline", fmt.Errorf("call: %w", context.DeadlineExceeded), providers.KindTransient, 0, ""},
		{"already classified", providers.CapacityExhausted("z", nil), providers.KindCapacityExhausted, 0, "z"},
		{"other", errors.New("boom"), providers.KindUnknown, 0, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := classify(tt.err, "us-east1-b")
			if k := providers.KindOf(got); k != tt.kind {
				t.Fatalf("kind %s, want %s (%v)", k, tt.kind, got)
			}
			if ra, ok := providers.IsRateLimited(got); ok && ra != tt.retryAfter {
				t.Errorf("retry after %s, want %s", ra, tt.retryAfter)
			}
			if scope, ok := providers.IsQuotaExceeded(got); ok && scope != tt.scope {
				t.Errorf("scope %q, want %q", scope, tt.scope)
			}
			if tt.kind != providers.KindUnknown && !errors.Is(got, tt.err) && tt.name != "already classified" {
				t.Errorf("classified error does not wrap the cause")
			}
		})
	}
}

func opWithError(code, msg string) *computepb.Operation {
	return &computepb.Operation{
		Name:                proto.String("operation-1"),
		Status:              computepb.Operation_DONE.Enum(),
		HttpErrorStatusCode: proto.Int32(503),
		Error:               &computepb.Error{Errors: []*computepb.Errors{{Code: proto.String(code), Message: proto.String(msg)}}},
	}
}

func TestOperationError(t *testing.T) {
	tests := []struct {
		op    *computepb.Operation
		kind  providers.Kind
		scope string
	}{
		{opWithError("ZONE_RESOURCE_POOL_EXHAUSTED", "The zone 'projects/p/zones/us-east1-b' does not have enough resources"), providers.KindCapacityExhausted, "us-east1-b"},
		{opWithError("ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", "A n1-standard-1 VM instance is currently unavailable"), providers.KindCapacityExhausted, "us-east1-b"},
		{opWithError("QUOTA_EXCEEDED", "Quota 'CPUS' exceeded.  Limit: 8.0 in region us-east1."), providers.KindQuotaExceeded, "us-east1"},
		{opWithError("RESOURCE_OPERATION_RATE_EXCEEDED", "Operation rate exceeded"), providers.KindRateLimited, ""},
		{opWithError("RESOURCE_NOT_FOUND", "The resource 'projects/debian-cloud/global/images/family/nope' was not found"), providers.KindInvalidArgument, ""},
		{opWithError("INTERNAL_ERROR", "Internal error"), providers.KindTransient, ""},
		{opWithError("SOMETHING_NEW", "?"), providers.KindUnknown, ""},
	}
	for _, tt := range tests {
		code := tt.op.GetError().GetErrors()[0].GetCode()
		err := operationError(tt.op, "us-east1-b")
		if k := providers.KindOf(err); k != tt.kind {
			t.Errorf("%s: kind %s, want %s (%v)", code, k, tt.kind, err)
		}
		if scope, ok := providers.IsCapacityExhausted(err); ok && scope != tt.scope {
			t.Errorf("%s: capacity scope %q, want %q", code, scope, tt.scope)
		}
		if scope, ok := providers.IsQuotaExceeded(err); ok && scope != tt.scope {
			t.Errorf("%s: quota scope %q, want %q", code, scope, tt.scope)
		}
	}
	ok := &computepb.Operation{Name: proto.String("operation-2"), Status: computepb.Operation_DONE.Enum()}
	if err := operationError(ok, "us-east1-b"); err != nil {
		t.Errorf("successful operation: %v", err)
	}
}
