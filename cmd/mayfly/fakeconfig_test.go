package main

import (
	"fmt"
	"net"

	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

// fakePluginConfig is the [runners.autoscaler.plugin_config] of a runner
// on the fake provider whose every instance is the SSH server s: boots of
// 100ms, state kept in stateDir, each instance's connect info pointing at
// s with its host key and client key.
func fakePluginConfig(stateDir string, s *sshtest.Server) string {
	host, port, _ := net.SplitHostPort(s.Addr)
	return fmt.Sprintf(`    [runners.autoscaler.plugin_config]
      state_dir = %q
      boot_delay = "100ms"
      [runners.autoscaler.plugin_config.connect]
        address = %q
        port = %s
        username = %q
        host_key = %q
        private_key = '''
%s'''
`, stateDir, host, port, s.User, s.HostKey, s.ClientKeyPEM)
}
