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
	l, ok := s.Impl.(providers.Launcher)
	if !ok {
		ids, err := s.Impl.Create(ctx, int(req.GetCount()), req.GetLabels())
		if err != nil {
			return nil, ToStatus(err, ids)
		}
		return &pb.CreateResponse{Ids: ids}, nil
	}
	made, err := l.Launch(ctx, int(req.GetCount()), req.GetLabels())
	ids := providers.IDs(made)
	if err != nil {
		return nil, ToStatus(err, ids)
	}
	resp := &pb.CreateResponse{Ids: ids}
	for _, in := range made {
		if in.State == "" {
			in.State = providers.StateCreating
		}
		pin, err := instanceToProto(in)
		if err != nil {
			return nil, ToStatus(providers.Permanent(fmt.Errorf("create: %w", err)), ids)
		}
		resp.Instances = append(resp.Instances, pin)
	}
	return resp, nil
}

// instanceToProto converts one instance, with its connect info when set.
func instanceToProto(in providers.Instance) (*pb.Instance, error) {
	st, ok := stateToProto[in.State]
	if !ok {
		// A plugin bug; refuse rather than report a state the fleet would
		// have to guess at.
		return nil, fmt.Errorf("instance %s has invalid state %q", in.ID, in.State)
	}
	out := &pb.Instance{
		Id:              in.ID,
		State:           st,
		Labels:          in.Labels,
		CreatedUnixNano: unixNano(in.CreatedAt),
		Reason:          in.Reason,
	}
	if in.ConnectInfo != nil {
		ci, err := connectInfoToProto(*in.ConnectInfo)
		if err != nil {
			return nil, err
		}
		out.ConnectInfo = ci
	}
	return out, nil
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
		pin, err := instanceToProto(in)
		if err != nil {
			return nil, ToStatus(providers.Permanent(fmt.Errorf("list: %w", err)), nil)
		}
		resp.Instances = append(resp.Instances, pin)
	}
	return resp, nil
}

// ConnectInfo implements pb.ProviderServer.
func (s *Server) ConnectInfo(ctx context.Context, req *pb.ConnectInfoRequest) (*pb.ConnectInfoResponse, error) {
	ci, err := s.Impl.ConnectInfo(ctx, req.GetId())
	if err != nil {
		return nil, ToStatus(err, nil)
	}
	resp, err := connectInfoToProto(ci)
	if err != nil {
		return nil, ToStatus(providers.Permanent(err), nil)
	}
	return resp, nil
}

// connectInfoToProto converts connect info, refusing a protocol or port
// the wire cannot carry.
func connectInfoToProto(ci providers.ConnectInfo) (*pb.ConnectInfoResponse, error) {
	proto, ok := protocolToProto[ci.Protocol]
	if !ok {
		return nil, fmt.Errorf("connect info %s: invalid protocol %q", ci.ID, ci.Protocol)
	}
	if ci.Port < 0 || ci.Port > 65535 {
		return nil, fmt.Errorf("connect info %s: port %d out of range", ci.ID, ci.Port)
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
