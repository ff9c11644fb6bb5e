// Package gce is the mayfly provider for Google Compute Engine: one VM per
// instance, created with instances.insert through the official Go SDK
// (cloud.google.com/go/compute, REST transport), labelled with the manager's
// identity, reached over SSH with a per-instance ephemeral key (Linux) or
// over WinRM with a password from the GCE password-reset flow (Windows).
//
// Instance ids are "<zone>/<name>", so Delete and ConnectInfo need no
// lookup and work after a plugin restart.
//
// Every API request passes one rate limiter per plugin (see Settings
// RateLimit); rate-limit answers pause all requests and halve the rate
// instead of being retried. The plugin makes no retries of its own (the
// SDK's are switched off too): the fleet owns the retry policy.
//
// API requests per instance: instances.insert and zoneOperations.wait (one
// more wait per two minutes the operation runs) in Create;
// instances.delete in Delete (its operation is not waited for: List shows
// the instance deleting until it is gone). ConnectInfo adds
// instances.getGuestAttributes until the host key is known (Linux) or one
// instances.getSerialPortOutput per PollInterval until the password is
// there (Windows), plus instances.get when the last List had no address.
// List is one instances.aggregatedList per page for the whole group.
//
// Settings example:
//
//	{
//	  "project": "my-ci-project",
//	  "zones": ["us-east1-b", "us-east1-c", "us-east1-d"],
//	  "machine_type": "n1-standard-1",
//	  "image_family": "mayfly-runner", "image_project": "my-ci-project",
//	  "disk_size_gb": 25, "disk_type": "pd-balanced",
//	  "network": "ci", "subnetwork": "runners", "network_tags": ["mayfly-vm"],
//	  "no_external_ip": true,
//	  "spot": true,
//	  "manager": "runner-manager-1",
//	  "rate_limit": 5, "rate_burst": 10
//	}
package gce

import (
	"context"
	"crypto/rand"
	"encoding/base32"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	compute "cloud.google.com/go/compute/apiv1"
	"cloud.google.com/go/compute/apiv1/computepb"
	"github.com/googleapis/gax-go/v2"
	"google.golang.org/api/iterator"
	"google.golang.org/api/option"
	htransport "google.golang.org/api/transport/http"
	"google.golang.org/protobuf/proto"

	"github.com/mayfly-ci/mayfly/providers"
)

// Version is the plugin version reported by Init.
const Version = "gce/1"

const (
	// apiCallTimeout bounds one API request.
	apiCallTimeout = time.Minute
	// waitCallTimeout bounds one zoneOperations.wait, which GCE answers
	// within about two minutes even when the operation is not done.
	waitCallTimeout = 150 * time.Second
	// maxWaitCalls bounds the zoneOperations.wait calls per operation.
	maxWaitCalls = 50
	// secretTTL is how long key material of an instance absent from List
	// is kept (it may be absent because List raced its creation).
	secretTTL = 15 * time.Minute
)

// Operation statuses and instance statuses of the Compute API.
const (
	statusProvisioning = "PROVISIONING"
	statusStaging      = "STAGING"
	statusRunning      = "RUNNING"
	statusStopping     = "STOPPING"
	statusStopped      = "STOPPED"
	statusSuspending   = "SUSPENDING"
	statusSuspended    = "SUSPENDED"
	statusRepairing    = "REPAIRING"
	statusTerminated   = "TERMINATED"
)

// noRetry disables the SDK's own retries: every request is one request.
var noRetry = gax.WithRetry(func() gax.Retryer { return nil })

// Options configure a Provider.
type Options struct {
	// Logger receives the plugin's logs (default slog.Default()).
	Logger *slog.Logger
	// Transport is the HTTP transport under the rate limiter (default a
	// clone of http.DefaultTransport).
	Transport http.RoundTripper
}

// Provider is the GCE providers.Provider. It is safe for concurrent use.
type Provider struct {
	log  *slog.Logger
	base http.RoundTripper

	mu        sync.Mutex
	s         Settings
	inited    bool
	closed    bool
	lim       *limiter
	instances *compute.InstancesClient
	ops       *compute.ZoneOperationsClient
	zoneCool  map[string]time.Time
	secrets   map[string]*secret
	cache     map[string]*computepb.Instance // from List, for ConnectInfo
	deleting  map[string]time.Time
}

var _ providers.Provider = (*Provider)(nil)

// New returns an uninitialised provider.
func New(opts Options) *Provider {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Transport == nil {
		opts.Transport = http.DefaultTransport.(*http.Transport).Clone()
	}
	return &Provider{
		log:      opts.Logger,
		base:     opts.Transport,
		zoneCool: map[string]time.Time{},
		secrets:  map[string]*secret{},
		cache:    map[string]*computepb.Instance{},
		deleting: map[string]time.Time{},
	}
}

// Init implements providers.Provider. It makes no API call: credentials
// and settings are checked by the first real call.
func (p *Provider) Init(ctx context.Context, raw json.RawMessage) (providers.Info, error) {
	s, err := decodeSettings(raw, p.log)
	if err != nil {
		return providers.Info{}, err
	}
	lim := newLimiter(p.base, s.RateLimit, s.RateBurst, time.Duration(s.ThrottleBackoff), p.log)
	// The clients outlive this call: their setup must not end with ctx.
	cctx := context.WithoutCancel(ctx)
	var opts []option.ClientOption
	if s.Endpoint != "" {
		opts = append(opts, option.WithEndpoint(s.Endpoint))
	}
	if s.WithoutAuthentication {
		opts = append(opts, option.WithHTTPClient(&http.Client{Transport: lim}))
	} else {
		// The limiter sits under the authenticating transport, so it sees
		// every API request (token requests go their own way).
		auth := []option.ClientOption{option.WithScopes(compute.DefaultAuthScopes()...)}
		if s.CredentialsFile != "" {
			auth = append(auth, option.WithAuthCredentialsFile(option.ServiceAccount, s.CredentialsFile))
		}
		tr, err := htransport.NewTransport(cctx, lim, auth...)
		if err != nil {
			return providers.Info{}, providers.Permanent(fmt.Errorf("gce: credentials: %w", err))
		}
		opts = append(opts, option.WithHTTPClient(&http.Client{Transport: tr}))
	}
	ic, err := compute.NewInstancesRESTClient(cctx, opts...)
	if err != nil {
		return providers.Info{}, providers.Permanent(fmt.Errorf("gce: instances client: %w", err))
	}
	oc, err := compute.NewZoneOperationsRESTClient(cctx, opts...)
	if err != nil {
		ic.Close()
		return providers.Info{}, providers.Permanent(fmt.Errorf("gce: zone operations client: %w", err))
	}

	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		ic.Close()
		oc.Close()
		return providers.Info{}, providers.ErrClosed
	}
	if p.inited {
		p.instances.Close()
		p.ops.Close()
	}
	p.s, p.lim, p.instances, p.ops, p.inited = s, lim, ic, oc, true
	p.log.Info("gce provider initialised", "project", s.Project, "zones", s.Zones,
		"machine_type", s.MachineType, "os", s.OS, "rate_limit", s.RateLimit, "rate_burst", s.RateBurst)
	return providers.Info{
		ID:      fmt.Sprintf("gce/%s/%s/%s", s.Project, strings.Join(s.Zones, ","), s.NamePrefix),
		MaxSize: s.MaxSize,
		Version: Version,
	}, nil
}

// client returns the settings and clients, or an error before Init or after
// Shutdown.
func (p *Provider) client() (Settings, *compute.InstancesClient, *compute.ZoneOperationsClient, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.closed:
		return Settings{}, nil, nil, providers.ErrClosed
	case !p.inited:
		return Settings{}, nil, nil, providers.Permanent(errors.New("gce: provider not initialised"))
	}
	return p.s, p.instances, p.ops, nil
}

// APIStats reports the plugin's use of the Compute API.
type APIStats struct {
	// Calls counts requests sent, per API method (e.g. instances.insert).
	Calls map[string]int
	// Throttled counts rate-limit answers.
	Throttled int
	// Waited is the total time requests waited for the limiter.
	Waited time.Duration
	// Rate is the limiter's current rate (requests/s).
	Rate float64
	// PauseLeft is what remains of the pause after a rate-limit answer.
	PauseLeft time.Duration
}

// Stats returns the API use since Init.
func (p *Provider) Stats() APIStats {
	p.mu.Lock()
	lim := p.lim
	p.mu.Unlock()
	if lim == nil {
		return APIStats{}
	}
	return APIStats(lim.stats())
}

// splitID splits an instance id into zone and name.
func splitID(id string) (zone, name string, ok bool) {
	zone, name, ok = strings.Cut(id, "/")
	if !ok || !zoneRE.MatchString(zone) || !nameRE.MatchString(name) {
		return "", "", false
	}
	return zone, name, true
}

func instanceID(zone, name string) string { return zone + "/" + name }

var nameEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// newName returns prefix-<12 random characters>.
func newName(prefix string) string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return prefix + "-" + nameEncoding.EncodeToString(b)[:12]
}

// Create implements providers.Provider: one instances.insert per instance
// (in parallel, at most CreateConcurrency at once), each followed by
// zoneOperations.wait until the operation is done. A zone out of capacity
// is skipped for ZoneCooldown and the next zone is tried.
func (p *Provider) Create(ctx context.Context, n int, labels map[string]string) ([]string, error) {
	s, _, _, err := p.client()
	if err != nil {
		return nil, err
	}
	switch {
	case n < 0:
		return nil, providers.InvalidArgument(fmt.Errorf("create %d instances: count is negative", n))
	case n == 0:
		return nil, nil
	}
	mgr := labels[providers.LabelManager]
	if mgr == "" {
		return nil, providers.InvalidArgument(fmt.Errorf("create: label %q is required (List finds instances by it)", providers.LabelManager))
	}
	if s.Manager != "" && mgr != s.Manager {
		return nil, providers.InvalidArgument(fmt.Errorf("create: label %s=%q differs from settings manager %q; List would not see the instance",
			providers.LabelManager, mgr, s.Manager))
	}
	gl, err := gceLabels(labels)
	if err != nil {
		return nil, providers.InvalidArgument(fmt.Errorf("create: %w", err))
	}
	stored, err := json.Marshal(labels)
	if err != nil {
		return nil, providers.InvalidArgument(fmt.Errorf("create: labels: %w", err))
	}

	var (
		mu   sync.Mutex
		ids  []string
		errs []error
		left = n
		wg   sync.WaitGroup
	)
	for range min(n, s.CreateConcurrency) {
		wg.Go(func() {
			for {
				mu.Lock()
				if left == 0 {
					mu.Unlock()
					return
				}
				left--
				if err := ctx.Err(); err != nil {
					errs = append(errs, providers.Transient(fmt.Errorf("create instance: %w", err)))
					mu.Unlock()
					continue
				}
				mu.Unlock()
				id, err := p.createOne(ctx, s, gl, string(stored))
				mu.Lock()
				if id != "" {
					ids = append(ids, id)
				}
				if err != nil {
					errs = append(errs, err)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	slices.Sort(ids)
	return ids, errors.Join(errs...)
}

// zoneOrder returns the zones to try: those not cooling down in settings
// order, then the cooling ones (a last resort).
func (p *Provider) zoneOrder(s Settings) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	var fresh, cooling []string
	for _, z := range s.Zones {
		if now.Before(p.zoneCool[z]) {
			cooling = append(cooling, z)
		} else {
			fresh = append(fresh, z)
		}
	}
	return append(fresh, cooling...)
}

func (p *Provider) coolZone(zone string, d time.Duration) {
	p.mu.Lock()
	p.zoneCool[zone] = time.Now().Add(d)
	p.mu.Unlock()
}

// createOne creates one instance, falling back through the zones on
// capacity exhaustion. It returns the id when the instance exists or may
// exist (an operation whose outcome is unknown), so that it is tracked.
func (p *Provider) createOne(ctx context.Context, s Settings, labels map[string]string, stored string) (string, error) {
	name := newName(s.NamePrefix)
	sec, err := newSecret(s)
	if err != nil {
		return "", fmt.Errorf("create instance %s: %w", name, err)
	}
	_, ic, _, err := p.client()
	if err != nil {
		return "", err
	}
	var exhausted []string
	var lastErr error
	for _, zone := range p.zoneOrder(s) {
		id := instanceID(zone, name)
		res, err := p.instanceResource(s, zone, name, labels, stored, sec)
		if err != nil {
			return "", fmt.Errorf("create instance %s: %w", id, err)
		}
		cctx, cancel := context.WithTimeout(ctx, apiCallTimeout)
		op, err := ic.Insert(cctx, &computepb.InsertInstanceRequest{Project: s.Project, Zone: zone, InstanceResource: res}, noRetry)
		cancel()
		if err == nil {
			err = p.waitOp(ctx, s, zone, op.Proto())
			if err == nil {
				p.putSecret(id, sec)
				p.log.Info("instance created", "id", id, "zone", zone)
				return id, nil
			}
			if !isCapacity(err) && !isDefinite(err) {
				// The insert was accepted and its outcome is unknown: the
				// instance may exist, so hand its id out to be tracked.
				p.putSecret(id, sec)
				return id, fmt.Errorf("create instance %s: %w", id, err)
			}
		} else {
			err = classify(err, zone)
		}
		if !isCapacity(err) {
			return "", fmt.Errorf("create instance %s: %w", id, err)
		}
		p.coolZone(zone, time.Duration(s.ZoneCooldown))
		p.log.Warn("zone out of capacity; trying the next zone", "zone", zone, "instance", name, "error", err)
		exhausted = append(exhausted, zone)
		lastErr = err
	}
	return "", providers.CapacityExhausted(strings.Join(exhausted, ","), fmt.Errorf("create instance %s in every zone: %w", name, lastErr))
}

func isCapacity(err error) bool {
	_, ok := providers.IsCapacityExhausted(err)
	return ok
}

// isDefinite reports whether err is a failed operation whose instance
// certainly does not exist (the operation finished with an error).
func isDefinite(err error) bool {
	var oe *opFailed
	return errors.As(err, &oe)
}

// opFailed marks an error reported by a finished operation.
type opFailed struct{ err error }

func (e *opFailed) Error() string { return e.err.Error() }
func (e *opFailed) Unwrap() error { return e.err }

// waitOp waits for a zone operation to finish, with zoneOperations.wait,
// bounded by OperationTimeout and maxWaitCalls. A failed operation's error
// is classified and wrapped in *opFailed.
func (p *Provider) waitOp(ctx context.Context, s Settings, zone string, op *computepb.Operation) error {
	_, _, oc, err := p.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, time.Duration(s.OperationTimeout))
	defer cancel()
	for i := 0; op.GetStatus() != computepb.Operation_DONE; i++ {
		if i >= maxWaitCalls {
			return providers.Transient(fmt.Errorf("operation %s not done after %d waits", op.GetName(), i))
		}
		wctx, wcancel := context.WithTimeout(ctx, waitCallTimeout)
		next, err := oc.Wait(wctx, &computepb.WaitZoneOperationRequest{Project: s.Project, Zone: zone, Operation: op.GetName()}, noRetry)
		wcancel()
		if err != nil {
			return fmt.Errorf("wait for operation %s: %w", op.GetName(), classify(err, zone))
		}
		op = next
	}
	if err := operationError(op, zone); err != nil {
		return &opFailed{err: err}
	}
	return nil
}

// instanceResource builds the instances.insert body.
func (p *Provider) instanceResource(s Settings, zone, name string, labels map[string]string, stored string, sec *secret) (*computepb.Instance, error) {
	items := []*computepb.Items{
		{Key: proto.String(metadataLabels), Value: proto.String(stored)},
	}
	if s.OS == "windows" {
		entry, err := sec.windowsKeyEntry(s.Username, time.Now().Add(time.Hour))
		if err != nil {
			return nil, err
		}
		items = append(items,
			&computepb.Items{Key: proto.String(metadataWindowsKeys), Value: proto.String(entry)},
			// The startup script creates the WinRM HTTPS listener and
			// publishes its certificate in guest attributes.
			&computepb.Items{Key: proto.String("windows-startup-script-ps1"), Value: proto.String(windowsStartupScript(s.StartupScript))},
			&computepb.Items{Key: proto.String(metadataGuestAttributes), Value: proto.String("TRUE")},
		)
	} else {
		items = append(items,
			&computepb.Items{Key: proto.String(metadataSSHKeys), Value: proto.String(sec.sshKeysEntry(s.Username))},
			// Only our key logs in, also when the project sets keys or OS Login.
			&computepb.Items{Key: proto.String("block-project-ssh-keys"), Value: proto.String("TRUE")},
			&computepb.Items{Key: proto.String("enable-oslogin"), Value: proto.String("FALSE")},
			// The guest agent publishes the SSH host keys there.
			&computepb.Items{Key: proto.String(metadataGuestAttributes), Value: proto.String("TRUE")},
		)
		if s.StartupScript != "" {
			items = append(items, &computepb.Items{Key: proto.String("startup-script"), Value: proto.String(s.StartupScript)})
		}
	}
	disk := &computepb.AttachedDiskInitializeParams{SourceImage: proto.String(s.sourceImage())}
	if s.DiskSizeGB > 0 {
		disk.DiskSizeGb = proto.Int64(s.DiskSizeGB)
	}
	if s.DiskType != "" {
		disk.DiskType = proto.String(fmt.Sprintf("zones/%s/diskTypes/%s", zone, s.DiskType))
	}
	nic := &computepb.NetworkInterface{Network: proto.String(s.networkPath())}
	if sub := s.subnetworkPath(zone); sub != "" {
		nic.Subnetwork = proto.String(sub)
	}
	if !s.NoExternalIP {
		nic.AccessConfigs = []*computepb.AccessConfig{{Name: proto.String("External NAT"), Type: proto.String("ONE_TO_ONE_NAT")}}
	}
	// A VM that crashes or loses its host must not come back mid-job.
	sched := &computepb.Scheduling{AutomaticRestart: proto.Bool(false)}
	switch {
	case s.Spot:
		sched.ProvisioningModel = proto.String("SPOT")
		sched.OnHostMaintenance = proto.String("TERMINATE")
	case s.Preemptible:
		sched.Preemptible = proto.Bool(true)
		sched.OnHostMaintenance = proto.String("TERMINATE")
	}
	inst := &computepb.Instance{
		Name:        proto.String(name),
		MachineType: proto.String(fmt.Sprintf("zones/%s/machineTypes/%s", zone, s.MachineType)),
		Labels:      labels,
		Metadata:    &computepb.Metadata{Items: items},
		Disks: []*computepb.AttachedDisk{{
			Boot:             proto.Bool(true),
			AutoDelete:       proto.Bool(true),
			Type:             proto.String("PERSISTENT"),
			InitializeParams: disk,
		}},
		NetworkInterfaces: []*computepb.NetworkInterface{nic},
		Scheduling:        sched,
	}
	if len(s.NetworkTags) > 0 {
		inst.Tags = &computepb.Tags{Items: s.NetworkTags}
	}
	if s.ServiceAccount != "" {
		inst.ServiceAccounts = []*computepb.ServiceAccount{{
			Email:  proto.String(s.ServiceAccount),
			Scopes: s.ServiceAccountScopes,
		}}
	}
	return inst, nil
}

// Delete implements providers.Provider: one instances.delete per id; an
// accepted deletion or a 404 confirms the id. It does not wait for the
// delete operation: List shows the instance deleting until it is gone.
// Ids that are not of the form <zone>/<name> were never issued by this
// plugin and are confirmed without a call.
func (p *Provider) Delete(ctx context.Context, ids []string) ([]string, error) {
	s, ic, _, err := p.client()
	if err != nil {
		return nil, err
	}
	var (
		mu        sync.Mutex
		confirmed []string
		errs      []error
		todo      []string
		wg        sync.WaitGroup
	)
	for _, id := range slices.Compact(slices.Sorted(slices.Values(ids))) {
		if _, _, ok := splitID(id); ok {
			todo = append(todo, id)
		} else {
			confirmed = append(confirmed, id)
		}
	}
	for range min(len(todo), s.CreateConcurrency) {
		wg.Go(func() {
			for {
				mu.Lock()
				if len(todo) == 0 {
					mu.Unlock()
					return
				}
				id := todo[0]
				todo = todo[1:]
				mu.Unlock()
				err := p.deleteOne(ctx, s, ic, id)
				mu.Lock()
				if err == nil {
					confirmed = append(confirmed, id)
				} else {
					errs = append(errs, err)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	slices.Sort(confirmed)
	return confirmed, errors.Join(errs...)
}

// deleteOne requests deletion of id; nil when it is accepted or the
// instance is already gone.
func (p *Provider) deleteOne(ctx context.Context, s Settings, ic *compute.InstancesClient, id string) error {
	zone, name, _ := splitID(id)
	if err := ctx.Err(); err != nil {
		return providers.Transient(fmt.Errorf("delete instance %s: %w", id, err))
	}
	cctx, cancel := context.WithTimeout(ctx, apiCallTimeout)
	_, err := ic.Delete(cctx, &computepb.DeleteInstanceRequest{Project: s.Project, Zone: zone, Instance: name}, noRetry)
	cancel()
	if err != nil {
		err = classify(err, zone)
	}
	switch {
	case err == nil:
		p.markDeleting(id)
		p.log.Info("instance deletion requested", "id", id)
		return nil
	case providers.IsNotFound(err):
		p.forget(id)
		return nil
	}
	return fmt.Errorf("delete instance %s: %w", id, err)
}

func (p *Provider) markDeleting(id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.deleting[id] = time.Now()
	delete(p.secrets, id)
	delete(p.cache, id)
}

func (p *Provider) forget(id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.deleting, id)
	delete(p.secrets, id)
	delete(p.cache, id)
}

// listFilter is the instances filter of List.
func listFilter(s Settings) string {
	key := LabelKey(providers.LabelManager)
	if s.Manager != "" {
		return fmt.Sprintf("labels.%s = %q", key, LabelValue(s.Manager))
	}
	return fmt.Sprintf("labels.%s:*", key)
}

// List implements providers.Provider with instances.aggregatedList (all
// zones of the project, so instances in zones since removed from the
// settings are still found), filtered on the manager label and paged with
// ListPageSize. A zone the API reports unreachable fails the call: a
// partial list would make existing instances look gone.
func (p *Provider) List(ctx context.Context) ([]providers.Instance, error) {
	s, ic, _, err := p.client()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, apiCallTimeout)
	defer cancel()
	it := ic.AggregatedList(ctx, &computepb.AggregatedListInstancesRequest{
		Project:    s.Project,
		Filter:     proto.String(listFilter(s)),
		MaxResults: proto.Uint32(uint32(s.ListPageSize)),
	}, noRetry)
	var (
		out  []providers.Instance
		seen = map[string]*computepb.Instance{}
	)
	for {
		pair, err := it.Next()
		if err != nil {
			if errors.Is(err, iterator.Done) {
				break
			}
			return nil, fmt.Errorf("list instances: %w", classify(err, ""))
		}
		if w := pair.Value.GetWarning(); w.GetCode() == "UNREACHABLE" {
			return nil, providers.Transient(fmt.Errorf("list instances: %s unreachable: %s", pair.Key, w.GetMessage()))
		}
		zone := strings.TrimPrefix(pair.Key, "zones/")
		for _, inst := range pair.Value.GetInstances() {
			if z := lastSegment(inst.GetZone()); z != "" {
				zone = z
			}
			id := instanceID(zone, inst.GetName())
			seen[id] = inst
		}
	}
	p.mu.Lock()
	now := time.Now()
	for id, inst := range seen {
		state, reason := instanceState(inst, !p.deleting[id].IsZero())
		created, _ := time.Parse(time.RFC3339, inst.GetCreationTimestamp())
		out = append(out, providers.Instance{
			ID:        id,
			State:     state,
			Labels:    originalLabels(inst.GetLabels(), metadataValue(inst.GetMetadata(), metadataLabels)),
			CreatedAt: created,
			Reason:    reason,
		})
		p.cache[id] = inst
	}
	for id := range p.cache {
		if seen[id] == nil {
			delete(p.cache, id)
		}
	}
	for id, t := range p.deleting {
		if seen[id] == nil {
			delete(p.deleting, id)
		} else if now.Sub(t) > secretTTL {
			delete(p.deleting, id) // the deletion did not happen; show the real state
		}
	}
	for id, sec := range p.secrets {
		if seen[id] == nil && now.Sub(sec.created) > secretTTL {
			delete(p.secrets, id)
		}
	}
	p.mu.Unlock()
	slices.SortFunc(out, func(a, b providers.Instance) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// instanceState maps a GCE instance status to a providers state. The
// plugin never stops instances, so a stopped or terminated one failed: it
// was preempted (spot / preemptible), crashed or was stopped by hand.
func instanceState(inst *computepb.Instance, deleting bool) (providers.State, string) {
	status := inst.GetStatus()
	if deleting {
		return providers.StateDeleting, ""
	}
	preemptible := inst.GetScheduling().GetPreemptible() || inst.GetScheduling().GetProvisioningModel() == "SPOT"
	switch status {
	case statusProvisioning, statusStaging:
		return providers.StateCreating, ""
	case statusRunning:
		return providers.StateRunning, ""
	case statusStopping:
		if preemptible {
			return providers.StateFailed, "preempted"
		}
		return providers.StateDeleting, ""
	case statusTerminated, statusStopped, statusSuspending, statusSuspended:
		if preemptible {
			return providers.StateFailed, "preempted"
		}
		return providers.StateFailed, strings.ToLower(status)
	case statusRepairing:
		return providers.StateFailed, "repairing"
	}
	return providers.StateFailed, "unknown status " + status
}

func lastSegment(url string) string {
	if i := strings.LastIndexByte(url, '/'); i >= 0 {
		return url[i+1:]
	}
	return url
}

func metadataValue(md *computepb.Metadata, key string) string {
	for _, it := range md.GetItems() {
		if it.GetKey() == key {
			return it.GetValue()
		}
	}
	return ""
}

// getInstance calls instances.get.
func (p *Provider) getInstance(ctx context.Context, s Settings, zone, name string) (*computepb.Instance, error) {
	_, ic, _, err := p.client()
	if err != nil {
		return nil, err
	}
	cctx, cancel := context.WithTimeout(ctx, apiCallTimeout)
	defer cancel()
	inst, err := ic.Get(cctx, &computepb.GetInstanceRequest{Project: s.Project, Zone: zone, Instance: name}, noRetry)
	if err != nil {
		err = classify(err, zone)
		if providers.IsNotFound(err) {
			return nil, providers.NotFound(instanceID(zone, name))
		}
		return nil, fmt.Errorf("get instance %s: %w", instanceID(zone, name), err)
	}
	return inst, nil
}

// Heartbeat implements providers.Provider with one instances.get: nil
// when the instance is RUNNING.
func (p *Provider) Heartbeat(ctx context.Context, id string) error {
	s, _, _, err := p.client()
	if err != nil {
		return err
	}
	zone, name, ok := splitID(id)
	if !ok {
		return providers.NotFound(id)
	}
	inst, err := p.getInstance(ctx, s, zone, name)
	if err != nil {
		return err
	}
	switch st, reason := instanceState(inst, false); st {
	case providers.StateRunning:
		return nil
	case providers.StateCreating:
		return providers.Transient(fmt.Errorf("instance %s is %s, not running yet", id, inst.GetStatus()))
	default:
		return providers.Permanent(fmt.Errorf("instance %s is %s (%s)", id, inst.GetStatus(), reason))
	}
}

// Shutdown implements providers.Provider. Instances are left alone.
func (p *Provider) Shutdown(context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	var errs []error
	if p.inited {
		errs = append(errs, p.instances.Close(), p.ops.Close())
	}
	clear(p.secrets)
	return errors.Join(errs...)
}
