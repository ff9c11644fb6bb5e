package wire

import (
	"context"
	"errors"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/mayfly-ci/mayfly/providers"
	pb "github.com/mayfly-ci/mayfly/providers/proto/providerv1"
)

var kindToProto = map[providers.Kind]pb.ErrorKind{
	providers.KindUnknown:           pb.ErrorKind_ERROR_KIND_UNSPECIFIED,
	providers.KindNotFound:          pb.ErrorKind_ERROR_KIND_NOT_FOUND,
	providers.KindQuotaExceeded:     pb.ErrorKind_ERROR_KIND_QUOTA_EXCEEDED,
	providers.KindRateLimited:       pb.ErrorKind_ERROR_KIND_RATE_LIMITED,
	providers.KindCapacityExhausted: pb.ErrorKind_ERROR_KIND_CAPACITY_EXHAUSTED,
	providers.KindPermanent:         pb.ErrorKind_ERROR_KIND_PERMANENT,
	providers.KindTransient:         pb.ErrorKind_ERROR_KIND_TRANSIENT,
	providers.KindInvalidArgument:   pb.ErrorKind_ERROR_KIND_INVALID_ARGUMENT,
}

var kindToCode = map[providers.Kind]codes.Code{
	providers.KindUnknown:           codes.Unknown,
	providers.KindNotFound:          codes.NotFound,
	providers.KindQuotaExceeded:     codes.ResourceExhausted,
	providers.KindRateLimited:       codes.ResourceExhausted,
	providers.KindCapacityExhausted: codes.ResourceExhausted,
	providers.KindPermanent:         codes.FailedPrecondition,
	providers.KindTransient:         codes.Unavailable,
	providers.KindInvalidArgument:   codes.InvalidArgument,
}

// kindForCode classifies a status that carries no ErrorDetail (an error
// made by gRPC itself, e.g. when the plugin process died).
var kindForCode = map[codes.Code]providers.Kind{
	codes.NotFound:           providers.KindNotFound,
	codes.ResourceExhausted:  providers.KindRateLimited,
	codes.Unavailable:        providers.KindTransient,
	codes.DeadlineExceeded:   providers.KindTransient,
	codes.Aborted:            providers.KindTransient,
	codes.Canceled:           providers.KindTransient,
	codes.InvalidArgument:    providers.KindInvalidArgument,
	codes.FailedPrecondition: providers.KindPermanent,
	codes.PermissionDenied:   providers.KindPermanent,
	codes.Unauthenticated:    providers.KindPermanent,
	codes.Unimplemented:      providers.KindPermanent,
}

// ToStatus turns a provider error (and the ids done before it happened)
// into a gRPC status error carrying an ErrorDetail. It returns nil for a nil
// err.
func ToStatus(err error, partial []string) error {
	if err == nil {
		return nil
	}
	kind := providers.KindOf(err)
	code := kindToCode[kind]
	switch {
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	}
	detail := &pb.ErrorDetail{Kind: kindToProto[kind], PartialIds: partial}
	var e *providers.Error
	if errors.As(err, &e) {
		detail.RetryAfterMs = e.RetryAfter.Milliseconds()
		detail.Scope = e.Scope
	}
	st, derr := status.New(code, err.Error()).WithDetails(detail)
	if derr != nil {
		// Only fails for unregistered message types; keep the code at least.
		return status.Error(code, err.Error())
	}
	return st.Err()
}

// FromStatus turns an error returned by a gRPC call back into a classified
// provider error, and returns the partial ids it carried.
func FromStatus(err error) (error, []string) {
	if err == nil {
		return nil, nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return providers.Transient(err), nil
	}
	for _, d := range st.Details() {
		detail, ok := d.(*pb.ErrorDetail)
		if !ok {
			continue
		}
		kind := providers.KindUnknown
		for k, pk := range kindToProto {
			if pk == detail.GetKind() {
				kind = k
			}
		}
		return &providers.Error{
			Kind:       kind,
			Msg:        st.Message(),
			RetryAfter: time.Duration(detail.GetRetryAfterMs()) * time.Millisecond,
			Scope:      detail.GetScope(),
		}, detail.GetPartialIds()
	}
	kind, ok := kindForCode[st.Code()]
	if !ok {
		kind = providers.KindUnknown
	}
	e := &providers.Error{Kind: kind, Msg: st.Message()}
	if st.Code() == codes.Unavailable || st.Code() == codes.Canceled {
		// Made by gRPC, not by the plugin: the connection failed.
		e.Err = ErrConnection
	}
	return e, nil
}

// ErrConnection marks an error made by gRPC because the connection to the
// plugin failed, typically because its process died.
var ErrConnection = errors.New("plugin connection failed")
