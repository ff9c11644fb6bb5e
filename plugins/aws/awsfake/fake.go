// Package awsfake is an in-memory Amazon EC2 endpoint for tests. It speaks
// the EC2 Query protocol (API version 2016-11-15) as the real service does:
// form-encoded POST requests carrying Action and Version, signed with AWS
// Signature Version 4, answered with XML documents in the EC2 namespace or
// with the EC2 error document and the matching HTTP status.
//
// It serves the actions the mayfly EC2 plugin uses (RunInstances,
// DescribeInstances, DescribeInstanceAttribute, TerminateInstances,
// GetConsoleOutput, GetPasswordData, ImportKeyPair, DeleteKeyPair) so that the real aws-sdk-go-v2 client talks
// to it over HTTP with BaseEndpoint and static credentials, and it lets a
// test script faults: no capacity in a subnet, instance and vCPU limits,
// throttling, spot interruptions and slow boots.
package awsfake

import (
	"cmp"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/hex"
	"encoding/xml"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"
)

// OwnerID is the AWS account id the fake reports.
const OwnerID = "123456789012"

// Test credentials the fake accepts when Options name none.
const (
	DefaultAccessKeyID     = "AKIDAWSFAKE000000000"
	DefaultSecretAccessKey = "awsfake-secret-access-key"
)

// Options configure a Server. The zero value serves region us-east-1 with
// one default subnet, instant boots and the default test credentials.
type Options struct {
	// Region is the region requests must be signed for (default us-east-1).
	Region string
	// AccessKeyID and SecretAccessKey are the only credentials accepted
	// (default DefaultAccessKeyID and DefaultSecretAccessKey). The SigV4
	// signature of every request is verified, with the SDK's signer.
	AccessKeyID     string
	SecretAccessKey string
	// Now is the clock for state transitions (default time.Now).
	Now func() time.Time
	// PendingDuration is how long a new instance stays pending.
	PendingDuration time.Duration
	// ShuttingDownDuration is how long a terminated instance stays
	// shutting-down; StoppingDuration likewise for stopping.
	ShuttingDownDuration time.Duration
	StoppingDuration     time.Duration
	// TerminatedRetention is how long terminated instances stay visible to
	// DescribeInstances (default 1h, as on EC2).
	TerminatedRetention time.Duration
	// ConsoleDelay is how long after reaching running the console output
	// (with cloud-init's SSH host key block) appears.
	ConsoleDelay time.Duration
	// PasswordDelay is how long after reaching running a Windows
	// instance's password data appears.
	PasswordDelay time.Duration
	// Subnets maps subnet ids to availability zones. Default:
	// {"subnet-0default0000000000": region+"a"}.
	Subnets map[string]string
	// Images maps AMI ids to their platform ("linux" or "windows"). When
	// nil, every well-formed AMI id is a Linux image.
	Images map[string]string
	// LaunchTemplates are the launch templates the account holds.
	LaunchTemplates []LaunchTemplate
	// Logger receives a record per request (default: discard).
	Logger *slog.Logger

	// Address, if set, is every instance's private and public IP address
	// instead of a made-up one: tests point the instances at a local server
	// playing them (e.g. "127.0.0.1").
	Address string
	// AddressFor, if set, returns the private and public IP address of
	// each instance RunInstances launches, in place of Address: tests give
	// each instance a local address of its own when the instances must
	// differ (say, each serving its own certificate on a fixed port). It
	// is called with the server's lock held, with the new instance (user
	// data included), and must not call the Server.
	AddressFor func(Instance) string
	// WindowsPassword, if set, is every Windows instance's Administrator
	// password instead of a random one: the password of the local server
	// playing the instances. GetPasswordData still returns it encrypted
	// with the instance's key pair.
	WindowsPassword string
	// HostKey, if set, is the SSH host key (authorized_keys form) every
	// Linux instance prints to its console instead of a generated one: the
	// key of the local SSH server playing the instances.
	HostKey string
	// OnLaunch, if set, is called with each instance RunInstances launched,
	// outside the server's lock and before that call's answer is sent.
	// Tests play cloud-init with it, e.g. authorising the SSH key in the
	// user data on the server playing the instance.
	OnLaunch func(Instance)
}

// LaunchTemplate is a stored launch template (one version, $Default and
// $Latest).
type LaunchTemplate struct {
	ID, Name     string
	ImageID      string
	InstanceType string
	KeyName      string
}

// Instance is a snapshot of one instance, for assertions.
type Instance struct {
	ID              string
	ReservationID   string
	ImageID         string
	InstanceType    string
	SubnetID        string
	AvailabilityAZ  string
	KeyName         string
	ClientToken     string
	State           string
	StateReasonCode string
	LaunchTime      time.Time
	Tags            map[string]string
	PrivateIP       string
	PublicIP        string
	Platform        string
	Spot            bool
	SpotMaxPrice    string
	IAMProfile      string
	SecurityGroups  []string
	UserData        []byte
	// HostKey is the instance's SSH host key in authorized_keys format.
	HostKey string
}

type instance struct {
	Instance
	seq             int
	launchTemplate  string
	readyAt         time.Time // pending → running
	ranAt           time.Time // when it reached running
	doneAt          time.Time // shutting-down → terminated, stopping → stopped
	goneAt          time.Time // terminated → no longer listed
	stateMsg        string
	password        string
	passwordData    string
	console         string
	consoleOverride *string
}

type keyPair struct {
	name, id, fingerprint string
	pub                   ssh.PublicKey
}

type fault struct {
	action, code, message string
	remaining             int
}

// Server is the fake EC2 endpoint, an http.Handler. It is safe for
// concurrent use.
type Server struct {
	opts Options
	log  *slog.Logger

	mu            sync.Mutex
	seq           int
	instances     map[string]*instance
	byToken       map[string]string // client token → reservation id
	reservations  map[string][]string
	keyPairs      map[string]*keyPair
	capacity      map[string]int // subnet → instances it can still launch; absent: unlimited
	instanceLimit int
	vcpuLimit     int
	faults        []*fault
	calls         map[string]int
	requests      []url.Values
	launched      map[string][]Instance // request id → instances for Options.OnLaunch
}

// New returns a fake EC2 endpoint.
func New(opts Options) *Server {
	if opts.Region == "" {
		opts.Region = "us-east-1"
	}
	if opts.AccessKeyID == "" && opts.SecretAccessKey == "" {
		opts.AccessKeyID, opts.SecretAccessKey = DefaultAccessKeyID, DefaultSecretAccessKey
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.TerminatedRetention == 0 {
		opts.TerminatedRetention = time.Hour
	}
	if len(opts.Subnets) == 0 {
		opts.Subnets = map[string]string{DefaultSubnet: opts.Region + "a"}
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Server{
		opts:         opts,
		log:          opts.Logger,
		instances:    map[string]*instance{},
		byToken:      map[string]string{},
		reservations: map[string][]string{},
		keyPairs:     map[string]*keyPair{},
		capacity:     map[string]int{},
		calls:        map[string]int{},
		launched:     map[string][]Instance{},
	}
}

// DefaultSubnet is the subnet of a Server made without Options.Subnets.
const DefaultSubnet = "subnet-0default0000000000"

// apiError is an EC2 error response.
type apiError struct {
	status        int
	code, message string
}

func (e *apiError) Error() string { return e.code + ": " + e.message }

func errorf(status int, code, format string, args ...any) *apiError {
	return &apiError{status: status, code: code, message: fmt.Sprintf(format, args...)}
}

func badRequest(code, format string, args ...any) *apiError {
	return errorf(http.StatusBadRequest, code, format, args...)
}

// statusOf is the HTTP status EC2 answers an error code with: 503 for
// throttling and unavailability, 500 for the server errors, 400 for client
// errors.
func statusOf(code string) int {
	switch code {
	case "RequestLimitExceeded", "Unavailable", "ServiceUnavailable":
		return http.StatusServiceUnavailable
	case "InternalError", "InsufficientInstanceCapacity", "InsufficientHostCapacity",
		"InsufficientReservedInstanceCapacity", "InsufficientCapacity", "InsufficientAddressCapacity":
		return http.StatusInternalServerError
	case "AuthFailure", "MissingAuthenticationToken":
		return http.StatusUnauthorized
	case "UnauthorizedOperation":
		return http.StatusForbidden
	}
	return http.StatusBadRequest
}

var defaultMessages = map[string]string{
	"RequestLimitExceeded":         "Request limit exceeded.",
	"InternalError":                "An internal error has occurred.",
	"Unavailable":                  "The server is overloaded and can't handle the request.",
	"InsufficientInstanceCapacity": "Insufficient capacity.",
	"InstanceLimitExceeded":        "You have requested more instances than your current instance limit allows for the specified instance type.",
	"VcpuLimitExceeded":            "You have requested more vCPU capacity than your current vCPU limit allows for the instance bucket that the specified instance type belongs to.",
	"UnauthorizedOperation":        "You are not authorized to perform this operation.",
	"Unsupported":                  "The requested configuration is currently not supported.",
}

// FailNext makes the next times calls of action fail with the EC2 error
// code, answered with the HTTP status EC2 uses for it. An empty message
// picks a default one.
func (s *Server) FailNext(action, code, message string, times int) {
	if message == "" {
		message = defaultMessages[code]
		if message == "" {
			message = code
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = append(s.faults, &fault{action: action, code: code, message: message, remaining: times})
}

// SetCapacity lets subnet launch at most n more instances before
// RunInstances there fails with InsufficientInstanceCapacity; n < 0 makes
// it unlimited again.
func (s *Server) SetCapacity(subnet string, n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n < 0 {
		delete(s.capacity, subnet)
		return
	}
	s.capacity[subnet] = n
}

// SetInstanceLimit caps the instances not terminated (InstanceLimitExceeded
// beyond); 0 removes the cap.
func (s *Server) SetInstanceLimit(n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.instanceLimit = n
}

// SetVcpuLimit caps the vCPUs of the instances not terminated
// (VcpuLimitExceeded beyond); 0 removes the cap.
func (s *Server) SetVcpuLimit(n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.vcpuLimit = n
}

// InterruptSpot interrupts spot instance id as EC2 does when it reclaims
// capacity: it is terminated (or, with stop, stopped) with state reason
// Server.SpotInstanceTermination (Server.SpotInstanceShutdown).
func (s *Server) InterruptSpot(id string, stop bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.opts.Now()
	s.advance(now)
	in, ok := s.instances[id]
	if !ok {
		return fmt.Errorf("interrupt %s: no such instance", id)
	}
	if !in.Spot {
		return fmt.Errorf("interrupt %s: not a spot instance", id)
	}
	if stop {
		in.State, in.StateReasonCode = "stopping", "Server.SpotInstanceShutdown"
		in.stateMsg = "Server.SpotInstanceShutdown: Spot instance shutdown"
		in.doneAt = now.Add(s.opts.StoppingDuration)
	} else {
		in.State, in.StateReasonCode = "shutting-down", "Server.SpotInstanceTermination"
		in.stateMsg = "Server.SpotInstanceTermination: Spot instance termination"
		in.doneAt = now.Add(s.opts.ShuttingDownDuration)
	}
	s.advance(now)
	return nil
}

// SetConsoleOutput replaces the console output of instance id.
func (s *Server) SetConsoleOutput(id, output string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if in, ok := s.instances[id]; ok {
		in.consoleOverride = &output
	}
}

// Calls returns how many requests each action received (including those
// that failed).
func (s *Server) Calls() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.calls)
}

// ResetCalls zeroes the call counters and forgets recorded requests.
func (s *Server) ResetCalls() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls = map[string]int{}
	s.requests = nil
}

// Requests returns the decoded parameters of every request received since
// the last ResetCalls, in order.
func (s *Server) Requests() []url.Values {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]url.Values, len(s.requests))
	for i, r := range s.requests {
		out[i] = maps.Clone(r)
	}
	return out
}

// Instances returns a snapshot of every instance still listed, in launch
// order.
func (s *Server) Instances() []Instance {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.advance(s.opts.Now())
	var out []Instance
	for _, in := range s.sorted() {
		out = append(out, in.snapshot())
	}
	return out
}

// Instance returns a snapshot of instance id.
func (s *Server) Instance(id string) (Instance, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.advance(s.opts.Now())
	in, ok := s.instances[id]
	if !ok {
		return Instance{}, false
	}
	return in.snapshot(), true
}

// Password returns the Administrator password of Windows instance id.
func (s *Server) Password(id string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if in, ok := s.instances[id]; ok {
		return in.password
	}
	return ""
}

// KeyPairs returns the names of the key pairs, sorted.
func (s *Server) KeyPairs() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Sorted(maps.Keys(s.keyPairs))
}

func (in *instance) snapshot() Instance {
	c := in.Instance
	c.Tags = maps.Clone(in.Tags)
	c.SecurityGroups = slices.Clone(in.SecurityGroups)
	c.UserData = slices.Clone(in.UserData)
	return c
}

func (s *Server) sorted() []*instance {
	list := slices.Collect(maps.Values(s.instances))
	slices.SortFunc(list, func(a, b *instance) int { return a.seq - b.seq })
	return list
}

// advance applies the state transitions due at now. s.mu is held.
func (s *Server) advance(now time.Time) {
	for id, in := range s.instances {
		if in.State == "pending" && !now.Before(in.readyAt) {
			in.State, in.ranAt = "running", in.readyAt
		}
		if in.State == "running" && in.console == "" {
			in.console = cloudInitConsole(in)
		}
		if in.State == "shutting-down" && !now.Before(in.doneAt) {
			in.State, in.goneAt = "terminated", in.doneAt.Add(s.opts.TerminatedRetention)
			in.PrivateIP, in.PublicIP = "", ""
		}
		if in.State == "stopping" && !now.Before(in.doneAt) {
			in.State = "stopped"
			in.PublicIP = ""
		}
		if in.State == "terminated" && !now.Before(in.goneAt) {
			delete(s.instances, id)
		}
	}
}

var stateCodes = map[string]int{
	"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80,
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	reqID := newID("", 32)
	reqID = reqID[:8] + "-" + reqID[8:12] + "-" + reqID[12:16] + "-" + reqID[16:20] + "-" + reqID[20:]
	resp, apiErr := s.serve(r, reqID)
	if s.opts.OnLaunch != nil {
		s.mu.Lock()
		launched := s.launched[reqID]
		delete(s.launched, reqID)
		s.mu.Unlock()
		for _, in := range launched {
			s.opts.OnLaunch(in)
		}
	}
	if apiErr != nil {
		s.log.Info("awsfake error", "code", apiErr.code, "message", apiErr.message)
		writeXML(w, apiErr.status, xmlErrorResponse{
			Errors:    []xmlError{{Code: apiErr.code, Message: apiErr.message}},
			RequestID: reqID,
		})
		return
	}
	writeXML(w, http.StatusOK, resp)
}

func writeXML(w http.ResponseWriter, status int, v any) {
	body, err := xml.Marshal(v)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/xml;charset=UTF-8")
	w.WriteHeader(status)
	_, _ = io.WriteString(w, xml.Header)
	_, _ = w.Write(body)
}

const maxBody = 1 << 20

func (s *Server) serve(r *http.Request, reqID string) (any, *apiError) {
	if r.Method != http.MethodPost && r.Method != http.MethodGet {
		return nil, errorf(http.StatusMethodNotAllowed, "InvalidHttpRequest", "The HTTP method %s is not supported.", r.Method)
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		return nil, badRequest("InvalidHttpRequest", "read body: %v", err)
	}
	if len(body) > maxBody {
		return nil, errorf(http.StatusRequestEntityTooLarge, "RequestEntityTooLarge", "request body exceeds %d bytes", maxBody)
	}
	params := r.URL.Query()
	if r.Method == http.MethodPost {
		ct := r.Header.Get("Content-Type")
		if !strings.HasPrefix(ct, "application/x-www-form-urlencoded") {
			return nil, badRequest("InvalidHttpRequest", "Content-Type %q is not application/x-www-form-urlencoded", ct)
		}
		params, err = url.ParseQuery(string(body))
		if err != nil {
			return nil, badRequest("MalformedQueryString", "%v", err)
		}
	}
	if apiErr := s.authenticate(r, body); apiErr != nil {
		return nil, apiErr
	}
	action := params.Get("Action")
	if v := params.Get("Version"); v != APIVersion {
		return nil, badRequest("NoSuchVersion", "An invalid or unsupported API version %q was specified, this endpoint serves %s.", v, APIVersion)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls[action]++
	s.requests = append(s.requests, params)
	s.log.Debug("awsfake request", "action", action, "request_id", reqID)
	for i, f := range s.faults {
		if f.action == action && f.remaining != 0 {
			f.remaining--
			if f.remaining == 0 {
				s.faults = slices.Delete(s.faults, i, i+1)
			}
			return nil, errorf(statusOf(f.code), f.code, "%s", f.message)
		}
	}
	now := s.opts.Now()
	s.advance(now)
	q := query(params)
	switch action {
	case "RunInstances":
		return s.runInstances(q, now, reqID)
	case "DescribeInstances":
		return s.describeInstances(q, reqID)
	case "TerminateInstances":
		return s.terminateInstances(q, now, reqID)
	case "GetConsoleOutput":
		return s.getConsoleOutput(q, now, reqID)
	case "GetPasswordData":
		return s.getPasswordData(q, now, reqID)
	case "DescribeInstanceAttribute":
		return s.describeInstanceAttribute(q, reqID)
	case "ImportKeyPair":
		return s.importKeyPair(q, reqID)
	case "DeleteKeyPair":
		return s.deleteKeyPair(q, reqID)
	case "":
		return nil, badRequest("MissingAction", "The request must contain the parameter Action.")
	}
	return nil, badRequest("InvalidAction", "The action %s is not valid for this web service.", action)
}

func (s *Server) authenticate(r *http.Request, body []byte) *apiError {
	h := r.Header.Get("Authorization")
	if h == "" {
		return errorf(http.StatusUnauthorized, "MissingAuthenticationToken", "Request is missing Authentication Token")
	}
	sig, err := parseSigV4(h)
	if err != nil {
		return errorf(http.StatusUnauthorized, "AuthFailure", "%v", err)
	}
	if sig.Service != "ec2" {
		return errorf(http.StatusUnauthorized, "AuthFailure", "Credential should be scoped to correct service: 'ec2', not %q.", sig.Service)
	}
	if sig.Region != s.opts.Region {
		return errorf(http.StatusUnauthorized, "AuthFailure", "Credential should be scoped to a valid region, not %q (this endpoint serves %s).", sig.Region, s.opts.Region)
	}
	if sig.AccessKeyID != s.opts.AccessKeyID {
		return errorf(http.StatusUnauthorized, "AuthFailure", "AWS was not able to validate the provided access credentials")
	}
	if err := sig.verify(r, body, s.opts.SecretAccessKey); err != nil {
		return errorf(http.StatusUnauthorized, "AuthFailure", "AWS was not able to validate the provided access credentials: %v", err)
	}
	return nil
}

// newID returns prefix followed by n random lowercase hex digits.
func newID(prefix string, n int) string {
	b := make([]byte, (n+1)/2)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)[:n]
}

func isID(s, prefix string) bool {
	rest, ok := strings.CutPrefix(s, prefix)
	if !ok || (len(rest) != 8 && len(rest) != 17) {
		return false
	}
	_, err := hex.DecodeString(rest + rest[:len(rest)%2])
	return err == nil && strings.ToLower(rest) == rest
}

// vcpus is a coarse vCPU count per instance size.
func vcpus(instanceType string) int {
	_, size, _ := strings.Cut(instanceType, ".")
	switch size {
	case "nano", "micro", "small", "medium", "large":
		return 2
	case "xlarge":
		return 4
	}
	var n int
	if _, err := fmt.Sscanf(size, "%dxlarge", &n); err == nil && n > 0 {
		return 4 * n
	}
	return 2
}

// architecture guesses the CPU architecture of an instance type: the
// Graviton families carry a "g" after the generation digit (t4g, m7g).
func architecture(instanceType string) string {
	family, _, _ := strings.Cut(instanceType, ".")
	for i := 1; i < len(family); i++ {
		if family[i-1] >= '0' && family[i-1] <= '9' && family[i] == 'g' {
			return "arm64"
		}
	}
	return "x86_64"
}

func (s *Server) activeVcpus() (instances, cpus int) {
	for _, in := range s.instances {
		if in.State != "terminated" && in.State != "shutting-down" {
			instances++
			cpus += vcpus(in.InstanceType)
		}
	}
	return instances, cpus
}

func (s *Server) runInstances(q query, now time.Time, reqID string) (any, *apiError) {
	if token := q.get("ClientToken"); token != "" {
		if rid, ok := s.byToken[token]; ok {
			return s.reservationResponse(rid, reqID), nil
		}
	}
	imageID, instanceType, keyName := q.get("ImageId"), q.get("InstanceType"), q.get("KeyName")
	var ltID string
	if q.has("LaunchTemplate.LaunchTemplateId") || q.has("LaunchTemplate.LaunchTemplateName") {
		lt, apiErr := s.launchTemplate(q.get("LaunchTemplate.LaunchTemplateId"), q.get("LaunchTemplate.LaunchTemplateName"), q.get("LaunchTemplate.Version"))
		if apiErr != nil {
			return nil, apiErr
		}
		ltID = lt.ID
		imageID = cmp.Or(imageID, lt.ImageID)
		instanceType = cmp.Or(instanceType, lt.InstanceType)
		keyName = cmp.Or(keyName, lt.KeyName)
	}
	if imageID == "" {
		return nil, badRequest("MissingParameter", "The request must contain the parameter ImageId")
	}
	if !isID(imageID, "ami-") {
		return nil, badRequest("InvalidAMIID.Malformed", "Invalid id: %q (expecting \"ami-...\")", imageID)
	}
	platform := "linux"
	if s.opts.Images != nil {
		p, ok := s.opts.Images[imageID]
		if !ok {
			return nil, badRequest("InvalidAMIID.NotFound", "The image id '[%s]' does not exist", imageID)
		}
		platform = p
	}
	if instanceType == "" {
		instanceType = "m1.small"
	}
	if family, size, ok := strings.Cut(instanceType, "."); !ok || family == "" || size == "" {
		return nil, badRequest("InvalidParameterValue", "Invalid value '%s' for InstanceType.", instanceType)
	}
	minCount, err1 := q.int("MinCount")
	maxCount, err2 := q.int("MaxCount")
	switch {
	case !q.has("MinCount"):
		return nil, badRequest("MissingParameter", "The request must contain the parameter MinCount")
	case !q.has("MaxCount"):
		return nil, badRequest("MissingParameter", "The request must contain the parameter MaxCount")
	case err1 != nil || err2 != nil || minCount < 1 || maxCount < 1:
		return nil, badRequest("InvalidParameterValue", "MinCount and MaxCount must be positive integers, got %q and %q", q.get("MinCount"), q.get("MaxCount"))
	case minCount > maxCount:
		return nil, badRequest("InvalidParameterValue", "MinCount (%d) must be less than or equal to MaxCount (%d)", minCount, maxCount)
	}
	subnet := q.get("SubnetId")
	if subnet == "" {
		subnet = slices.Sorted(maps.Keys(s.opts.Subnets))[0]
	}
	az, ok := s.opts.Subnets[subnet]
	if !ok {
		return nil, badRequest("InvalidSubnetID.NotFound", "The subnet ID '%s' does not exist", subnet)
	}
	groups := q.list("SecurityGroupId")
	for _, g := range groups {
		if !strings.HasPrefix(g, "sg-") {
			return nil, badRequest("InvalidGroupId.Malformed", "Invalid id: %q (expecting \"sg-...\")", g)
		}
	}
	var kp *keyPair
	if keyName != "" {
		if kp = s.keyPairs[keyName]; kp == nil {
			return nil, badRequest("InvalidKeyPair.NotFound", "The key pair '%s' does not exist", keyName)
		}
	}
	var userData []byte
	if ud := q.get("UserData"); ud != "" {
		var err error
		if userData, err = base64.StdEncoding.DecodeString(ud); err != nil {
			return nil, badRequest("InvalidParameterValue", "Invalid BASE64 encoding of user data.")
		}
		if len(userData) > 16384 {
			return nil, badRequest("InvalidParameterValue", "User data is limited to 16384 bytes")
		}
	}
	spot, maxPrice, behavior := false, "", "terminate"
	switch mt := q.get("InstanceMarketOptions.MarketType"); mt {
	case "":
	case "spot":
		spot = true
		maxPrice = q.get("InstanceMarketOptions.SpotOptions.MaxPrice")
		if b := q.get("InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"); b != "" {
			behavior = b
		}
		st := cmp.Or(q.get("InstanceMarketOptions.SpotOptions.SpotInstanceType"), "one-time")
		if st == "one-time" && behavior != "terminate" {
			return nil, badRequest("InvalidParameterCombination", "The instance interruption behavior %q is only supported with persistent spot requests.", behavior)
		}
	default:
		return nil, badRequest("InvalidParameterValue", "Invalid value '%s' for MarketType.", mt)
	}
	tags := map[string]string{}
	for _, spec := range q.sub("TagSpecification") {
		rt := spec.get("ResourceType")
		switch rt {
		case "instance", "volume", "network-interface", "spot-instances-request":
		default:
			return nil, badRequest("InvalidParameterValue", "'%s' is not a valid taggable resource type for this operation.", rt)
		}
		for _, tag := range spec.sub("Tag") {
			k := tag.get("Key")
			if k == "" || strings.HasPrefix(strings.ToLower(k), "aws:") {
				return nil, badRequest("InvalidParameterValue", "Tag key %q is not valid (empty or reserved aws: prefix)", k)
			}
			if rt == "instance" {
				tags[k] = tag.get("Value")
			}
		}
	}
	if len(tags) > 50 {
		return nil, badRequest("TagLimitExceeded", "The maximum number of tags per resource (50) was exceeded.")
	}

	// Capacity and limits, in the order EC2 reports them.
	count := maxCount
	if c, limited := s.capacity[subnet]; limited {
		if c < minCount {
			others := slices.Sorted(maps.Values(s.opts.Subnets))
			others = slices.DeleteFunc(others, func(z string) bool { return z == az })
			return nil, errorf(http.StatusInternalServerError, "InsufficientInstanceCapacity",
				"We currently do not have sufficient %s capacity in the Availability Zone you requested (%s). Our system will be working on provisioning additional capacity. You can currently get %s capacity by not specifying an Availability Zone in your request or choosing %s.",
				instanceType, az, instanceType, strings.Join(others, ", "))
		}
		count = min(count, c)
	}
	active, cpus := s.activeVcpus()
	if s.instanceLimit > 0 {
		if active+minCount > s.instanceLimit {
			return nil, badRequest("InstanceLimitExceeded",
				"You have requested more instances (%d) than your current instance limit of %d allows for the specified instance type. Please visit http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this limit.",
				active+minCount, s.instanceLimit)
		}
		count = min(count, s.instanceLimit-active)
	}
	if s.vcpuLimit > 0 {
		per := vcpus(instanceType)
		if cpus+minCount*per > s.vcpuLimit {
			return nil, badRequest("VcpuLimitExceeded",
				"You have requested more vCPU capacity than your current vCPU limit of %d allows for the instance bucket that the specified instance type belongs to. Please visit http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this limit.",
				s.vcpuLimit)
		}
		count = min(count, (s.vcpuLimit-cpus)/per)
	}
	if c, limited := s.capacity[subnet]; limited {
		s.capacity[subnet] = c - count
	}

	rid := newID("r-", 17)
	subnetIndex := slices.Index(slices.Sorted(maps.Keys(s.opts.Subnets)), subnet)
	var ids []string
	for range count {
		s.seq++
		in := &instance{
			Instance: Instance{
				ID:             newID("i-", 17),
				ReservationID:  rid,
				ImageID:        imageID,
				InstanceType:   instanceType,
				SubnetID:       subnet,
				AvailabilityAZ: az,
				KeyName:        keyName,
				ClientToken:    q.get("ClientToken"),
				State:          "pending",
				LaunchTime:     now.UTC().Truncate(time.Millisecond),
				Tags:           maps.Clone(tags),
				PrivateIP:      fmt.Sprintf("10.0.%d.%d", subnetIndex, 4+s.seq%250),
				PublicIP:       fmt.Sprintf("203.0.113.%d", 1+s.seq%254),
				Spot:           spot,
				SpotMaxPrice:   maxPrice,
				IAMProfile:     cmp.Or(q.get("IamInstanceProfile.Arn"), q.get("IamInstanceProfile.Name")),
				SecurityGroups: groups,
				UserData:       userData,
			},
			seq:            s.seq,
			launchTemplate: ltID,
			readyAt:        now.Add(s.opts.PendingDuration),
		}
		if platform == "windows" {
			in.Platform = "windows"
			if kp != nil {
				if pw, data, err := windowsPassword(kp.pub, s.opts.WindowsPassword); err == nil {
					in.password, in.passwordData = pw, data
				}
			}
		} else if s.opts.HostKey != "" {
			in.HostKey = s.opts.HostKey
		} else {
			pub, _, err := ed25519.GenerateKey(rand.Reader)
			if err == nil {
				if sp, err := ssh.NewPublicKey(pub); err == nil {
					in.HostKey = strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sp)))
				}
			}
		}
		if s.opts.Address != "" {
			in.PrivateIP, in.PublicIP = s.opts.Address, s.opts.Address
		}
		if s.opts.AddressFor != nil {
			ip := s.opts.AddressFor(in.snapshot())
			in.PrivateIP, in.PublicIP = ip, ip
		}
		s.instances[in.ID] = in
		ids = append(ids, in.ID)
		if s.opts.OnLaunch != nil {
			s.launched[reqID] = append(s.launched[reqID], in.snapshot())
		}
	}
	s.reservations[rid] = ids
	if token := q.get("ClientToken"); token != "" {
		s.byToken[token] = rid
	}
	s.advance(now)
	return s.reservationResponse(rid, reqID), nil
}

func (s *Server) launchTemplate(id, name, version string) (LaunchTemplate, *apiError) {
	switch {
	case id != "" && name != "":
		return LaunchTemplate{}, badRequest("InvalidParameterCombination", "Specify either a launch template ID or a launch template name, not both.")
	case version != "" && version != "$Default" && version != "$Latest" && version != "1":
		return LaunchTemplate{}, badRequest("InvalidLaunchTemplateId.VersionNotFound", "Could not find launch template version %s", version)
	}
	for _, lt := range s.opts.LaunchTemplates {
		if (id != "" && lt.ID == id) || (name != "" && lt.Name == name) {
			return lt, nil
		}
	}
	if id != "" {
		return LaunchTemplate{}, badRequest("InvalidLaunchTemplateId.NotFound", "The specified launch template, with template ID %s, does not exist.", id)
	}
	return LaunchTemplate{}, badRequest("InvalidLaunchTemplateName.NotFoundException", "The specified launch template, with template name %s, does not exist.", name)
}

// windowsPassword encrypts the Administrator password (a random one when
// password is empty) with the key pair's RSA public key (PKCS #1 v1.5),
// base64-encoded, as EC2 returns it from GetPasswordData.
func windowsPassword(pub ssh.PublicKey, password string) (string, string, error) {
	cpk, ok := pub.(ssh.CryptoPublicKey)
	if !ok {
		return "", "", fmt.Errorf("key type %s has no crypto key", pub.Type())
	}
	rsaPub, ok := cpk.CryptoPublicKey().(*rsa.PublicKey)
	if !ok {
		return "", "", fmt.Errorf("key type %s is not RSA", pub.Type())
	}
	if password == "" {
		password = rand.Text()[:20] + "!a1"
	}
	//nolint:staticcheck // EC2 encrypts Windows passwords with PKCS #1 v1.5.
	ct, err := rsa.EncryptPKCS1v15(rand.Reader, rsaPub, []byte(password))
	if err != nil {
		return "", "", err
	}
	return password, base64.StdEncoding.EncodeToString(ct), nil
}

// cloudInitConsole is the console output of a booted Linux instance: kernel
// noise and cloud-init's SSH host key blocks.
func cloudInitConsole(in *instance) string {
	if in.Platform == "windows" {
		return "Windows is Ready to use\r\n"
	}
	host := "ip-" + strings.ReplaceAll(in.PrivateIP, ".", "-")
	var b strings.Builder
	fmt.Fprintf(&b, "[    0.000000] Linux version 6.1.0-aws (builder@fake) #1 SMP\r\n")
	fmt.Fprintf(&b, "[    2.345678] cloud-init[512]: Cloud-init v. 23.1 running 'init' at boot.\r\n")
	fmt.Fprintf(&b, "<14>cloud-init: #############################################################\r\n")
	fmt.Fprintf(&b, "<14>cloud-init: -----BEGIN SSH HOST KEY FINGERPRINTS-----\r\n")
	fmt.Fprintf(&b, "<14>cloud-init: -----END SSH HOST KEY FINGERPRINTS-----\r\n")
	fmt.Fprintf(&b, "-----BEGIN SSH HOST KEY KEYS-----\r\n%s root@%s\r\n-----END SSH HOST KEY KEYS-----\r\n", in.HostKey, host)
	fmt.Fprintf(&b, "[   12.000000] cloud-init[900]: Cloud-init v. 23.1 finished.\r\n")
	return b.String()
}

func (s *Server) reservationResponse(rid, reqID string) runInstancesResponse {
	resp := runInstancesResponse{Xmlns: Namespace, RequestID: reqID, ReservationID: rid, OwnerID: OwnerID}
	for i, id := range s.reservations[rid] {
		if in, ok := s.instances[id]; ok {
			x := in.xml()
			x.AmiLaunchIndex = i
			resp.InstancesSet = append(resp.InstancesSet, x)
		}
	}
	return resp
}

func (in *instance) xml() xmlInstance {
	x := xmlInstance{
		InstanceID:       in.ID,
		ImageID:          in.ImageID,
		InstanceState:    xmlState{Code: stateCodes[in.State], Name: in.State},
		KeyName:          in.KeyName,
		InstanceType:     in.InstanceType,
		LaunchTime:       in.LaunchTime.Format("2006-01-02T15:04:05.000Z"),
		Placement:        xmlPlacement{AvailabilityZone: in.AvailabilityAZ, Tenancy: "default"},
		Platform:         in.Platform,
		SubnetID:         in.SubnetID,
		VpcID:            "vpc-0fake00000000000a",
		PrivateIPAddress: in.PrivateIP,
		IPAddress:        in.PublicIP,
		Architecture:     architecture(in.InstanceType),
		RootDeviceType:   "ebs",
		ClientToken:      in.ClientToken,
	}
	if in.PrivateIP != "" {
		x.PrivateDNSName = "ip-" + strings.ReplaceAll(in.PrivateIP, ".", "-") + ".ec2.internal"
	}
	for _, g := range in.SecurityGroups {
		x.GroupSet = append(x.GroupSet, xmlGroup{GroupID: g})
	}
	if in.StateReasonCode != "" {
		x.StateReason = &xmlStateReason{Code: in.StateReasonCode, Message: in.stateMsg}
		x.Reason = in.stateMsg
	}
	for _, k := range slices.Sorted(maps.Keys(in.Tags)) {
		x.TagSet = append(x.TagSet, xmlTag{Key: k, Value: in.Tags[k]})
	}
	if in.Spot {
		x.InstanceLifecycle = "spot"
		x.SpotInstanceRequestID = "sir-" + in.ID[2:10]
	}
	if in.IAMProfile != "" {
		arn := in.IAMProfile
		if !strings.HasPrefix(arn, "arn:") {
			arn = "arn:aws:iam::" + OwnerID + ":instance-profile/" + arn
		}
		x.IAMInstanceProfile = &xmlIAMProfile{Arn: arn, ID: "AIPAFAKE"}
	}
	return x
}

// lookup returns the instances named by ids, or the EC2 error for malformed
// or unknown ids.
func (s *Server) lookup(ids []string) ([]*instance, *apiError) {
	var missing []string
	var out []*instance
	for _, id := range ids {
		if !isID(id, "i-") {
			return nil, badRequest("InvalidInstanceID.Malformed", "Invalid id: %q (expecting \"i-...\")", id)
		}
		in, ok := s.instances[id]
		if !ok {
			missing = append(missing, id)
			continue
		}
		out = append(out, in)
	}
	switch len(missing) {
	case 0:
		return out, nil
	case 1:
		return nil, badRequest("InvalidInstanceID.NotFound", "The instance ID '%s' does not exist", missing[0])
	}
	return nil, badRequest("InvalidInstanceID.NotFound", "The instance IDs '%s' do not exist", strings.Join(missing, ", "))
}

func (s *Server) describeInstances(q query, reqID string) (any, *apiError) {
	ids := q.list("InstanceId")
	maxResults := 0
	if q.has("MaxResults") {
		if len(ids) > 0 {
			return nil, badRequest("InvalidParameterCombination", "The parameter instancesSet cannot be used with the parameter maxResults")
		}
		n, err := q.int("MaxResults")
		if err != nil || n < 5 || n > 1000 {
			return nil, badRequest("InvalidParameterValue", "Value ( %s ) for parameter maxResults is invalid. Expecting a value greater than 5.", q.get("MaxResults"))
		}
		maxResults = n
	}
	filters, apiErr := parseFilters(q)
	if apiErr != nil {
		return nil, apiErr
	}
	var candidates []*instance
	if len(ids) > 0 {
		found, apiErr := s.lookup(ids)
		if apiErr != nil {
			return nil, apiErr
		}
		candidates = found
	} else {
		candidates = s.sorted()
	}
	after := 0
	if tok := q.get("NextToken"); tok != "" {
		n, ok := decodeToken(tok)
		if !ok {
			return nil, badRequest("InvalidParameterValue", "The value of nextToken %q is not valid.", tok)
		}
		after = n
	}
	var page []*instance
	next := ""
	for _, in := range candidates {
		if in.seq <= after || !filters.match(in) {
			continue
		}
		if maxResults > 0 && len(page) == maxResults {
			next = encodeToken(page[len(page)-1].seq)
			break
		}
		page = append(page, in)
	}
	resp := describeInstancesResponse{Xmlns: Namespace, RequestID: reqID, NextToken: next}
	index := map[string]int{}
	for _, in := range page {
		i, ok := index[in.ReservationID]
		if !ok {
			i = len(resp.ReservationSet)
			index[in.ReservationID] = i
			resp.ReservationSet = append(resp.ReservationSet, xmlReservation{ReservationID: in.ReservationID, OwnerID: OwnerID})
		}
		resp.ReservationSet[i].InstancesSet = append(resp.ReservationSet[i].InstancesSet, in.xml())
	}
	return resp, nil
}

func encodeToken(seq int) string {
	return base64.RawURLEncoding.EncodeToString(fmt.Appendf(nil, "awsfake-after:%d", seq))
}

func decodeToken(tok string) (int, bool) {
	b, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil {
		return 0, false
	}
	var n int
	if _, err := fmt.Sscanf(string(b), "awsfake-after:%d", &n); err != nil {
		return 0, false
	}
	return n, true
}

func (s *Server) terminateInstances(q query, now time.Time, reqID string) (any, *apiError) {
	ids := q.list("InstanceId")
	if len(ids) == 0 {
		return nil, badRequest("MissingParameter", "The request must contain the parameter InstanceId")
	}
	found, apiErr := s.lookup(ids)
	if apiErr != nil {
		return nil, apiErr
	}
	resp := terminateInstancesResponse{Xmlns: Namespace, RequestID: reqID}
	for _, in := range found {
		prev := in.State
		switch in.State {
		case "pending", "running", "stopping", "stopped":
			in.State = "shutting-down"
			in.StateReasonCode = "Client.UserInitiatedShutdown"
			in.stateMsg = "Client.UserInitiatedShutdown: User initiated shutdown"
			in.doneAt = now.Add(s.opts.ShuttingDownDuration)
		}
		s.advance(now)
		resp.InstancesSet = append(resp.InstancesSet, xmlStateChange{
			InstanceID:    in.ID,
			CurrentState:  xmlState{Code: stateCodes[in.State], Name: in.State},
			PreviousState: xmlState{Code: stateCodes[prev], Name: prev},
		})
	}
	return resp, nil
}

func (s *Server) oneInstance(q query) (*instance, *apiError) {
	id := q.get("InstanceId")
	if id == "" {
		return nil, badRequest("MissingParameter", "The request must contain the parameter InstanceId")
	}
	found, apiErr := s.lookup([]string{id})
	if apiErr != nil {
		return nil, apiErr
	}
	return found[0], nil
}

func (s *Server) getConsoleOutput(q query, now time.Time, reqID string) (any, *apiError) {
	in, apiErr := s.oneInstance(q)
	if apiErr != nil {
		return nil, apiErr
	}
	resp := getConsoleOutputResponse{Xmlns: Namespace, RequestID: reqID, InstanceID: in.ID, Timestamp: now.UTC().Format(time.RFC3339)}
	out := in.console
	if in.consoleOverride != nil {
		out = *in.consoleOverride
	}
	if !in.ranAt.IsZero() && !now.Before(in.ranAt.Add(s.opts.ConsoleDelay)) && out != "" {
		resp.Output = base64.StdEncoding.EncodeToString([]byte(out))
	}
	return resp, nil
}

func (s *Server) getPasswordData(q query, now time.Time, reqID string) (any, *apiError) {
	in, apiErr := s.oneInstance(q)
	if apiErr != nil {
		return nil, apiErr
	}
	resp := getPasswordDataResponse{Xmlns: Namespace, RequestID: reqID, InstanceID: in.ID, Timestamp: now.UTC().Format(time.RFC3339)}
	if !in.ranAt.IsZero() && !now.Before(in.ranAt.Add(s.opts.PasswordDelay)) {
		resp.PasswordData = in.passwordData
	}
	return resp, nil
}

// instanceAttributes are the attribute names DescribeInstanceAttribute
// knows (API version 2016-11-15).
var instanceAttributes = []string{
	"instanceType", "kernel", "ramdisk", "userData", "disableApiTermination", "instanceInitiatedShutdownBehavior",
	"rootDeviceName", "blockDeviceMapping", "productCodes", "sourceDestCheck", "groupSet", "ebsOptimized",
	"sriovNetSupport", "enaSupport", "enclaveOptions", "disableApiStop",
}

// describeInstanceAttribute serves the userData and instanceType
// attributes. The user data comes back base64-encoded in
// <userData><value>; an instance without user data answers an empty
// <userData/>.
func (s *Server) describeInstanceAttribute(q query, reqID string) (any, *apiError) {
	attr := q.get("Attribute")
	if attr == "" {
		return nil, badRequest("MissingParameter", "The request must contain the parameter Attribute")
	}
	if !slices.Contains(instanceAttributes, attr) {
		return nil, badRequest("InvalidParameterValue", "Value (%s) for parameter attribute is invalid. Unknown attribute.", attr)
	}
	in, apiErr := s.oneInstance(q)
	if apiErr != nil {
		return nil, apiErr
	}
	resp := describeInstanceAttributeResponse{Xmlns: Namespace, RequestID: reqID, InstanceID: in.ID}
	switch attr {
	case "userData":
		resp.UserData = &xmlAttributeValue{}
		if len(in.UserData) > 0 {
			resp.UserData.Value = base64.StdEncoding.EncodeToString(in.UserData)
		}
	case "instanceType":
		resp.InstanceType = &xmlAttributeValue{Value: in.InstanceType}
	default:
		return nil, badRequest("UnsupportedOperation", "awsfake does not serve the instance attribute %s.", attr)
	}
	return resp, nil
}

func (s *Server) importKeyPair(q query, reqID string) (any, *apiError) {
	name := q.get("KeyName")
	if name == "" {
		return nil, badRequest("MissingParameter", "The request must contain the parameter KeyName")
	}
	if _, dup := s.keyPairs[name]; dup {
		return nil, badRequest("InvalidKeyPair.Duplicate", "The keypair '%s' already exists.", name)
	}
	material, err := base64.StdEncoding.DecodeString(q.get("PublicKeyMaterial"))
	if err != nil || len(material) == 0 {
		return nil, badRequest("InvalidKey.Format", "Key is not in valid OpenSSH public key format")
	}
	pub, _, _, _, err := ssh.ParseAuthorizedKey(material)
	if err != nil {
		return nil, badRequest("InvalidKey.Format", "Key is not in valid OpenSSH public key format")
	}
	if t := pub.Type(); t != ssh.KeyAlgoRSA && t != ssh.KeyAlgoED25519 {
		return nil, badRequest("InvalidKey.Format", "Key type %s is not supported; use RSA or ED25519.", t)
	}
	kp := &keyPair{name: name, id: newID("key-", 17), fingerprint: ssh.FingerprintSHA256(pub), pub: pub}
	s.keyPairs[name] = kp
	return importKeyPairResponse{Xmlns: Namespace, RequestID: reqID, KeyFingerprint: kp.fingerprint, KeyName: name, KeyPairID: kp.id}, nil
}

func (s *Server) deleteKeyPair(q query, reqID string) (any, *apiError) {
	name, id := q.get("KeyName"), q.get("KeyPairId")
	if name == "" && id == "" {
		return nil, badRequest("MissingParameter", "The request must contain the parameter KeyName or KeyPairId")
	}
	resp := deleteKeyPairResponse{Xmlns: Namespace, RequestID: reqID, Return: true}
	for n, kp := range s.keyPairs {
		if n == name || kp.id == id {
			resp.KeyPairID = kp.id
			delete(s.keyPairs, n)
		}
	}
	return resp, nil
}
