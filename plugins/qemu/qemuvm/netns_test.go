package qemuvm

import (
	"crypto/rand"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// outsideHost is a host the test makes in a network namespace of its own,
// joined to this host by a veth pair, to stand for "the outside" (a
// service beyond the host) and for a link-local address (a cloud metadata
// server), so that a guest that could reach out would reach it and nothing
// else: tests send no traffic beyond the machine.
type outsideHost struct {
	ns        string
	Addr      netip.Addr // in 198.18.0.0/15 (benchmarking, never routed)
	LinkLocal netip.Addr // in 169.254.0.0/16, routed to the namespace by a /32
	listener  *listener  // on both addresses
}

// newOutsideHost makes the namespace and its listener (which answers reply),
// and removes them when the test ends. It needs root and iproute2.
func newOutsideHost(t *testing.T, reply string) *outsideHost {
	t.Helper()
	_, err := exec.LookPath("ip")
	need(t, "root and iproute2 (network namespaces)", err == nil && os.Geteuid() == 0)
	var rnd [3]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		t.Fatal(err)
	}
	suffix := fmt.Sprintf("%02x%02x%02x", rnd[0], rnd[1], rnd[2])
	o := &outsideHost{
		ns:        "mayfly-egress-" + suffix,
		Addr:      netip.AddrFrom4([4]byte{198, 18 + rnd[0]&1, rnd[1], 2}),
		LinkLocal: netip.AddrFrom4([4]byte{169, 254, 200 + rnd[0]%50, 2 + rnd[2]%250}),
	}
	hostSide, nsSide := "mfe"+suffix+"h", "mfe"+suffix+"n"
	hostAddr := netip.AddrFrom4([4]byte{198, 18 + rnd[0]&1, rnd[1], 1})
	if out, err := exec.Command("ip", "-br", "addr").Output(); err != nil || strings.Contains(string(out), o.Addr.String()) ||
		strings.Contains(string(out), hostAddr.String()+"/") {
		t.Fatalf("198.18.x.x address already in use or ip failed (%v): %s", err, out)
	}
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("netns", "add", o.ns)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", o.ns).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", o.ns, err, out)
		}
	})
	run("link", "add", hostSide, "type", "veth", "peer", "name", nsSide, "netns", o.ns)
	run("addr", "add", hostAddr.String()+"/30", "dev", hostSide)
	run("link", "set", hostSide, "up")
	run("-n", o.ns, "addr", "add", o.Addr.String()+"/30", "dev", nsSide)
	run("-n", o.ns, "addr", "add", o.LinkLocal.String()+"/32", "dev", nsSide)
	run("-n", o.ns, "link", "set", nsSide, "up")
	run("-n", o.ns, "link", "set", "lo", "up")
	run("route", "add", o.LinkLocal.String()+"/32", "dev", hostSide)

	l, err := listenInNetns(o.ns, "tcp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	o.listener = serve(t, l, reply)
	return o
}

// Port is the port of the outside host's listener.
func (o *outsideHost) Port() int { return o.listener.port() }

// listenInNetns opens a listener inside the named network namespace (the
// socket stays in the namespace it was made in), on a thread of its own
// that dies with its goroutine if it cannot return to the host's namespace.
func listenInNetns(ns, network, addr string) (net.Listener, error) {
	type result struct {
		l   net.Listener
		err error
	}
	ch := make(chan result, 1)
	go func() { // ends at once: one listen
		runtime.LockOSThread()
		self, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			ch <- result{err: err}
			return
		}
		defer self.Close()
		target, err := os.Open("/run/netns/" + ns)
		if err != nil {
			ch <- result{err: err}
			runtime.UnlockOSThread()
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- result{err: fmt.Errorf("setns %s: %w", ns, err)}
			return // still locked: the thread's namespace is not trusted
		}
		l, err := net.Listen(network, addr)
		restored := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET) == nil
		ch <- result{l, err}
		if restored {
			runtime.UnlockOSThread()
		}
	}()
	r := <-ch
	return r.l, r.err
}
