package provisioner

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
)

// Ready makes a running instance ready for a job: it waits until the
// instance accepts a connection (its host key or certificate pinned) and
// runs the instance-ready command there. It implements the fleet's
// Attacher: the connection it verified stays open while the instance waits,
// warm for the job that takes it.
type Ready struct {
	// Timeout bounds waiting for the instance to accept a connection.
	Timeout time.Duration
	// Command, when set, must exit 0 on the instance (instance_ready_command).
	Command string
	// Shell runs Command; empty is the transport's default.
	Shell  string
	Logger *slog.Logger
}

// Provision implements fleet.Provisioner: ProvisionAttach, with the
// connection closed at once.
func (r *Ready) Provision(ctx context.Context, inst providers.Instance, ci providers.ConnectInfo) error {
	exec, err := r.ProvisionAttach(ctx, inst, ci)
	if err != nil {
		return err
	}
	return exec.Close()
}

// ProvisionAttach implements fleet.Attacher: it returns the verified
// connection (a vmexec.Executor), for the job that takes the instance.
func (r *Ready) ProvisionAttach(ctx context.Context, inst providers.Instance, ci providers.ConnectInfo) (io.Closer, error) {
	log := r.Logger
	if log == nil {
		log = slog.Default()
	}
	start := time.Now()
	exec, err := Connect(ctx, ci, r.Timeout, log)
	if err != nil {
		return nil, err
	}
	if r.Command != "" {
		var out bytes.Buffer
		code, err := exec.Run(ctx, vmexecCommand(r.Command, r.Shell, &out))
		if err != nil {
			exec.Close()
			return nil, fmt.Errorf("instance %s: ready command: %w", inst.ID, err)
		}
		if code != 0 {
			exec.Close()
			return nil, fmt.Errorf("instance %s: ready command exited %d: %s", inst.ID, code, tail(out.Bytes(), 512))
		}
	}
	if p, ok := exec.(shellPrestarter); ok && ci.OS != "windows" {
		// The job's stages run detached under sh: the session of its
		// first stage is opened now, while the instance waits.
		p.PrestartShell("sh")
	}
	log.Info("instance ready", "instance", inst.ID, "connect_and_ready", time.Since(start).Round(time.Millisecond))
	return exec, nil
}

// shellPrestarter is a connection that can start a shell ahead of need
// (sshexec.Client).
type shellPrestarter interface {
	PrestartShell(shell string)
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(bytes.TrimSpace(b))
}
