// Package providers defines the interface between the fleet and the code
// that creates and deletes instances (VMs) in a cloud or on a host.
//
// Provider implementations live in plugin processes (see providers/sdk and
// providers/host); the fleet only sees this interface. Errors returned by a
// Provider are classified with the helpers in errors.go, and that
// classification survives the process boundary.
package providers

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"maps"
	"net/netip"
	"regexp"
	"time"

	"golang.org/x/crypto/ssh"
)

// Label keys that carry the identity of the manager that made an instance.
const (
	// LabelManager holds the id of the runner manager that owns the instance.
	LabelManager = "mayfly-manager"
	// LabelRunner holds the name of the [[runners]] entry the instance serves.
	LabelRunner = "mayfly-runner"
)

// Provider creates, lists and deletes the instances of one group.
//
// All methods must be safe for concurrent use. Creation and deletion may be
// asynchronous: List is the source of truth for what exists.
type Provider interface {
	// Init configures the provider from its settings (a JSON object) and
	// reports who it is. It is called once, before any other method.
	Init(ctx context.Context, settings json.RawMessage) (Info, error)
	// Create requests n new instances carrying labels and returns their ids.
	// On partial failure it returns the ids it did create together with the
	// error.
	Create(ctx context.Context, n int, labels map[string]string) ([]string, error)
	// Delete requests deletion of ids and returns those whose deletion is
	// confirmed or already done. Deleting an unknown id succeeds.
	Delete(ctx context.Context, ids []string) ([]string, error)
	// List reports every instance of the group with its state.
	List(ctx context.Context) ([]Instance, error)
	// ConnectInfo tells how to reach and log in to instance id.
	ConnectInfo(ctx context.Context, id string) (ConnectInfo, error)
	// Heartbeat returns nil when instance id is healthy.
	Heartbeat(ctx context.Context, id string) error
	// Shutdown releases the provider's resources. Instances are left alone.
	Shutdown(ctx context.Context) error
}

// Info identifies a provider after Init.
type Info struct {
	// ID names the group, e.g. "gce/us-east1/mayfly-linux".
	ID string
	// MaxSize is the largest number of instances the group may hold; 0 means
	// no limit of the provider's own.
	MaxSize int
	// Version is the plugin's version string.
	Version string
}

// State is the lifecycle state of an instance as the provider sees it.
type State string

// Instance states.
const (
	StateCreating State = "creating"
	StateRunning  State = "running"
	StateDeleting State = "deleting"
	StateFailed   State = "failed"
	StateGone     State = "gone"
)

// Valid reports whether s is one of the defined states.
func (s State) Valid() bool {
	switch s {
	case StateCreating, StateRunning, StateDeleting, StateFailed, StateGone:
		return true
	}
	return false
}

// Instance is one instance reported by List.
type Instance struct {
	ID        string
	State     State
	Labels    map[string]string
	CreatedAt time.Time
	// Reason explains the state when useful, e.g. "preempted".
	Reason string
	// ConnectInfo, set by a provider whose list can tell how to reach the
	// instance, saves the fleet one ConnectInfo call per instance; nil:
	// ask ConnectInfo once the instance runs. When set it is complete
	// (Validate passes) and final; it may come while the instance is
	// still creating, and the fleet then waits for SSH or WinRM at once.
	// The plugin protocol carries it (Instance.connect_info).
	ConnectInfo *ConnectInfo
}

// Launcher is implemented by providers that know how to reach an instance
// as soon as they create it. Launch is Create returning each new instance
// with its ConnectInfo: the fleet then waits for SSH or WinRM at once and
// needs neither a list nor a ConnectInfo call to make it ready. On partial
// failure it returns the instances it did create with the error. A
// plugin's provider that implements it is called for the protocol's
// Create, whose answer then carries the connect info.
type Launcher interface {
	Launch(ctx context.Context, n int, labels map[string]string) ([]Instance, error)
}

// IDs returns the ids of instances, nil for none.
func IDs(instances []Instance) []string {
	if len(instances) == 0 {
		return nil
	}
	ids := make([]string, len(instances))
	for i, in := range instances {
		ids[i] = in.ID
	}
	return ids
}

// InstancesOf returns instances that carry only the given ids (nil for
// none): what a Create that is no Launcher tells of what it made.
func InstancesOf(ids []string) []Instance {
	if len(ids) == 0 {
		return nil
	}
	out := make([]Instance, len(ids))
	for i, id := range ids {
		out[i] = Instance{ID: id}
	}
	return out
}

// HasLabels reports whether the instance carries every label in want.
func (i Instance) HasLabels(want map[string]string) bool {
	for k, v := range want {
		if got, ok := i.Labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// Clone returns a copy of i that shares no maps with it.
func (i Instance) Clone() Instance {
	i.Labels = maps.Clone(i.Labels)
	return i
}

// Protocol is the protocol used to run jobs on an instance.
type Protocol string

// Protocols.
const (
	ProtocolSSH   Protocol = "ssh"
	ProtocolWinRM Protocol = "winrm"
)

// ConnectInfo tells how to reach and log in to an instance.
type ConnectInfo struct {
	ID       string
	Address  string // host name or IP address
	Port     int
	Protocol Protocol
	OS       string // GOOS spelling: "linux", "windows"
	Arch     string // GOARCH spelling: "amd64", "arm64"
	Username string
	// PrivateKey is the PEM-encoded SSH private key to log in with.
	PrivateKey []byte
	// Password is used by WinRM (and by SSH when there is no key).
	Password string
	// HostKey is the pinned SSH host public key in authorized_keys format.
	HostKey string
	// TLSCert is the PEM-encoded certificate of a WinRM HTTPS endpoint.
	TLSCert []byte
}

// Validate reports the first missing or malformed field of c.
func (c ConnectInfo) Validate() error {
	switch {
	case c.Address == "":
		return fmt.Errorf("connect info %s: address is empty", c.ID)
	case checkAddress(c.Address) != nil:
		return fmt.Errorf("connect info %s: address %q: %w", c.ID, c.Address, checkAddress(c.Address))
	case c.Port < 1 || c.Port > 65535:
		return fmt.Errorf("connect info %s: port %d out of range 1-65535", c.ID, c.Port)
	case c.Username == "":
		return fmt.Errorf("connect info %s: username is empty", c.ID)
	case c.OS == "":
		return fmt.Errorf("connect info %s: os is empty", c.ID)
	case c.Arch == "":
		return fmt.Errorf("connect info %s: arch is empty", c.ID)
	}
	switch c.Protocol {
	case ProtocolSSH:
		if len(c.PrivateKey) == 0 && c.Password == "" {
			return fmt.Errorf("connect info %s: ssh needs private_key or password", c.ID)
		}
	case ProtocolWinRM:
		if c.Password == "" {
			return fmt.Errorf("connect info %s: winrm needs password", c.ID)
		}
	default:
		return fmt.Errorf("connect info %s: protocol %q is not %q or %q", c.ID, c.Protocol, ProtocolSSH, ProtocolWinRM)
	}
	if len(c.PrivateKey) > 0 {
		if _, err := ssh.ParsePrivateKey(c.PrivateKey); err != nil {
			return fmt.Errorf("connect info %s: private_key: %w", c.ID, err)
		}
	}
	if c.HostKey != "" {
		if _, _, _, _, err := ssh.ParseAuthorizedKey([]byte(c.HostKey)); err != nil {
			return fmt.Errorf("connect info %s: host_key: %w", c.ID, err)
		}
	}
	if len(c.TLSCert) > 0 {
		block, _ := pem.Decode(c.TLSCert)
		if block == nil || block.Type != "CERTIFICATE" {
			return fmt.Errorf("connect info %s: tls_cert: no PEM CERTIFICATE block", c.ID)
		}
		if _, err := x509.ParseCertificate(block.Bytes); err != nil {
			return fmt.Errorf("connect info %s: tls_cert: %w", c.ID, err)
		}
	}
	return nil
}

// hostNameRE is a DNS host name: dot-separated labels of letters, digits
// and inner hyphens, at most 63 characters each.
var hostNameRE = regexp.MustCompile(`^(?i:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:\.(?i:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?))*\.?$`)

// checkAddress refuses an instance address no provider may return: one
// that is neither an IP address nor a host name, or an IP address no
// instance can have (unspecified, multicast, broadcast) or that belongs
// to the host's link (link-local: 169.254.0.0/16, where clouds serve
// their metadata and credentials, and fe80::/10). A plugin's answers are
// input too: the manager must not be pointed there.
func checkAddress(a string) error {
	ip, err := netip.ParseAddr(a)
	if err != nil {
		if len(a) > 253 || !hostNameRE.MatchString(a) {
			return fmt.Errorf("neither an IP address nor a host name")
		}
		return nil
	}
	ip = ip.Unmap()
	switch {
	case ip.Zone() != "":
		return fmt.Errorf("an IP address with a zone")
	case ip.IsUnspecified():
		return fmt.Errorf("the unspecified address")
	case ip.IsMulticast():
		return fmt.Errorf("a multicast address")
	case ip == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return fmt.Errorf("the broadcast address")
	case ip.IsLinkLocalUnicast():
		return fmt.Errorf("a link-local address (where clouds serve instance metadata), never an instance's")
	}
	return nil
}
