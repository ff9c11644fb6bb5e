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
//	GET    zones/{z}/operations                      zoneOperations.list
//	GET    zones/{z}/operations/{op}                 zoneOperations.get
//	POST   zones/{z}/operations/{op}/wait            zoneOperations.wait
//
// Lists honour filter (the subset of the list filter syntax: labels.KEY:*,
// FIELD = value, FIELD != value, terms joined by AND or parenthesised),
// maxResults and pageToken.
// Every API request must carry a bearer token: an access token the fake
// issued at TokenPath (OAuth 2.0 JWT bearer grant, signed with the key of
// ServiceAccountKey) or a JWT that key signed; others get Compute
// Engine's 401. Errors use Google's JSON error format, failed operations carry
// error.errors[].code (ZONE_RESOURCE_POOL_EXHAUSTED, QUOTA_EXCEEDED, ...).
//
// Instances move PROVISIONING → STAGING → RUNNING after BootDelay and
// STOPPING → gone after DeleteDelay. Preempt plays a preemption: the
// instance goes STOPPING, then TERMINATED after PreemptDelay (or is
// deleted, with instanceTerminationAction DELETE), and a DONE zone
// operation of type compute.instances.preempted by user system targets
// it. A scripted guest agent publishes SSH host keys (Options.HostKeys, or
// made-up ones) in guest attributes (hostkeys/) when metadata
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
	"cmp"
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
	// PreemptDelay is how long a preempted instance stays STOPPING before
	// it is TERMINATED: the guest's shutdown time, at most 30s on GCE for
	// spot and preemptible VMs. Zero terminates at once.
	PreemptDelay time.Duration

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
	// HostKeys, if set, are the SSH host keys (authorized_keys form) the
	// Linux guest agent publishes in guest attributes instead of made-up
	// ones: the keys of the local SSH server playing the instances.
	HostKeys []string
	// OnMetadata, if set, is called with the instance after each insert
	// and setMetadata, outside the server's lock and before that call's
	// answer is sent. Tests play the guest agent's account management with
	// it, e.g. authorising the ssh-keys entries on the local SSH server
	// playing the instances.
	OnMetadata func(InstanceInfo)
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
	Name   string // the instance or operation in the path, if any
	Status int    // HTTP status answered
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
	tokens      map[string]time.Time // access token → expiry
	tokenGrants int
}

type instance struct {
	res       *computepb.Instance
	zone      string
	created   time.Time
	bootAt    time.Time
	runningAt time.Time // zero until RUNNING
	deleteAt  time.Time // zero unless STOPPING for deletion
	stopAt    time.Time // zero unless STOPPING after a preemption
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
	seq    uint64
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
		tokens:      map[string]time.Time{},
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

// OpPreempted is the operation type of a preemption.
const OpPreempted = "compute.instances.preempted"

// systemUser is the user of the operations GCE starts by itself.
const systemUser = "system"

// Preempt preempts a spot or preemptible instance as GCE does: it goes
// STOPPING at once (the guest gets its ACPI soft-off), then TERMINATED
// after Options.PreemptDelay (or it is deleted, when its
// scheduling.instanceTerminationAction is DELETE), and a DONE zone
// operation of type compute.instances.preempted by user "system" targets
// it. Only an instance that is booting or running can be preempted.
func (s *Server) Preempt(zone, name string) error {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.advanceLocked(now)
	in := s.instances[zone+"/"+name]
	if in == nil {
		return fmt.Errorf("preempt %s/%s: no such instance", zone, name)
	}
	sc := in.res.GetScheduling()
	if !sc.GetPreemptible() && sc.GetProvisioningModel() != "SPOT" {
		return fmt.Errorf("preempt %s/%s: instance is neither preemptible nor spot", zone, name)
	}
	switch st := in.res.GetStatus(); {
	case !in.deleteAt.IsZero() || !in.stopAt.IsZero():
		return fmt.Errorf("preempt %s/%s: instance is %s already", zone, name, st)
	case st != "PROVISIONING" && st != "STAGING" && st != "RUNNING":
		return fmt.Errorf("preempt %s/%s: instance is %s, not booting or running", zone, name, st)
	}
	in.res.Status = proto.String("STOPPING")
	in.stopAt = now.Add(s.opts.PreemptDelay)
	in.agentDue = nil
	base := strings.TrimSuffix(in.res.GetZone(), "/zones/"+zone)
	op := s.newOpLocked(base, zone, OpPreempted, in.res.GetSelfLink(), in.res.GetId(), now)
	op.doneAt = now
	op.res.User = proto.String(systemUser)
	op.res.StatusMessage = proto.String("Instance was preempted.")
	s.advanceLocked(now) // a zero PreemptDelay terminates at once
	return nil
}

// OperationInfo describes an operation for assertions.
type OperationInfo struct {
	Zone, Name, Type, Target, User string
	Resource                       *computepb.Operation
}

// Operations returns every operation of every zone, oldest first.
func (s *Server) Operations() []OperationInfo {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []OperationInfo
	for _, op := range s.sortedOpsLocked("") {
		v := s.opView(op, now, false)
		out = append(out, OperationInfo{
			Zone: op.zone, Name: v.GetName(), Type: v.GetOperationType(),
			Target: v.GetTargetLink(), User: v.GetUser(), Resource: v,
		})
	}
	return out
}

// sortedOpsLocked returns the operations of zone ("" for all), oldest
// first. s.mu is held.
func (s *Server) sortedOpsLocked(zone string) []*operation {
	var ops []*operation
	for _, op := range s.ops {
		if zone == "" || op.zone == zone {
			ops = append(ops, op)
		}
	}
	slices.SortFunc(ops, func(a, b *operation) int { return cmp.Compare(a.seq, b.seq) })
	return ops
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
		out = append(out, s.infoLocked(s.instances[key]))
	}
	return out
}

// infoLocked describes in. s.mu is held.
func (s *Server) infoLocked(in *instance) InstanceInfo {
	md := map[string]string{}
	for _, it := range in.res.GetMetadata().GetItems() {
		md[it.GetKey()] = it.GetValue()
	}
	return InstanceInfo{
		Zone: in.zone, Name: in.res.GetName(), Status: in.res.GetStatus(),
		Labels: maps.Clone(in.res.GetLabels()), Metadata: md,
		Resource: proto.CloneOf(in.res),
	}
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
		if !in.stopAt.IsZero() {
			if in.res.GetStatus() == "STOPPING" && !now.Before(in.stopAt) {
				if in.res.GetScheduling().GetInstanceTerminationAction() == "DELETE" {
					delete(s.instances, key)
					continue
				}
				in.res.Status = proto.String("TERMINATED")
				in.res.LastStopTimestamp = proto.String(timestamp(in.stopAt))
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
