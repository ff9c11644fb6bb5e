package sshexec_test

import (
	"bufio"
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

// echoOnce answers each connection on ln with "got <line>".
func echoOnce(t *testing.T, ln net.Listener) {
	t.Cleanup(func() { ln.Close() })
	go func() { // ends when ln is closed at cleanup
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				line, _ := bufio.NewReader(c).ReadString('\n')
				_, _ = c.Write([]byte("got " + line))
			}()
		}
	}()
}

func roundTrip(t *testing.T, c net.Conn) string {
	t.Helper()
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("ping\n")); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	return line
}

// TestDialContext opens connections from the machine: to a Unix socket
// through OpenSSH's direct-streamlocal (how the manager reaches a VM's
// Docker Engine) and to a TCP port through direct-tcpip (how it waits for
// services' ports); dropbear, which has no streamlocal, gives an error.
func TestDialContext(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "echo.sock")
	uln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	echoOnce(t, uln)
	tln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	echoOnce(t, tln)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	c := dial(t, sshtest.Run(t, sshtest.OpenSSH), nil)
	for _, tc := range []struct{ network, addr string }{{"unix", sock}, {"tcp", tln.Addr().String()}} {
		conn, err := c.DialContext(ctx, tc.network, tc.addr)
		if err != nil {
			t.Fatalf("dial %s %s: %v", tc.network, tc.addr, err)
		}
		if got := roundTrip(t, conn); got != "got ping\n" {
			t.Errorf("%s: read %q", tc.network, got)
		}
	}
	if _, err := c.DialContext(ctx, "unix", filepath.Join(t.TempDir(), "absent.sock")); err == nil {
		t.Error("dialling a socket that does not exist succeeded")
	}
	if _, err := c.DialContext(ctx, "udp", "127.0.0.1:53"); err == nil || !strings.Contains(err.Error(), "want tcp or unix") {
		t.Errorf("udp: %v, want an error naming the networks", err)
	}

	db := dial(t, sshtest.Run(t, sshtest.Dropbear), nil)
	if _, err := db.DialContext(ctx, "unix", sock); err == nil {
		t.Error("dropbear forwarded a Unix socket; it has no direct-streamlocal")
	} else if !strings.Contains(err.Error(), sock) {
		t.Errorf("the error does not name the socket: %v", err)
	}
}
