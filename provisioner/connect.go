// Package provisioner turns a created instance into a ready one: it connects
// to it with the credentials and pinned host key its provider reports, waits
// until it accepts connections, and runs the instance-ready command. The
// microVM image builder lives in provisioner/image.
package provisioner

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/vmexec"
	"github.com/mayfly-ci/mayfly/vmexec/sshexec"
	"github.com/mayfly-ci/mayfly/vmexec/winrm"
)

// Connect opens an executor on the instance described by ci, retrying for up
// to timeout while it boots. SSH host keys and WinRM certificates are pinned
// to what the provider reported; an instance without one is refused.
func Connect(ctx context.Context, ci providers.ConnectInfo, timeout time.Duration, log *slog.Logger) (vmexec.Executor, error) {
	if err := ci.Validate(); err != nil {
		return nil, err
	}
	addr := net.JoinHostPort(ci.Address, strconv.Itoa(ci.Port))
	switch ci.Protocol {
	case providers.ProtocolSSH:
		if ci.HostKey == "" {
			return nil, fmt.Errorf("connect %s: the provider reported no SSH host key to pin; mayfly does not trust on first use", ci.ID)
		}
		c, err := sshexec.Dial(ctx, sshexec.Target{
			Addr:           addr,
			User:           ci.Username,
			PrivateKey:     ci.PrivateKey,
			HostKey:        ci.HostKey,
			ConnectTimeout: timeout,
			Logger:         log,
		})
		if err != nil {
			return nil, fmt.Errorf("connect %s over ssh: %w", ci.ID, err)
		}
		return c, nil
	case providers.ProtocolWinRM:
		// WinRM always runs over HTTPS with the provider's certificate
		// pinned: without one, the password would cross the network in
		// cleartext (HTTP) or go to whoever answers first (unpinned TLS
		// against a self-signed certificate).
		if len(ci.TLSCert) == 0 {
			return nil, fmt.Errorf("connect %s: the provider reported no WinRM certificate to pin; mayfly does not trust on first use", ci.ID)
		}
		c, err := winrm.Dial(ctx, winrm.Target{
			Addr:           ci.Address,
			Port:           ci.Port,
			HTTPS:          true,
			Username:       ci.Username,
			Password:       ci.Password,
			ServerCertPEM:  ci.TLSCert,
			ConnectTimeout: timeout,
			Logger:         log,
		})
		if err != nil {
			return nil, fmt.Errorf("connect %s over winrm: %w", ci.ID, err)
		}
		return c, nil
	}
	return nil, fmt.Errorf("connect %s: unknown protocol %q", ci.ID, ci.Protocol)
}

func vmexecCommand(script, shell string, out *bytes.Buffer) vmexec.Command {
	return vmexec.Command{Script: script, Shell: shell, Stdout: out, Stderr: out}
}
