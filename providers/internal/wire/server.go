package wire

import (
	"context"
	"errors"
	"fmt"

	"github.com/mayfly-ci/mayfly/providers"
	pb "github.com/mayfly-ci/mayfly/providers/proto/providerv1"
)

// Server serves a providers.Provider as the gRPC Provider service.
type Server struct {
	pb.UnimplementedProviderServer
	Impl providers.Provider
}

// Init implements pb.ProviderServer.
func (s *Server) Init(ctx context.Context, req *pb.InitRequest) (*pb.InitResponse, error) {
	info, err := s.Impl.Init(ctx, req.GetSettingsJson())
	if err != nil {
		return nil, ToStatus(err, nil)
	}
	return &pb.InitResponse{Id: info.ID, MaxSize: int64(info.MaxSize), Version: info.Version}, nil
}

// Create implements pb.ProviderServer.
func (s *Server) Create(ctx context.Context, req *pb.CreateRequest) (*pb.CreateResponse, error) {
	if req.GetCount() < 0 {
		return nil, ToStatus(providers.InvalidArgument(fmt.Errorf("create: count %d is negative", req.GetCount())), nil)
	}
	ids, err := s.Impl.Create(ctx, int(req.GetCount()), req.GetLabels())
	if err != nil {
		return nil, ToStatus(err, ids)
	}
	return &pb.CreateResponse{Ids: ids}, nil
}

// Delete implements pb.ProviderServer.
func (s *Server) Delete(ctx context.Context, req *pb.DeleteRequest) (*pb.DeleteResponse, error) {
	ids, err := s.Impl.Delete(ctx, req.GetIds())
	if err != nil {
		return nil, ToStatus(err, ids)
	}
	return &pb.DeleteResponse{DeletedIds: ids}, nil
}

// List implements pb.ProviderServer.
func (s *Server) List(ctx context.Context, _ *pb.ListRequest) (*pb.ListResponse, error) {
	list, err := s.Impl.List(ctx)
	if err != nil {
		return nil, ToStatus(err, nil)
	}
	resp := &pb.ListResponse{Instances: make([]*pb.Instance, 0, len(list))}
	for _, in := range list {
		st, ok := stateToProto[in.State]
		if !ok {
			// A plugin bug; refuse rather than report a state the fleet would
			// have to guess at.
			return nil, ToStatus(providers.Permanent(fmt.Errorf("list: instance %s has invalid state %q", in.ID, in.State)), nil)
		}
		resp.Instances = append(resp.Instances, &pb.Instance{
			Id:              in.ID,
			State:           st,
			Labels:          in.Labels,
			CreatedUnixNano: unixNano(in.CreatedAt),
			Reason:          in.Reason,
		})
	}
	return resp, nil
}

// ConnectInfo implements pb.ProviderServer.
func (s *Server) ConnectInfo(ctx context.Context, req *pb.ConnectInfoRequest) (*pb.ConnectInfoResponse, error) {
	ci, err := s.Impl.ConnectInfo(ctx, req.GetId())
	if err != nil {
		return nil, ToStatus(err, nil)
	}
	proto, ok := protocolToProto[ci.Protocol]
	if !ok {
		return nil, ToStatus(providers.Permanent(fmt.Errorf("connect info %s: invalid protocol %q", req.GetId(), ci.Protocol)), nil)
	}
	if ci.Port < 0 || ci.Port > 65535 {
		return nil, ToStatus(providers.Permanent(fmt.Errorf("connect info %s: port %d out of range", req.GetId(), ci.Port)), nil)
	}
	return &pb.ConnectInfoResponse{
		Id:         ci.ID,
		Address:    ci.Address,
		Port:       int32(ci.Port),
		Protocol:   proto,
		Os:         ci.OS,
		Arch:       ci.Arch,
		Username:   ci.Username,
		PrivateKey: ci.PrivateKey,
		Password:   ci.Password,
		HostKey:    ci.HostKey,
		TlsCert:    ci.TLSCert,
	}, nil
}

// Heartbeat implements pb.ProviderServer.
func (s *Server) Heartbeat(ctx context.Context, req *pb.HeartbeatRequest) (*pb.HeartbeatResponse, error) {
	if err := s.Impl.Heartbeat(ctx, req.GetId()); err != nil {
		return nil, ToStatus(err, nil)
	}
	return &pb.HeartbeatResponse{}, nil
}

// Shutdown implements pb.ProviderServer.
func (s *Server) Shutdown(ctx context.Context, _ *pb.ShutdownRequest) (*pb.ShutdownResponse, error) {
	if err := s.Impl.Shutdown(ctx); err != nil {
		return nil, ToStatus(err, nil)
	}
	return &pb.ShutdownResponse{}, nil
}

// ErrPanic marks an error made from a panic inside a plugin call.
var ErrPanic = errors.New("plugin panicked")
