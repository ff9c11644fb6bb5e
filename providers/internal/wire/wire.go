// Package wire carries the providers.Provider interface over gRPC between
// the plugin host and a plugin process: the go-plugin handshake, the plugin
// definition, and the adapters on both sides.
package wire

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	"github.com/mayfly-ci/mayfly/providers"
	pb "github.com/mayfly-ci/mayfly/providers/proto/providerv1"
)

// ProtocolVersion is the version of the plugin wire protocol. It changes
// whenever providerv1 changes incompatibly.
const ProtocolVersion = 1

// PluginName is the name under which the provider is dispensed.
const PluginName = "provider"

// ParentEnv names the environment variable in which the host passes its
// process id to a plugin, so that the plugin knows its manager even if the
// manager died before the plugin first looked (sdk.Serve exits then).
const ParentEnv = "MAYFLY_PLUGIN_PARENT"

// Handshake is the go-plugin handshake shared by host and plugins. The
// magic cookie only keeps a plugin binary from being run by hand by mistake;
// it is not a security measure.
var Handshake = plugin.HandshakeConfig{
	ProtocolVersion:  ProtocolVersion,
	MagicCookieKey:   "MAYFLY_PROVIDER_PLUGIN",
	MagicCookieValue: "9b1f4a3c-mayfly-provider-plugin",
}

// Plugin is the go-plugin definition of a provider, usable on both sides.
type Plugin struct {
	plugin.NetRPCUnsupportedPlugin
	// Impl is the served implementation (plugin side only).
	Impl providers.Provider
}

// GRPCServer registers Impl with s.
func (p *Plugin) GRPCServer(_ *plugin.GRPCBroker, s *grpc.Server) error {
	if p.Impl == nil {
		return fmt.Errorf("provider plugin: no implementation to serve")
	}
	pb.RegisterProviderServer(s, &Server{Impl: p.Impl})
	return nil
}

// GRPCClient returns a providers.Provider that calls the plugin over c.
func (p *Plugin) GRPCClient(_ context.Context, _ *plugin.GRPCBroker, c *grpc.ClientConn) (any, error) {
	return &Client{RPC: pb.NewProviderClient(c)}, nil
}

var stateToProto = map[providers.State]pb.State{
	providers.StateCreating: pb.State_STATE_CREATING,
	providers.StateRunning:  pb.State_STATE_RUNNING,
	providers.StateDeleting: pb.State_STATE_DELETING,
	providers.StateFailed:   pb.State_STATE_FAILED,
	providers.StateGone:     pb.State_STATE_GONE,
}

var protocolToProto = map[providers.Protocol]pb.Protocol{
	providers.ProtocolSSH:   pb.Protocol_PROTOCOL_SSH,
	providers.ProtocolWinRM: pb.Protocol_PROTOCOL_WINRM,
}

func reverse[K comparable, V comparable](m map[K]V) map[V]K {
	out := make(map[V]K, len(m))
	for k, v := range m {
		out[v] = k
	}
	return out
}

var (
	stateFromProto    = reverse(stateToProto)
	protocolFromProto = reverse(protocolToProto)
)

func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromUnixNano(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}
