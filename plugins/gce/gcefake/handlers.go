package gcefake

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"cloud.google.com/go/compute/apiv1/computepb"
	"github.com/mayfly-ci/mayfly/providers/pluginkit"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

var (
	nameRE        = regexp.MustCompile(`^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$`)
	labelKeyRE    = regexp.MustCompile(`^[a-z][a-z0-9_-]{0,62}$`)
	labelValueRE  = regexp.MustCompile(`^[a-z0-9_-]{0,63}$`)
	metadataKeyRE = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,128}$`)
)

const maxBody = 1 << 20

// apiError is Google's JSON error body.
type apiError struct {
	Error struct {
		Code    int           `json:"code"`
		Message string        `json:"message"`
		Errors  []apiErrorRow `json:"errors"`
		Status  string        `json:"status,omitempty"`
	} `json:"error"`
}

type apiErrorRow struct {
	Message string `json:"message"`
	Domain  string `json:"domain"`
	Reason  string `json:"reason"`
}

var grpcStatus = map[int]string{
	400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
	409: "ALREADY_EXISTS", 412: "FAILED_PRECONDITION", 429: "RESOURCE_EXHAUSTED",
	500: "INTERNAL", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}

func writeError(w http.ResponseWriter, code int, reason, msg string) {
	var e apiError
	e.Error.Code = code
	e.Error.Message = msg
	e.Error.Status = grpcStatus[code]
	domain := "global"
	if strings.Contains(reason, "RateLimit") || strings.Contains(reason, "rateLimit") || reason == "quotaExceeded" {
		domain = "usageLimits"
	}
	e.Error.Errors = []apiErrorRow{{Message: msg, Domain: domain, Reason: reason}}
	w.Header().Set("Content-Type", "application/json; charset=UTF-8")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(e)
}

func writeProto(w http.ResponseWriter, m proto.Message) {
	b, err := protojson.Marshal(m)
	if err != nil {
		writeError(w, 500, "backendError", err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=UTF-8")
	_, _ = w.Write(b)
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

// route names the API method of a request and its path parameters.
func route(httpMethod string, parts []string) (method, zone, name string) {
	n := len(parts)
	switch {
	case n == 3 && parts[1] == "aggregated" && parts[2] == "instances" && httpMethod == http.MethodGet:
		return "instances.aggregatedList", "", ""
	case n < 4 || parts[1] != "zones":
		return "", "", ""
	}
	zone = parts[2]
	switch {
	case parts[3] == "instances" && n == 4 && httpMethod == http.MethodPost:
		return "instances.insert", zone, ""
	case parts[3] == "instances" && n == 4 && httpMethod == http.MethodGet:
		return "instances.list", zone, ""
	case parts[3] == "instances" && n == 5 && httpMethod == http.MethodGet:
		return "instances.get", zone, parts[4]
	case parts[3] == "instances" && n == 5 && httpMethod == http.MethodDelete:
		return "instances.delete", zone, parts[4]
	case parts[3] == "instances" && n == 6 && parts[5] == "setMetadata" && httpMethod == http.MethodPost:
		return "instances.setMetadata", zone, parts[4]
	case parts[3] == "instances" && n == 6 && parts[5] == "serialPort" && httpMethod == http.MethodGet:
		return "instances.getSerialPortOutput", zone, parts[4]
	case parts[3] == "instances" && n == 6 && parts[5] == "getGuestAttributes" && httpMethod == http.MethodGet:
		return "instances.getGuestAttributes", zone, parts[4]
	case parts[3] == "operations" && n == 4 && httpMethod == http.MethodGet:
		return "zoneOperations.list", zone, ""
	case parts[3] == "operations" && n == 5 && httpMethod == http.MethodGet:
		return "zoneOperations.get", zone, parts[4]
	case parts[3] == "operations" && n == 6 && parts[5] == "wait" && httpMethod == http.MethodPost:
		return "zoneOperations.wait", zone, parts[4]
	}
	return "", "", ""
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	if r.URL.Path == TokenPath {
		s.serveToken(rw, r) // counted by TokenGrants, not among the API requests
		return
	}
	start := time.Now()
	w := &statusWriter{ResponseWriter: rw}
	method, zone, name := "unknown", "", ""
	defer func() {
		s.mu.Lock()
		s.requests = append(s.requests, Request{Time: start, Method: method, Zone: zone, Name: name, Status: w.status})
		s.mu.Unlock()
	}()
	rest, ok := strings.CutPrefix(r.URL.Path, "/compute/v1/projects/")
	if !ok {
		writeError(w, 404, "notFound", "The requested URL "+r.URL.Path+" was not found on this server.")
		return
	}
	parts := strings.Split(rest, "/")
	m, z, n := route(r.Method, parts)
	if m == "" {
		writeError(w, 404, "notFound", "The requested URL "+r.URL.Path+" was not found on this server.")
		return
	}
	method, zone, name = m, z, n
	if !s.authenticate(w, r) {
		return
	}
	project := parts[0]
	if s.opts.Project != "" && project != s.opts.Project {
		writeError(w, 404, "notFound", fmt.Sprintf("The resource 'projects/%s' was not found", project))
		return
	}
	if s.injectFault(w, method, zone) {
		return
	}
	switch method {
	case "instances.insert":
		s.insert(w, r, project, zone)
	case "instances.list":
		s.list(w, r, project, zone)
	case "instances.aggregatedList":
		s.list(w, r, project, "")
	case "instances.get":
		s.get(w, r, project, zone, name)
	case "instances.delete":
		s.delete(w, r, project, zone, name)
	case "instances.setMetadata":
		s.setMetadata(w, r, project, zone, name)
	case "instances.getSerialPortOutput":
		s.serialPort(w, r, project, zone, name)
	case "instances.getGuestAttributes":
		s.guestAttributes(w, r, project, zone, name)
	case "zoneOperations.list":
		s.listOps(w, r, project, zone)
	case "zoneOperations.get":
		s.getOp(w, r, project, zone, name, false)
	case "zoneOperations.wait":
		s.getOp(w, r, project, zone, name, true)
	}
}

// injectFault answers with an armed HTTP fault, if one matches.
func (s *Server) injectFault(w http.ResponseWriter, method, zone string) bool {
	s.mu.Lock()
	var hit *Fault
	for _, f := range s.faults {
		if f.Times != 0 && (f.Method == "" || f.Method == method) && (f.Zone == "" || f.Zone == zone) {
			hit = f
			if f.Times > 0 {
				f.Times--
			}
			break
		}
	}
	s.mu.Unlock()
	if hit == nil {
		return false
	}
	msg := hit.Message
	if msg == "" {
		switch hit.Reason {
		case "rateLimitExceeded", "userRateLimitExceeded":
			msg = "Rate Limit Exceeded"
		case "quotaExceeded":
			msg = fmt.Sprintf("Quota 'CPUS' exceeded.  Limit: 24.0 in region %s.", region(zone))
		default:
			msg = http.StatusText(hit.Status)
		}
	}
	reason := hit.Reason
	if reason == "" {
		reason = "backendError"
	}
	if hit.RetryAfter != "" {
		w.Header().Set("Retry-After", hit.RetryAfter)
	}
	writeError(w, hit.Status, reason, msg)
	return true
}

func instanceNotFound(w http.ResponseWriter, project, zone, name string) {
	writeError(w, 404, "notFound", fmt.Sprintf("The resource 'projects/%s/zones/%s/instances/%s' was not found", project, zone, name))
}

func invalidField(w http.ResponseWriter, field, value, why string) {
	writeError(w, 400, "invalid", fmt.Sprintf("Invalid value for field '%s': '%s'. %s", field, value, why))
}

// validateInstance checks an insert body the way GCE does for the fields
// the plugin sends; it answers and returns false on the first problem.
func validateInstance(w http.ResponseWriter, zone string, in *computepb.Instance) bool {
	if !nameRE.MatchString(in.GetName()) {
		invalidField(w, "resource.name", in.GetName(), "Must be a match of regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'")
		return false
	}
	mt := in.GetMachineType()
	if i := strings.Index(mt, "zones/"); i < 0 || !strings.Contains(mt, "/machineTypes/") {
		invalidField(w, "resource.machineType", mt, "Must be a URL to a machine type resource.")
		return false
	} else if !strings.HasPrefix(mt[i:], "zones/"+zone+"/") {
		invalidField(w, "resource.machineType", mt, "Machine type specified is in a different scope than the instance.")
		return false
	}
	if len(in.GetLabels()) > 64 {
		invalidField(w, "resource.labels", "", "A resource may have at most 64 labels.")
		return false
	}
	for k, v := range in.GetLabels() {
		if !labelKeyRE.MatchString(k) {
			invalidField(w, "resource.labels", k, "Label key violates format constraints.")
			return false
		}
		if !labelValueRE.MatchString(v) {
			invalidField(w, "resource.labels", v, "Label value violates format constraints.")
			return false
		}
	}
	total := 0
	for _, it := range in.GetMetadata().GetItems() {
		if !metadataKeyRE.MatchString(it.GetKey()) {
			invalidField(w, "resource.metadata", it.GetKey(), "Metadata key violates format constraints.")
			return false
		}
		if len(it.GetValue()) > 256*1024 {
			invalidField(w, "resource.metadata", it.GetKey(), "Metadata value is too long.")
			return false
		}
		total += len(it.GetKey()) + len(it.GetValue())
	}
	if total > 512*1024 {
		invalidField(w, "resource.metadata", "", "Metadata is too large.")
		return false
	}
	boot := 0
	for _, d := range in.GetDisks() {
		if d.GetBoot() {
			boot++
			if d.GetSource() == "" && d.GetInitializeParams().GetSourceImage() == "" {
				invalidField(w, "resource.disks[0].initializeParams.sourceImage", "", "Boot disk needs a source image or a source disk.")
				return false
			}
			if dt := d.GetInitializeParams().GetDiskType(); dt != "" && !strings.Contains(dt, "zones/"+zone+"/diskTypes/") {
				invalidField(w, "resource.disks[0].initializeParams.diskType", dt, "Disk type is in a different zone than the instance.")
				return false
			}
		}
	}
	if boot != 1 {
		invalidField(w, "resource.disks", "", "Exactly one boot disk is required.")
		return false
	}
	if len(in.GetNetworkInterfaces()) == 0 {
		invalidField(w, "resource.networkInterfaces", "", "At least one network interface is required.")
		return false
	}
	sc := in.GetScheduling()
	if (sc.GetPreemptible() || sc.GetProvisioningModel() == "SPOT") && sc.AutomaticRestart != nil && sc.GetAutomaticRestart() {
		invalidField(w, "resource.scheduling.automaticRestart", "true", "Preemptible and spot instances cannot be restarted automatically.")
		return false
	}
	if (sc.GetPreemptible() || sc.GetProvisioningModel() == "SPOT") && sc.GetOnHostMaintenance() != "TERMINATE" {
		invalidField(w, "resource.scheduling.onHostMaintenance", sc.GetOnHostMaintenance(), "Preemptible and spot instances must terminate on host maintenance.")
		return false
	}
	return true
}

func (s *Server) insert(w http.ResponseWriter, r *http.Request, project, zone string) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody))
	if err != nil {
		writeError(w, 400, "parseError", err.Error())
		return
	}
	in := &computepb.Instance{}
	if err := (protojson.UnmarshalOptions{}).Unmarshal(body, in); err != nil {
		writeError(w, 400, "parseError", "Invalid JSON payload received. "+err.Error())
		return
	}
	if !validateInstance(w, zone, in) {
		return
	}
	s.mu.Lock()
	answer, created := s.insertLocked(w, s.baseURL(r, project), project, zone, in, time.Now())
	s.mu.Unlock()
	s.answer(w, answer, created)
}

// insertLocked creates the instance of an insert; it returns the answer
// and the new instance, or answers an error itself and returns nil.
// s.mu is held.
func (s *Server) insertLocked(w http.ResponseWriter, base, project, zone string, in *computepb.Instance, now time.Time) (proto.Message, *InstanceInfo) {
	s.advanceLocked(now)
	key := zone + "/" + in.GetName()
	if s.instances[key] != nil {
		writeError(w, 409, "alreadyExists", fmt.Sprintf("The resource 'projects/%s/zones/%s/instances/%s' already exists", project, zone, in.GetName()))
		return nil, nil
	}
	id := newID()
	target := fmt.Sprintf("%s/zones/%s/instances/%s", base, zone, in.GetName())
	if oerr, status, msg := s.insertFaultLocked(project, zone); oerr != nil {
		op := s.newOpLocked(base, zone, "insert", target, id, now)
		op.err, op.status, op.msg = oerr, status, msg
		return s.opView(op, now, true), nil
	}

	mtName := in.GetMachineType()[strings.LastIndexByte(in.GetMachineType(), '/')+1:]
	res := proto.CloneOf(in)
	res.Kind = proto.String("compute#instance")
	res.Id = proto.Uint64(id)
	res.CreationTimestamp = proto.String(timestamp(now))
	res.Zone = proto.String(base + "/zones/" + zone)
	res.MachineType = proto.String(fmt.Sprintf("%s/zones/%s/machineTypes/%s", base, zone, mtName))
	res.Status = proto.String("PROVISIONING")
	res.SelfLink = proto.String(target)
	res.CpuPlatform = proto.String("Intel Broadwell")
	res.Fingerprint = proto.String(newFingerprint())
	res.LabelFingerprint = proto.String(newFingerprint())
	if res.Metadata == nil {
		res.Metadata = &computepb.Metadata{}
	}
	res.Metadata.Kind = proto.String("compute#metadata")
	res.Metadata.Fingerprint = proto.String(newFingerprint())
	windows := false
	for i, d := range res.Disks {
		d.Kind = proto.String("compute#attachedDisk")
		d.Index = proto.Int32(int32(i))
		d.Mode = proto.String("READ_WRITE")
		d.Interface = proto.String("SCSI")
		if d.DeviceName == nil {
			d.DeviceName = proto.String(in.GetName())
		}
		d.Source = proto.String(fmt.Sprintf("%s/zones/%s/disks/%s", base, zone, in.GetName()))
		if d.GetBoot() && strings.Contains(d.GetInitializeParams().GetSourceImage(), "windows") {
			windows = true
		}
		d.InitializeParams = nil // GCE does not return initializeParams
	}
	for i, nic := range res.NetworkInterfaces {
		s.ipSeq++
		nic.Kind = proto.String("compute#networkInterface")
		nic.Name = proto.String(fmt.Sprintf("nic%d", i))
		nic.NetworkIP = proto.String(fmt.Sprintf("10.128.%d.%d", s.ipSeq/250, s.ipSeq%250+2))
		if s.opts.Address != "" {
			nic.NetworkIP = proto.String(s.opts.Address)
		}
		if !strings.HasPrefix(nic.GetNetwork(), "http") && nic.GetNetwork() != "" {
			nic.Network = proto.String(base + "/" + nic.GetNetwork())
		}
		for _, ac := range nic.AccessConfigs {
			ac.Kind = proto.String("compute#accessConfig")
			// TEST-NET-3 addresses: data only, the tests never connect.
			ac.NatIP = proto.String(fmt.Sprintf("203.0.113.%d", s.ipSeq%250+2))
			if s.opts.Address != "" {
				ac.NatIP = proto.String(s.opts.Address)
			}
			ac.NetworkTier = proto.String("PREMIUM")
		}
	}
	in2 := &instance{
		res: res, zone: zone, created: now, bootAt: now.Add(s.opts.BootDelay), windows: windows,
		serial: map[int32][]byte{}, attrs: map[string]string{}, answered: map[string]bool{},
		passwords: map[string]string{}, hostKeys: map[string]string{},
	}
	s.instances[key] = in2
	op := s.newOpLocked(base, zone, "insert", target, id, now)
	s.advanceLocked(now) // a zero BootDelay boots at once
	info := s.infoLocked(in2)
	return s.opView(op, now, true), &info
}

// answer sends answer, if any, after telling Options.OnMetadata about
// changed, if any. s.mu is not held.
func (s *Server) answer(w http.ResponseWriter, answer proto.Message, changed *InstanceInfo) {
	if answer == nil {
		return
	}
	if changed != nil && s.opts.OnMetadata != nil {
		s.opts.OnMetadata(*changed)
	}
	writeProto(w, answer)
}

// insertFaultLocked returns the operation error an insert in zone gets,
// if any: an armed OpFault, or the region's instance quota.
func (s *Server) insertFaultLocked(project, zone string) (*computepb.Error, int32, string) {
	for _, f := range s.opFaults {
		if f.Times == 0 || (f.Zone != "" && f.Zone != zone) {
			continue
		}
		if f.Times > 0 {
			f.Times--
		}
		msg, status := f.Message, int32(f.HTTPStatus)
		switch f.Code {
		case CodeZoneExhausted:
			if msg == "" {
				msg = fmt.Sprintf("The zone 'projects/%s/zones/%s' does not have enough resources available to fulfill the request.  Try a different zone, or try again later.", project, zone)
			}
			if status == 0 {
				status = 503
			}
		case CodeQuotaExceeded:
			if msg == "" {
				msg = fmt.Sprintf("Quota 'CPUS' exceeded.  Limit: 24.0 in region %s.", region(zone))
			}
			if status == 0 {
				status = 403
			}
		}
		if status == 0 {
			status = 400
		}
		if msg == "" {
			msg = f.Code
		}
		return &computepb.Error{Errors: []*computepb.Errors{{Code: proto.String(f.Code), Message: proto.String(msg)}}}, status, msg
	}
	if limit := s.quota[region(zone)]; limit > 0 {
		used := 0
		for _, in := range s.instances {
			if region(in.zone) == region(zone) {
				used++
			}
		}
		if used >= limit {
			msg := fmt.Sprintf("Quota 'INSTANCES' exceeded.  Limit: %d.0 in region %s.", limit, region(zone))
			return &computepb.Error{Errors: []*computepb.Errors{{Code: proto.String(CodeQuotaExceeded), Message: proto.String(msg)}}}, 403, msg
		}
	}
	return nil, 0, ""
}

func (s *Server) newOpLocked(base, zone, kind, target string, targetID uint64, now time.Time) *operation {
	s.opSeq++
	name := fmt.Sprintf("operation-%d-%x-%08x", now.UnixMilli(), s.opSeq, uint32(newID()))
	op := &operation{
		seq:    s.opSeq,
		zone:   zone,
		doneAt: now.Add(s.opts.OperationDelay),
		res: &computepb.Operation{
			Kind:          proto.String("compute#operation"),
			Id:            proto.Uint64(newID()),
			Name:          proto.String(name),
			Zone:          proto.String(base + "/zones/" + zone),
			OperationType: proto.String(kind),
			TargetLink:    proto.String(target),
			TargetId:      proto.Uint64(targetID),
			User:          proto.String("mayfly-test@example.iam.gserviceaccount.com"),
			InsertTime:    proto.String(timestamp(now)),
			StartTime:     proto.String(timestamp(now)),
			SelfLink:      proto.String(fmt.Sprintf("%s/zones/%s/operations/%s", base, zone, name)),
		},
	}
	s.ops[name] = op
	return op
}

// opView renders an operation as of now. The answer to the call that
// started it always shows it RUNNING, as GCE does.
func (s *Server) opView(op *operation, now time.Time, first bool) *computepb.Operation {
	v := proto.CloneOf(op.res)
	if first || now.Before(op.doneAt) {
		v.Status = computepb.Operation_RUNNING.Enum()
		v.Progress = proto.Int32(0)
		return v
	}
	v.Status = computepb.Operation_DONE.Enum()
	v.Progress = proto.Int32(100)
	v.EndTime = proto.String(timestamp(op.doneAt))
	if op.err != nil {
		v.Error = proto.CloneOf(op.err)
		v.HttpErrorStatusCode = proto.Int32(op.status)
		v.HttpErrorMessage = proto.String(strings.ToUpper(http.StatusText(int(op.status))))
	}
	return v
}

func (s *Server) getOp(w http.ResponseWriter, r *http.Request, project, zone, name string, wait bool) {
	deadline := time.Now().Add(s.opts.MaxWait)
	for {
		now := time.Now()
		s.mu.Lock()
		op := s.ops[name]
		if op == nil || op.zone != zone {
			s.mu.Unlock()
			writeError(w, 404, "notFound", fmt.Sprintf("The resource 'projects/%s/zones/%s/operations/%s' was not found", project, zone, name))
			return
		}
		doneAt := op.doneAt
		if !wait || !now.Before(doneAt) || !now.Before(deadline) {
			v := s.opView(op, now, false)
			s.mu.Unlock()
			writeProto(w, v)
			return
		}
		s.mu.Unlock()
		d := min(doneAt.Sub(now), deadline.Sub(now))
		if pluginkit.Sleep(r.Context(), d) != nil {
			return
		}
	}
}

func (s *Server) lookupLocked(w http.ResponseWriter, project, zone, name string) *instance {
	s.advanceLocked(time.Now())
	in := s.instances[zone+"/"+name]
	if in == nil {
		instanceNotFound(w, project, zone, name)
	}
	return in
}

func (s *Server) get(w http.ResponseWriter, _ *http.Request, project, zone, name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if in := s.lookupLocked(w, project, zone, name); in != nil {
		writeProto(w, in.res)
	}
}

func (s *Server) delete(w http.ResponseWriter, r *http.Request, project, zone, name string) {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	in := s.lookupLocked(w, project, zone, name)
	if in == nil {
		return
	}
	if in.deleteAt.IsZero() {
		in.deleteAt = now.Add(s.opts.DeleteDelay)
		in.res.Status = proto.String("STOPPING")
		in.agentDue = nil
	}
	op := s.newOpLocked(s.baseURL(r, project), zone, "delete", in.res.GetSelfLink(), in.res.GetId(), now)
	s.advanceLocked(now) // a zero DeleteDelay deletes at once
	writeProto(w, s.opView(op, now, true))
}

func (s *Server) setMetadata(w http.ResponseWriter, r *http.Request, project, zone, name string) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody))
	if err != nil {
		writeError(w, 400, "parseError", err.Error())
		return
	}
	md := &computepb.Metadata{}
	if err := (protojson.UnmarshalOptions{}).Unmarshal(body, md); err != nil {
		writeError(w, 400, "parseError", "Invalid JSON payload received. "+err.Error())
		return
	}
	for _, it := range md.GetItems() {
		if !metadataKeyRE.MatchString(it.GetKey()) {
			invalidField(w, "metadata", it.GetKey(), "Metadata key violates format constraints.")
			return
		}
	}
	s.mu.Lock()
	answer, changed := s.setMetadataLocked(w, s.baseURL(r, project), project, zone, name, md, time.Now())
	s.mu.Unlock()
	s.answer(w, answer, changed)
}

// setMetadataLocked replaces the metadata of an instance; it returns the
// answer and the changed instance, or answers an error itself and returns
// nil. s.mu is held.
func (s *Server) setMetadataLocked(w http.ResponseWriter, base, project, zone, name string, md *computepb.Metadata, now time.Time) (proto.Message, *InstanceInfo) {
	in := s.lookupLocked(w, project, zone, name)
	if in == nil {
		return nil, nil
	}
	if md.GetFingerprint() != in.res.GetMetadata().GetFingerprint() {
		writeError(w, 412, "conditionNotMet", "Supplied fingerprint does not match current metadata fingerprint.")
		return nil, nil
	}
	in.res.Metadata = &computepb.Metadata{
		Kind:        proto.String("compute#metadata"),
		Fingerprint: proto.String(newFingerprint()),
		Items:       md.GetItems(),
	}
	if in.windows && in.res.GetStatus() == "RUNNING" {
		s.queueWindowsKeysLocked(in, now)
	}
	op := s.newOpLocked(base, zone, "setMetadata", in.res.GetSelfLink(), in.res.GetId(), now)
	info := s.infoLocked(in)
	return s.opView(op, now, true), &info
}

func (s *Server) serialPort(w http.ResponseWriter, r *http.Request, project, zone, name string) {
	q := r.URL.Query()
	port := int64(1)
	if v := q.Get("port"); v != "" {
		p, err := strconv.ParseInt(v, 10, 32)
		if err != nil || p < 1 || p > 4 {
			invalidField(w, "port", v, "Must be between 1 and 4.")
			return
		}
		port = p
	}
	start := int64(0)
	if v := q.Get("start"); v != "" {
		p, err := strconv.ParseInt(v, 10, 64)
		if err != nil || p < 0 {
			invalidField(w, "start", v, "Must be a non-negative integer.")
			return
		}
		start = p
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	in := s.lookupLocked(w, project, zone, name)
	if in == nil {
		return
	}
	buf := in.serial[int32(port)]
	if start > int64(len(buf)) {
		start = int64(len(buf))
	}
	writeProto(w, &computepb.SerialPortOutput{
		Kind:     proto.String("compute#serialPortOutput"),
		Contents: proto.String(string(buf[start:])),
		Start:    proto.Int64(start),
		Next:     proto.Int64(int64(len(buf))),
		SelfLink: proto.String(in.res.GetSelfLink() + "/serialPort?port=" + strconv.FormatInt(port, 10)),
	})
}

func (s *Server) guestAttributes(w http.ResponseWriter, r *http.Request, project, zone, name string) {
	q := r.URL.Query()
	s.mu.Lock()
	defer s.mu.Unlock()
	in := s.lookupLocked(w, project, zone, name)
	if in == nil {
		return
	}
	notFound := func(what string) {
		writeError(w, 404, "notFound", fmt.Sprintf("The resource 'projects/%s/zones/%s/instances/%s/guestAttributes/%s' was not found", project, zone, name, what))
	}
	if key := q.Get("variableKey"); key != "" {
		v, ok := in.attrs[key]
		if !ok {
			notFound(key)
			return
		}
		writeProto(w, &computepb.GuestAttributes{
			Kind: proto.String("compute#guestAttributes"), VariableKey: proto.String(key), VariableValue: proto.String(v),
			SelfLink: proto.String(in.res.GetSelfLink() + "/guestAttributes/" + key),
		})
		return
	}
	qp := q.Get("queryPath")
	var items []*computepb.GuestAttributesEntry
	for _, k := range slices.Sorted(maps.Keys(in.attrs)) {
		if !strings.HasPrefix(k, qp) {
			continue
		}
		ns, key, _ := strings.Cut(k, "/")
		items = append(items, &computepb.GuestAttributesEntry{Namespace: proto.String(ns), Key: proto.String(key), Value: proto.String(in.attrs[k])})
	}
	if len(items) == 0 {
		notFound(qp)
		return
	}
	writeProto(w, &computepb.GuestAttributes{
		Kind:       proto.String("compute#guestAttributes"),
		QueryPath:  proto.String(qp),
		QueryValue: &computepb.GuestAttributesValue{Items: items},
		SelfLink:   proto.String(in.res.GetSelfLink() + "/guestAttributes/" + qp),
	})
}

// list serves instances.list (zone != "") and instances.aggregatedList.
func (s *Server) list(w http.ResponseWriter, r *http.Request, project, zone string) {
	q := r.URL.Query()
	match, err := parseFilter(q.Get("filter"), instanceFields)
	if err != nil {
		invalidField(w, "filter", q.Get("filter"), err.Error())
		return
	}
	max, offset, ok := paging(w, q)
	if !ok {
		return
	}
	base := s.baseURL(r, project)
	s.mu.Lock()
	s.advanceLocked(time.Now())
	var all []*instance
	zones := map[string]bool{}
	for _, key := range slices.Sorted(maps.Keys(s.instances)) {
		in := s.instances[key]
		zones[in.zone] = true
		if (zone == "" || in.zone == zone) && match(in.res) {
			all = append(all, in)
		}
	}
	unreachable := maps.Clone(s.unreachable)
	var page []*computepb.Instance
	pageZones := map[string][]*computepb.Instance{}
	next := ""
	if offset < len(all) {
		end := min(offset+max, len(all))
		for _, in := range all[offset:end] {
			c := proto.CloneOf(in.res)
			page = append(page, c)
			pageZones[in.zone] = append(pageZones[in.zone], c)
		}
		if end < len(all) {
			next = pageToken(end)
		}
	}
	s.mu.Unlock()

	if zone != "" {
		res := &computepb.InstanceList{
			Kind:     proto.String("compute#instanceList"),
			Id:       proto.String(fmt.Sprintf("projects/%s/zones/%s/instances", project, zone)),
			Items:    page,
			SelfLink: proto.String(fmt.Sprintf("%s/zones/%s/instances", base, zone)),
		}
		if next != "" {
			res.NextPageToken = proto.String(next)
		}
		writeProto(w, res)
		return
	}
	items := map[string]*computepb.InstancesScopedList{}
	for z := range zones {
		scope := "zones/" + z
		items[scope] = &computepb.InstancesScopedList{Warning: &computepb.Warning{
			Code:    proto.String("NO_RESULTS_ON_PAGE"),
			Message: proto.String(fmt.Sprintf("There are no results for scope '%s' on this page.", scope)),
			Data:    []*computepb.Data{{Key: proto.String("scope"), Value: proto.String(scope)}},
		}}
	}
	for z, list := range pageZones {
		items["zones/"+z] = &computepb.InstancesScopedList{Instances: list}
	}
	for z, on := range unreachable {
		if on {
			scope := "zones/" + z
			items[scope] = &computepb.InstancesScopedList{Warning: &computepb.Warning{
				Code:    proto.String("UNREACHABLE"),
				Message: proto.String(fmt.Sprintf("Scope '%s' is unreachable.", scope)),
				Data:    []*computepb.Data{{Key: proto.String("scope"), Value: proto.String(scope)}},
			}}
		}
	}
	res := &computepb.InstanceAggregatedList{
		Kind:     proto.String("compute#instanceAggregatedList"),
		Id:       proto.String(fmt.Sprintf("projects/%s/aggregated/instances", project)),
		Items:    items,
		SelfLink: proto.String(base + "/aggregated/instances"),
	}
	if next != "" {
		res.NextPageToken = proto.String(next)
	}
	writeProto(w, res)
}

// paging reads maxResults and pageToken; it answers an error itself and
// returns false when one is bad.
func paging(w http.ResponseWriter, q url.Values) (max, offset int, ok bool) {
	max = 500
	if v := q.Get("maxResults"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 || n > 500 {
			invalidField(w, "maxResults", v, "Must be less than or equal to 500")
			return 0, 0, false
		}
		if n > 0 {
			max = n
		}
	}
	if tok := q.Get("pageToken"); tok != "" {
		b, err := base64.RawURLEncoding.DecodeString(tok)
		n, err2 := strconv.Atoi(strings.TrimPrefix(string(b), "offset:"))
		if err != nil || err2 != nil || n < 0 {
			invalidField(w, "pageToken", tok, "Invalid page token.")
			return 0, 0, false
		}
		offset = n
	}
	return max, offset, true
}

// pageToken is the token of the page starting at offset.
func pageToken(offset int) string {
	return base64.RawURLEncoding.EncodeToString([]byte("offset:" + strconv.Itoa(offset)))
}

// listOps serves zoneOperations.list: the zone's operations, oldest first.
func (s *Server) listOps(w http.ResponseWriter, r *http.Request, project, zone string) {
	q := r.URL.Query()
	match, err := parseFilter(q.Get("filter"), operationFields)
	if err != nil {
		invalidField(w, "filter", q.Get("filter"), err.Error())
		return
	}
	max, offset, ok := paging(w, q)
	if !ok {
		return
	}
	now := time.Now()
	s.mu.Lock()
	var all []*computepb.Operation
	for _, op := range s.sortedOpsLocked(zone) {
		if v := s.opView(op, now, false); match(v) {
			all = append(all, v)
		}
	}
	s.mu.Unlock()
	res := &computepb.OperationList{
		Kind:     proto.String("compute#operationList"),
		Id:       proto.String(fmt.Sprintf("projects/%s/zones/%s/operations", project, zone)),
		SelfLink: proto.String(fmt.Sprintf("%s/zones/%s/operations", s.baseURL(r, project), zone)),
	}
	if offset < len(all) {
		end := min(offset+max, len(all))
		res.Items = all[offset:end]
		if end < len(all) {
			res.NextPageToken = proto.String(pageToken(end))
		}
	}
	writeProto(w, res)
}
