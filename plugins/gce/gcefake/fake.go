// Package gcefake is an in-memory Google Compute Engine API server for
// tests: an http.Handler that speaks the compute v1 REST JSON of the calls
// the gce plugin makes, so the official Go SDK talks to it over HTTP
// unchanged (nothing in the SDK is mocked).
//
// It serves, under /compute/v1/projects/{project}/:
//
//	POST   zones/{z}/instances                       instances.insert
//	GET    zones/{z}/instances                       instances.list
//	GET    aggregated/instances                      instances.aggregatedList
//	GET    zones/{z}/instances/{n}                   instances.get
//	DELETE zones/{z}/instances/{n}                   instances.delete
//	POST   zones/{z}/instances/{n}/setMetadata       instances.setMetadata
//	GET    zones/{z}/instances/{n}/serialPort        instances.getSerialPortOutput
//	GET    zones/{z}/instances/{n}/getGuestAttributes instances.getGuestAttributes
//	GET    zones/{z}/operations/{op}                 zoneOperations.get
//	POST   zones/{z}/operations/{op}/wait            zoneOperations.wait
//
// Lists honour filter (the AIP-160 subset: labels.KEY:*, FIELD = value,
// FIELD != value, parenthesised terms ANDed), maxResults and pageToken.
// Errors use Google's JSON error format, failed operations carry
// error.errors[].code (ZONE_RESOURCE_POOL_EXHAUSTED, QUOTA_EXCEEDED, ...).
//
// Instances move PROVISIONING → STAGING → RUNNING after BootDelay and
// STOPPING → gone after DeleteDelay. A scripted guest agent publishes SSH
// host keys in guest attributes (hostkeys/) when metadata
// enable-guest-attributes is TRUE, and on Windows images answers
// windows-keys metadata entries (at boot and on setMetadata) by writing the
// RSA-OAEP encrypted password of the user as a JSON line to serial port 4,
// as the real agent does. Windows instances play mayfly's startup script
// by publishing Options.WindowsCertPEM in guest attribute
// mayfly/winrm-cert.
//
// Faults are scriptable: HTTP errors per method and zone (429, 403
// rateLimitExceeded / quotaExceeded, 5xx), zone capacity exhaustion,
// regional instance quota, unreachable zones in aggregated lists,
// preemption, slow operations.
package gcefake

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"cloud.google.com/go/compute/apiv1/computepb"
	"google.golang.org/protobuf/proto"
)

// Options configure a Server. The zero value serves instant operations.
type Options struct {
	// Project, if set, is the only project served; others get 404.
	Project string
	// BootDelay is the time from insert to RUNNING (STAGING half way).
	BootDelay time.Duration
	// DeleteDelay is how long a deleted instance stays STOPPING.
	DeleteDelay time.Duration
	// OperationDelay is how long operations stay RUNNING.
	OperationDelay time.Duration
	// MaxWait bounds one zoneOperations.wait (default 2m, as GCE).
	MaxWait time.Duration
	// AgentDelay is how long the guest agent takes to publish host keys or
	// answer a windows-keys entry once the instance runs.
	AgentDelay time.Duration

	// Address, if set, is every instance's internal and external IP address
	// instead of a made-up one: tests point the instances at a local server
	// playing them (e.g. "127.0.0.1").
	Address string
	// WindowsPassword, if set, is the password the Windows guest agent sets
	// (and encrypts to serial port 4) instead of a random one: the password
	// the local WinRM server playing the instances accepts.
	WindowsPassword string
	// WindowsCertPEM, if set, is the WinRM certificate (PEM) that Windows
	// instances publish in guest attribute mayfly/winrm-cert AgentDelay
	// after boot, playing mayfly's startup script: only instances with
	// enable-guest-attributes TRUE whose windows-startup-script-ps1 writes
	// that attribute do. Tests give the certificate of the local WinRM
	// server playing the instances.
	WindowsCertPEM []byte
}

// Fault makes requests fail with an HTTP error.
type Fault struct {
	// Method is the API method, e.g. "instances.insert" (see the package
	// doc); "" matches every method.
	Method string
	// Zone limits the fault to one zone; "" matches any.
	Zone string
	// Status is the HTTP status (e.g. 429, 403, 503).
	Status int
	// Reason is errors[0].reason (e.g. rateLimitExceeded, quotaExceeded).
	Reason string
	// Message is the error message (a default is made from Reason).
	Message string
	// RetryAfter, if set, is sent as the Retry-After header.
	RetryAfter string
	// Times is how many requests fail (default 1; negative: all).
	Times int
}

// OpFault makes insert operations fail with an operation error.
type OpFault struct {
	// Zone limits the fault to one zone; "" matches any.
	Zone string
	// Code is error.errors[0].code, e.g. ZONE_RESOURCE_POOL_EXHAUSTED.
	Code string
	// Message is the error message (a default is made from Code).
	Message string
	// HTTPStatus is httpErrorStatusCode (default from Code).
	HTTPStatus int
	// Times is how many inserts fail (default 1; negative: all).
	Times int
}

// Operation error codes the fake knows defaults for.
const (
	CodeZoneExhausted = "ZONE_RESOURCE_POOL_EXHAUSTED"
	CodeQuotaExceeded = "QUOTA_EXCEEDED"
)

// Request is one request the server received.
type Request struct {
	Time   time.Time
	Method string // API method, e.g. instances.insert
	Zone   string
	Status int // HTTP status answered
}

// Server is the fake API. It implements http.Handler.
type Server struct {
	opts Options

	mu          sync.Mutex
	instances   map[string]*instance // key zone/name
	ops         map[string]*operation
	faults      []*Fault
	opFaults    []*OpFault
	quota       map[string]int // region → max instances
	unreachable map[string]bool
	requests    []Request
	opSeq       uint64
	ipSeq       uint32
}

type instance struct {
	res       *computepb.Instance
	zone      string
	created   time.Time
	bootAt    time.Time
	runningAt time.Time // zero until RUNNING
	deleteAt  time.Time // zero unless STOPPING for deletion
	windows   bool
	serial    map[int32][]byte
	attrs     map[string]string // "namespace/key" → value
	agentDue  []agentTask
	answered  map[string]bool // windows-keys entries handled
	passwords map[string]string
	hostKeys  map[string]string // key type → authorized_keys line
}

type agentTask struct {
	at  time.Time
	run func(*instance)
}

type operation struct {
	res    *computepb.Operation
	zone   string
	doneAt time.Time
	err    *computepb.Error
	status int32
	msg    string
}

// New returns a fake with no instances.
func New(opts Options) *Server {
	if opts.MaxWait <= 0 {
		opts.MaxWait = 2 * time.Minute
	}
	return &Server{
		opts:        opts,
		instances:   map[string]*instance{},
		ops:         map[string]*operation{},
		quota:       map[string]int{},
		unreachable: map[string]bool{},
	}
}

// FailNext arms an HTTP fault.
func (s *Server) FailNext(f Fault) {
	if f.Times == 0 {
		f.Times = 1
	}
	s.mu.Lock()
	s.faults = append(s.faults, &f)
	s.mu.Unlock()
}

// FailNextOp arms an operation fault for inserts.
func (s *Server) FailNextOp(f OpFault) {
	if f.Times == 0 {
		f.Times = 1
	}
	s.mu.Lock()
	s.opFaults = append(s.opFaults, &f)
	s.mu.Unlock()
}

// ExhaustZone makes the next times inserts in zone fail with
// ZONE_RESOURCE_POOL_EXHAUSTED (negative: until ClearFaults).
func (s *Server) ExhaustZone(zone string, times int) {
	s.FailNextOp(OpFault{Zone: zone, Code: CodeZoneExhausted, Times: times})
}

// ClearFaults disarms every fault.
func (s *Server) ClearFaults() {
	s.mu.Lock()
	s.faults, s.opFaults = nil, nil
	clear(s.unreachable)
	s.mu.Unlock()
}

// SetQuota caps the instances of region (QUOTA_EXCEEDED beyond; 0: none).
func (s *Server) SetQuota(region string, instances int) {
	s.mu.Lock()
	s.quota[region] = instances
	s.mu.Unlock()
}

// SetUnreachable makes aggregated lists report zone as unreachable.
func (s *Server) SetUnreachable(zone string, on bool) {
	s.mu.Lock()
	s.unreachable[zone] = on
	s.mu.Unlock()
}

// Preempt stops a preemptible or spot instance as GCE does on preemption:
// it becomes TERMINATED.
func (s *Server) Preempt(zone, name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.advanceLocked(time.Now())
	in := s.instances[zone+"/"+name]
	if in == nil {
		return fmt.Errorf("no instance %s/%s", zone, name)
	}
	sc := in.res.GetScheduling()
	if !sc.GetPreemptible() && sc.GetProvisioningModel() != "SPOT" {
		return fmt.Errorf("instance %s/%s is neither preemptible nor spot", zone, name)
	}
	in.res.Status = proto.String("TERMINATED")
	in.res.LastStopTimestamp = proto.String(timestamp(time.Now()))
	in.agentDue = nil
	return nil
}

// InstanceInfo describes an instance for assertions.
type InstanceInfo struct {
	Zone, Name, Status string
	Labels             map[string]string
	Metadata           map[string]string
	Resource           *computepb.Instance
}

// Instances returns every instance, sorted by zone and name.
func (s *Server) Instances() []InstanceInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.advanceLocked(time.Now())
	var out []InstanceInfo
	for _, key := range slices.Sorted(maps.Keys(s.instances)) {
		in := s.instances[key]
		md := map[string]string{}
		for _, it := range in.res.GetMetadata().GetItems() {
			md[it.GetKey()] = it.GetValue()
		}
		out = append(out, InstanceInfo{
			Zone: in.zone, Name: in.res.GetName(), Status: in.res.GetStatus(),
			Labels: maps.Clone(in.res.GetLabels()), Metadata: md,
			Resource: proto.CloneOf(in.res),
		})
	}
	return out
}

// WindowsPassword returns the last password the agent set for user on the
// instance, or "".
func (s *Server) WindowsPassword(zone, name, user string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.advanceLocked(time.Now())
	if in := s.instances[zone+"/"+name]; in != nil {
		return in.passwords[user]
	}
	return ""
}

// HostKey returns the instance's published SSH host key of type keyType
// (e.g. ssh-ed25519) in authorized_keys form, or "".
func (s *Server) HostKey(zone, name, keyType string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.advanceLocked(time.Now())
	if in := s.instances[zone+"/"+name]; in != nil {
		return in.hostKeys[keyType]
	}
	return ""
}

// Calls returns the number of requests per API method.
func (s *Server) Calls() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]int{}
	for _, r := range s.requests {
		out[r.Method]++
	}
	return out
}

// Requests returns every request received, in order.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.requests)
}

// ResetCalls forgets the recorded requests.
func (s *Server) ResetCalls() {
	s.mu.Lock()
	s.requests = nil
	s.mu.Unlock()
}

// advanceLocked moves every instance and agent along to now.
func (s *Server) advanceLocked(now time.Time) {
	for key, in := range s.instances {
		if !in.deleteAt.IsZero() {
			if !now.Before(in.deleteAt) {
				delete(s.instances, key)
			}
			continue
		}
		switch in.res.GetStatus() {
		case "PROVISIONING", "STAGING":
			switch {
			case !now.Before(in.bootAt):
				in.res.Status = proto.String("RUNNING")
				in.res.LastStartTimestamp = proto.String(timestamp(in.bootAt))
				in.runningAt = in.bootAt
				s.bootAgentLocked(in)
			case !now.Before(in.created.Add(in.bootAt.Sub(in.created) / 2)):
				in.res.Status = proto.String("STAGING")
			}
		}
		if in.res.GetStatus() != "RUNNING" {
			continue
		}
		var later []agentTask
		for _, t := range in.agentDue {
			if now.Before(t.at) {
				later = append(later, t)
			} else {
				t.run(in)
			}
		}
		in.agentDue = later
	}
}

func newID() uint64 {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return binary.BigEndian.Uint64(b[:]) >> 1
}

func newFingerprint() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return base64.StdEncoding.EncodeToString(b[:])
}

// timestamp formats t as GCE does (RFC 3339 with a numeric zone).
func timestamp(t time.Time) string {
	return t.In(time.FixedZone("PDT", -7*3600)).Format("2006-01-02T15:04:05.000-07:00")
}

func region(zone string) string {
	if i := strings.LastIndexByte(zone, '-'); i > 0 {
		return zone[:i]
	}
	return zone
}

func (s *Server) baseURL(r *http.Request, project string) string {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return fmt.Sprintf("%s://%s/compute/v1/projects/%s", scheme, r.Host, project)
}
