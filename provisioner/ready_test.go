package provisioner

import (
	"context"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

func connectInfo(t *testing.T, s *sshtest.Server) providers.ConnectInfo {
	t.Helper()
	host, port, err := net.SplitHostPort(s.Addr)
	if err != nil {
		t.Fatal(err)
	}
	p, _ := strconv.Atoi(port)
	return providers.ConnectInfo{ID: "vm-1", Address: host, Port: p, Protocol: providers.ProtocolSSH, OS: "linux", Arch: "amd64",
		Username: s.User, PrivateKey: s.ClientKeyPEM, HostKey: s.HostKey}
}

// Ready runs against a real dropbear, the SSH server of the microVMs.
func TestReady(t *testing.T) {
	s := sshtest.Run(t, sshtest.Dropbear)
	good := connectInfo(t, s)
	other := sshtest.New(t, sshtest.Dropbear) // never started: only its host key is used
	tests := []struct {
		name    string
		ci      func() providers.ConnectInfo
		command string
		wantErr string
	}{
		{"connects", func() providers.ConnectInfo { return good }, "", ""},
		{"ready command passes", func() providers.ConnectInfo { return good }, "test -d /proc && echo fine", ""},
		{"ready command fails", func() providers.ConnectInfo { return good }, "echo not yet >&2; exit 4", "ready command exited 4: not yet"},
		{"no host key is refused", func() providers.ConnectInfo { ci := good; ci.HostKey = ""; return ci }, "", "no SSH host key to pin"},
		{"wrong host key is refused", func() providers.ConnectInfo { ci := good; ci.HostKey = other.HostKey; return ci }, "", "host key"},
		{"bad connect info", func() providers.ConnectInfo { ci := good; ci.Port = 0; return ci }, "", "port 0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			r := &Ready{Timeout: 5 * time.Second, Command: tt.command}
			err := r.Provision(ctx, providers.Instance{ID: "vm-1"}, tt.ci())
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("Provision: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Provision error = %v, want it to contain %q", err, tt.wantErr)
			}
		})
	}
}

// An instance that never accepts connections fails within the timeout.
func TestReadyTimesOut(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close() // nothing listens there now
	s := sshtest.New(t, sshtest.Dropbear)
	ci := providers.ConnectInfo{ID: "vm-dead", Address: "127.0.0.1", Port: port, Protocol: providers.ProtocolSSH, OS: "linux", Arch: "amd64",
		Username: "root", PrivateKey: s.ClientKeyPEM, HostKey: s.HostKey}
	err = (&Ready{Timeout: 2 * time.Second}).Provision(context.Background(), providers.Instance{ID: "vm-dead"}, ci)
	if err == nil {
		t.Fatal("Provision succeeded against a closed port")
	}
	if !strings.Contains(err.Error(), "no connection within 2s") {
		t.Errorf("error = %v, want it to say the 2s bound ran out", err)
	}
}
