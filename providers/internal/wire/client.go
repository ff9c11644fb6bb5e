package wire

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime/debug"

	"google.golang.org/grpc"

	"github.com/mayfly-ci/mayfly/providers"
	pb "github.com/mayfly-ci/mayfly/providers/proto/providerv1"
)

// Client is a providers.Provider that calls a plugin over gRPC.
type Client struct {
	RPC pb.ProviderClient
}

var (
	_ providers.Provider = (*Client)(nil)
	_ providers.Launcher = (*Client)(nil)
)

// callErr converts the error of a failed call to op. When the caller's
// context ended, the context's error is kept so errors.Is works on it.
func callErr(ctx context.Context, op string, err error) (error, []string) {
	if ctxErr := ctx.Err(); ctxErr != nil {
		return &providers.Error{Kind: providers.KindTransient, Msg: "plugin " + op, Err: ctxErr}, nil
	}
	return FromStatus(err)
}

// Init implements providers.Provider.
func (c *Client) Init(ctx context.Context, settings json.RawMessage) (providers.Info, error) {
	resp, err := c.RPC.Init(ctx, &pb.InitRequest{SettingsJson: settings})
	if err != nil {
		err, _ = callErr(ctx, "init", err)
		return providers.Info{}, err
	}
	return providers.Info{ID: resp.GetId(), MaxSize: int(resp.GetMaxSize()), Version: resp.GetVersion()}, nil
}

// Create implements providers.Provider: Launch, keeping the ids.
func (c *Client) Create(ctx context.Context, n int, labels map[string]string) ([]string, error) {
	made, err := c.Launch(ctx, n, labels)
	return providers.IDs(made), err
}

// Delete implements providers.Provider.
func (c *Client) Delete(ctx context.Context, ids []string) ([]string, error) {
	resp, err := c.RPC.Delete(ctx, &pb.DeleteRequest{Ids: ids})
	if err != nil {
		return swap(callErr(ctx, "delete", err))
	}
	return resp.GetDeletedIds(), nil
}

func swap(err error, ids []string) ([]string, error) { return ids, err }

// Launch implements providers.Launcher: it is Create, returning the
// instances with their connect info when the plugin's provider launches
// (see CreateResponse.instances), and with their ids only otherwise, as
// after a partial failure.
func (c *Client) Launch(ctx context.Context, n int, labels map[string]string) ([]providers.Instance, error) {
	if n < 0 {
		return nil, providers.InvalidArgument(fmt.Errorf("create: count %d is negative", n))
	}
	resp, err := c.RPC.Create(ctx, &pb.CreateRequest{Count: int64(n), Labels: labels})
	if err != nil {
		err, ids := callErr(ctx, "create", err)
		return providers.InstancesOf(ids), err
	}
	if len(resp.GetInstances()) == 0 {
		return providers.InstancesOf(resp.GetIds()), nil
	}
	out := make([]providers.Instance, 0, len(resp.GetInstances()))
	for _, in := range resp.GetInstances() {
		got, err := instanceFromProto(in)
		if err != nil {
			// The plugin made them: keep the ids so the fleet owns them,
			// and let it ask for their connect info.
			return providers.InstancesOf(resp.GetIds()), providers.Permanent(fmt.Errorf("create: %w", err))
		}
		out = append(out, got)
	}
	return out, nil
}

// instanceFromProto converts one instance, with its connect info when set.
func instanceFromProto(in *pb.Instance) (providers.Instance, error) {
	st, ok := stateFromProto[in.GetState()]
	if !ok {
		return providers.Instance{}, fmt.Errorf("instance %s has invalid state %v", in.GetId(), in.GetState())
	}
	out := providers.Instance{
		ID:        in.GetId(),
		State:     st,
		Labels:    in.GetLabels(),
		CreatedAt: fromUnixNano(in.GetCreatedUnixNano()),
		Reason:    in.GetReason(),
	}
	if pci := in.GetConnectInfo(); pci != nil {
		ci := connectInfoFromProto(pci)
		out.ConnectInfo = &ci
	}
	return out, nil
}

// List implements providers.Provider.
func (c *Client) List(ctx context.Context) ([]providers.Instance, error) {
	resp, err := c.RPC.List(ctx, &pb.ListRequest{})
	if err != nil {
		err, _ = callErr(ctx, "list", err)
		return nil, err
	}
	out := make([]providers.Instance, 0, len(resp.GetInstances()))
	for _, in := range resp.GetInstances() {
		got, err := instanceFromProto(in)
		if err != nil {
			return nil, providers.Permanent(fmt.Errorf("list: %w", err))
		}
		out = append(out, got)
	}
	return out, nil
}

// ConnectInfo implements providers.Provider.
func (c *Client) ConnectInfo(ctx context.Context, id string) (providers.ConnectInfo, error) {
	resp, err := c.RPC.ConnectInfo(ctx, &pb.ConnectInfoRequest{Id: id})
	if err != nil {
		err, _ = callErr(ctx, "connect info", err)
		return providers.ConnectInfo{}, err
	}
	return connectInfoFromProto(resp), nil
}

// connectInfoFromProto converts connect info as the plugin sent it; the
// fleet validates it before use.
func connectInfoFromProto(resp *pb.ConnectInfoResponse) providers.ConnectInfo {
	return providers.ConnectInfo{
		ID:         resp.GetId(),
		Address:    resp.GetAddress(),
		Port:       int(resp.GetPort()),
		Protocol:   protocolFromProto[resp.GetProtocol()],
		OS:         resp.GetOs(),
		Arch:       resp.GetArch(),
		Username:   resp.GetUsername(),
		PrivateKey: resp.GetPrivateKey(),
		Password:   resp.GetPassword(),
		HostKey:    resp.GetHostKey(),
		TLSCert:    resp.GetTlsCert(),
	}
}

// Heartbeat implements providers.Provider.
func (c *Client) Heartbeat(ctx context.Context, id string) error {
	if _, err := c.RPC.Heartbeat(ctx, &pb.HeartbeatRequest{Id: id}); err != nil {
		err, _ = callErr(ctx, "heartbeat", err)
		return err
	}
	return nil
}

// Shutdown implements providers.Provider.
func (c *Client) Shutdown(ctx context.Context) error {
	if _, err := c.RPC.Shutdown(ctx, &pb.ShutdownRequest{}); err != nil {
		err, _ = callErr(ctx, "shutdown", err)
		return err
	}
	return nil
}

// RecoverUnary is a gRPC server interceptor that turns a panic in a plugin
// call into an error of KindUnknown instead of killing the plugin process.
func RecoverUnary(onPanic func(method string, value any, stack []byte)) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
		defer func() {
			if v := recover(); v != nil {
				if onPanic != nil {
					onPanic(info.FullMethod, v, debug.Stack())
				}
				resp, err = nil, ToStatus(fmt.Errorf("%s: %w: %v", info.FullMethod, ErrPanic, v), nil)
			}
		}()
		return handler(ctx, req)
	}
}
