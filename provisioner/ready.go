package provisioner

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
)

// Ready makes a running instance ready for a job: it waits until the
// instance accepts a connection and runs the instance-ready command there.
// It implements the fleet's Provisioner.
type Ready struct {
	// Timeout bounds waiting for the instance to accept a connection.
	Timeout time.Duration
	// Command, when set, must exit 0 on the instance (instance_ready_command).
	Command string
	// Shell runs Command; empty is the transport's default.
	Shell  string
	Logger *slog.Logger
}

// Provision implements fleet.Provisioner.
func (r *Ready) Provision(ctx context.Context, inst providers.Instance, ci providers.ConnectInfo) error {
	log := r.Logger
	if log == nil {
		log = slog.Default()
	}
	start := time.Now()
	exec, err := Connect(ctx, ci, r.Timeout, log)
	if err != nil {
		return err
	}
	defer exec.Close()
	if r.Command != "" {
		var out bytes.Buffer
		code, err := exec.Run(ctx, vmexecCommand(r.Command, r.Shell, &out))
		if err != nil {
			return fmt.Errorf("instance %s: ready command: %w", inst.ID, err)
		}
		if code != 0 {
			return fmt.Errorf("instance %s: ready command exited %d: %s", inst.ID, code, tail(out.Bytes(), 512))
		}
	}
	log.Info("instance ready", "instance", inst.ID, "connect_and_ready", time.Since(start).Round(time.Millisecond))
	return nil
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(bytes.TrimSpace(b))
}
