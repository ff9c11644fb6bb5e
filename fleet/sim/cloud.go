package sim

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/fleet"
	"github.com/mayfly-ci/mayfly/providers"
)

// How the simulated provider tells the fleet to reach an instance
// (Provider.Connect).
const (
	// ConnectOnCreate: Create returns each instance with its connect info
	// (providers.Launcher); the fleet's provisioner waits for the boot,
	// and no list or ConnectInfo call is needed to make it ready.
	ConnectOnCreate = "create"
	// ConnectInList: the list carries connect info for running instances;
	// a list must show an instance running before it is ready.
	ConnectInList = "list"
	// ConnectByCall: one ConnectInfo call per instance once a list shows
	// it running, as the plugins over the wire protocol do today.
	ConnectByCall = "call"
)

// simCloud is the simulated provider the runtime fleet talks to: a
// providers.Provider on the simulation's clock whose instances are the
// world's VMs. Its methods run in the fleet's goroutines; mu guards the
// world while they do (the driver touches the world only while the fleet
// is settled).
type simCloud struct {
	w      *world
	mode   string
	labels map[string]string

	mu    sync.Mutex
	vms   map[string]*vm
	calls map[string]int
}

var (
	_ providers.Provider = (*simCloud)(nil)
	_ providers.Launcher = launchingCloud{}
)

// launchingCloud is simCloud as a providers.Launcher (ConnectOnCreate).
type launchingCloud struct{ *simCloud }

// provider returns the providers.Provider the fleet is given.
func (c *simCloud) provider() providers.Provider {
	if c.mode == ConnectOnCreate {
		return launchingCloud{c}
	}
	return c
}

func newSimCloud(w *world, mode string) *simCloud {
	return &simCloud{w: w, mode: mode, vms: map[string]*vm{}, calls: map[string]int{}}
}

func (c *simCloud) count(call string) {
	c.calls[call]++
	c.w.cloud.calls++
}

// Init implements providers.Provider.
func (c *simCloud) Init(context.Context, json.RawMessage) (providers.Info, error) {
	return providers.Info{ID: "sim", Version: "sim"}, nil
}

// Create implements providers.Provider: each instance's boot time and
// fate are drawn now.
func (c *simCloud) Create(_ context.Context, n int, labels map[string]string) ([]string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.count(fleet.OpCreate)
	vs := c.w.launch(n)
	ids := make([]string, len(vs))
	for i, v := range vs {
		v.name = "sim-" + strconv.Itoa(v.id)
		v.labels = maps.Clone(labels)
		c.vms[v.name] = v
		ids[i] = v.name
	}
	return ids, nil
}

// Launch implements providers.Launcher.
func (c launchingCloud) Launch(ctx context.Context, n int, labels map[string]string) ([]providers.Instance, error) {
	ids, err := c.Create(ctx, n, labels)
	out := make([]providers.Instance, len(ids))
	for i, id := range ids {
		ci := connectInfo(id)
		out[i] = providers.Instance{ID: id, State: providers.StateCreating, Labels: labels, CreatedAt: c.w.now, ConnectInfo: &ci}
	}
	return out, err
}

// Delete implements providers.Provider: the VM is billed for the
// provider's DeleteTime more.
func (c *simCloud) Delete(_ context.Context, ids []string) ([]string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.count(fleet.OpDelete)
	var vs []*vm
	for _, id := range ids {
		if v := c.vms[id]; v != nil && v.state != vmDeleting && v.state != vmGone {
			vs = append(vs, v)
		} else if v != nil && v.state == vmDeleting && !v.deleteCalled {
			vs = append(vs, v) // released by its job, deletion called now
		}
	}
	c.w.removeCalled(vs)
	return ids, nil
}

// List implements providers.Provider.
func (c *simCloud) List(context.Context) ([]providers.Instance, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.count(fleet.OpList)
	now := c.w.now
	out := make([]providers.Instance, 0, len(c.vms))
	for id, v := range c.vms {
		pi := providers.Instance{ID: id, Labels: v.labels, CreatedAt: v.createdAt}
		switch {
		case v.state == vmGone:
			delete(c.vms, id)
			continue
		case v.deleteCalled:
			pi.State = providers.StateDeleting
		case now.Before(v.bootEnd):
			pi.State = providers.StateCreating
		case v.failBoot:
			pi.State = providers.StateFailed
			pi.Reason = "boot failed"
		default:
			pi.State = providers.StateRunning
			if c.mode == ConnectInList {
				ci := connectInfo(id)
				pi.ConnectInfo = &ci
			}
		}
		out = append(out, pi)
	}
	slices.SortFunc(out, func(a, b providers.Instance) int { return cmpID(a.ID, b.ID) })
	return out, nil
}

// ConnectInfo implements providers.Provider.
func (c *simCloud) ConnectInfo(_ context.Context, id string) (providers.ConnectInfo, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.count(fleet.OpConnectInfo)
	if c.vms[id] == nil {
		return providers.ConnectInfo{}, providers.NotFound(id)
	}
	return connectInfo(id), nil
}

// Heartbeat implements providers.Provider.
func (c *simCloud) Heartbeat(context.Context, string) error { return nil }

// Shutdown implements providers.Provider.
func (c *simCloud) Shutdown(context.Context) error { return nil }

// Provision is the fleet's Provisioner: it waits, on the fleet's clock,
// until the VM has booted (as a provisioner waits for SSH), and then the
// VM is ready. A VM whose boot fails never answers: the wait lasts until
// the fleet gives up on it (a list shows it failed, or the boot watchdog).
func (c *simCloud) Provision(ctx context.Context, inst providers.Instance, _ providers.ConnectInfo) error {
	c.mu.Lock()
	v := c.vms[inst.ID]
	c.mu.Unlock()
	if v == nil {
		return fmt.Errorf("instance %s: not found", inst.ID)
	}
	for {
		c.mu.Lock()
		now, bootEnd, failed := c.w.now, v.bootEnd, v.failBoot
		c.mu.Unlock()
		if !now.Before(bootEnd) && !failed {
			break
		}
		d := bootEnd.Sub(now)
		if !now.Before(bootEnd) {
			d = time.Hour // never answers
		}
		if err := fleet.Sleep(ctx, d); err != nil {
			return err
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if v.state == vmCreating {
		c.w.ready(v)
	}
	return nil
}

// connectInfo is a valid connect info for a simulated instance.
func connectInfo(id string) providers.ConnectInfo {
	return providers.ConnectInfo{ID: id, Address: "192.0.2.1", Port: 22, Protocol: providers.ProtocolSSH, OS: "linux", Arch: "amd64", Username: "sim", Password: "sim", HostKey: simHostKey}
}

// simHostKey is a fixed SSH host key, so that connect infos validate.
var simHostKey = func() string {
	pub, err := ssh.NewPublicKey(ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize)).Public())
	if err != nil {
		panic(err)
	}
	return string(ssh.MarshalAuthorizedKey(pub))
}()

// cmpID orders "sim-N" ids by N.
func cmpID(a, b string) int {
	if len(a) != len(b) {
		return len(a) - len(b)
	}
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
