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
// RateLimit); a rate-limit answer pauses all requests by the toolkit's one
// backoff policy (pluginkit.Limiter) instead of being retried, and the
// error carries that pause to the fleet. The plugin makes no retries of
// its own (the SDK's are switched off too): the fleet owns the retry
// policy.
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
//	  "external_ip": false,
//	  "spot": true,
//	  "manager": "runner-manager-1",
//	  "rate_limit": {"rate": 5, "burst": 10},
//	  "capacity_cooldown": "5m"
//	}
package gce

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	compute "cloud.google.com/go/compute/apiv1"
	"cloud.google.com/go/compute/apiv1/computepb"
	"github.com/googleapis/gax-go/v2"
	"google.golang.org/api/option"
	htransport "google.golang.org/api/transport/http"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/pluginkit"
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
	zones     *pluginkit.Placement
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
	lim := newLimiter(p.base, s.RateLimit)
	zones := pluginkit.NewPlacement(pluginkit.PlacementOptions{
		Kind: "zone", Locations: s.Zones, Cooldown: time.Duration(s.CapacityCooldown), Logger: p.log,
	})
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
	p.s, p.lim, p.zones, p.instances, p.ops, p.inited = s, lim, zones, ic, oc, true
	p.log.Info("gce provider initialised", "project", s.Project, "zones", s.Zones,
		"machine_type", s.MachineType, "os", s.OS, "rate_limit", s.RateLimit.Rate, "rate_burst", s.RateLimit.Burst)
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

// placement returns the zones of the settings in force.
func (p *Provider) placement() *pluginkit.Placement {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.zones
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
		err = p.throttle(classify(err, zone))
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
