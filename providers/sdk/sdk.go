// Package sdk serves a providers.Provider as a mayfly plugin process.
//
// A plugin's main is a few lines (plugins/NAME/cmd/mayfly-plugin-NAME):
//
//	func main() {
//		sdk.Serve(example.New(example.Options{Logger: sdk.Logger()}))
//	}
//
// providers/README.md walks through writing a plugin for a new cloud.
// Plugins import only package providers and its subpackages (this one,
// pluginkit), never the fleet or the manager. The plugin must not write to
// stdout: go-plugin uses it for its handshake.
package sdk

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/internal/wire"
)

// stderr is the process's original standard error. go-plugin replaces
// os.Stderr while serving; the host reads structured logs from the original.
var stderr io.Writer = os.Stderr

var (
	loggerOnce sync.Once
	logger     *slog.Logger
)

// Logger returns a logger whose records reach the host's log with their
// level and attributes, tagged with the plugin's name.
func Logger() *slog.Logger {
	loggerOnce.Do(func() {
		logger = slog.New(NewLogHandler(stderr, slog.LevelDebug))
	})
	return logger
}

// NewLogHandler returns a slog.Handler writing JSON lines in the format the
// go-plugin host parses (hclog's @level, @message, @timestamp).
func NewLogHandler(w io.Writer, level slog.Leveler) slog.Handler {
	return slog.NewJSONHandler(w, &slog.HandlerOptions{
		Level: level,
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			a = providers.RedactAttr(groups, a)
			if len(groups) > 0 {
				return a
			}
			switch a.Key {
			case slog.TimeKey:
				return slog.String("@timestamp", a.Value.Time().Format("2006-01-02T15:04:05.000000Z07:00"))
			case slog.LevelKey:
				return slog.String("@level", hclogLevel(a.Value.Any().(slog.Level)))
			case slog.MessageKey:
				return slog.String("@message", a.Value.String())
			}
			return a
		},
	})
}

func hclogLevel(l slog.Level) string {
	switch {
	case l < slog.LevelDebug:
		return "trace"
	case l < slog.LevelInfo:
		return "debug"
	case l < slog.LevelWarn:
		return "info"
	case l < slog.LevelError:
		return "warn"
	}
	return "error"
}

// Serve serves impl to the mayfly host and returns when the host ends the
// plugin. When impl is also a providers.Launcher, its Launch answers the
// host's Create calls, with each instance's connect info. It exits the process with a message when the binary is started
// by hand instead of by the host.
func Serve(impl providers.Provider) {
	if impl == nil {
		fmt.Fprintln(stderr, "sdk.Serve: nil provider")
		os.Exit(1)
	}
	if os.Getenv(wire.Handshake.MagicCookieKey) != wire.Handshake.MagicCookieValue {
		fmt.Fprintf(stderr, "This binary is a mayfly provider plugin (protocol %d); it is started by mayfly, not by hand.\n",
			wire.ProtocolVersion)
		os.Exit(1)
	}
	log := Logger()
	stopWatch := make(chan struct{})
	defer close(stopWatch)
	go watchParent(parentPID(), time.Second, stopWatch, func() {
		log.Error("the mayfly manager that started this plugin is gone; exiting")
		os.Exit(1)
	})
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: wire.Handshake,
		Plugins:         plugin.PluginSet{wire.PluginName: &wire.Plugin{Impl: impl}},
		GRPCServer: func(opts []grpc.ServerOption) *grpc.Server {
			opts = append(opts, grpc.ChainUnaryInterceptor(wire.RecoverUnary(func(method string, v any, stack []byte) {
				log.Error("panic in plugin call", "method", method, "panic", fmt.Sprint(v),
					"stack", strings.TrimSpace(string(stack)))
			})))
			return grpc.NewServer(opts...)
		},
		Logger: hclog.New(&hclog.LoggerOptions{
			Name:       "go-plugin",
			Level:      hclog.Info,
			Output:     stderr,
			JSONFormat: true,
		}),
	})
}

// parentPID is the manager's process id: wire.ParentEnv, or the parent's.
func parentPID() int {
	if pid, err := strconv.Atoi(os.Getenv(wire.ParentEnv)); err == nil && pid > 0 {
		return pid
	}
	return os.Getppid()
}

// watchParent calls gone when the process's parent is not parent (the
// manager died and the plugin was re-parented), checking at once and then
// every interval until stop is closed. A plugin never outlives its
// manager: a restarted manager starts its own plugin, whose list finds what
// this one made.
func watchParent(parent int, every time.Duration, stop <-chan struct{}, gone func()) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if os.Getppid() != parent {
			gone()
			return
		}
		select {
		case <-stop:
			return
		case <-t.C:
		}
	}
}
