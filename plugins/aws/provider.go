// Package aws is the mayfly provider for Amazon EC2, built on
// aws-sdk-go-v2. Its plugin binary is cmd/mayfly-plugin-aws.
//
// API calls per job: a Linux instance costs one RunInstances and one
// TerminateInstances (the floor), plus one GetConsoleOutput to pin the SSH
// host key; ConnectInfo and Heartbeat are served from the instance data
// List already fetched (see Settings.CacheTTL), and List is one
// DescribeInstances per 1000 instances of the group per poll, shared by all
// jobs. A Windows instance costs one GetPasswordData per ConnectInfo until
// Windows has published its password, instead of GetConsoleOutput; its
// WinRM certificate is made by the plugin and costs nothing, except one
// DescribeInstanceAttribute per instance that a restarted plugin reads it
// back for (see winrmcert.go). Each additional subnet tried after
// InsufficientInstanceCapacity costs one RunInstances.
//
// Create makes one RunInstances call per instance (MinCount = MaxCount =
// 1) rather than one call for n: every instance needs its own user data to
// carry its own SSH key, the per-call client token makes each launch
// idempotent, and the capacity fallback and partial failures stay per
// instance. It costs no throughput: EC2's RunInstances resource bucket
// (2 instances/s) runs dry before its request bucket (5 calls/s) does.
package aws

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/ratelimit"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/ec2"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/pluginkit"
)

// Version is the version Init reports.
const Version = "aws/1"

// Tags the plugin sets besides the labels given to Create.
const (
	// TagGroup carries Settings.NamePrefix; List filters on it.
	TagGroup = "mayfly-group"
	// TagKeyID names the secret the instance's SSH key derives from.
	TagKeyID = "mayfly-key-id"
	// TagName is EC2's display name tag.
	TagName = "Name"
)

// Options configure a Provider.
type Options struct {
	// Logger receives the provider's records (default: discard).
	Logger *slog.Logger
	// Now is the clock of the caches and throttling pauses (default
	// time.Now).
	Now func() time.Time
}

// Provider is the EC2 provider. It is safe for concurrent use.
//
// The per-instance SSH keys derive from a secret (Settings.KeySecretFile);
// without that file the secret is drawn per process, and after a plugin
// restart ConnectInfo fails with a permanent error for the instances the
// previous process made (the fleet then replaces them). Likewise for
// Windows passwords without Settings.WindowsKeyFile.
type Provider struct {
	log *slog.Logger
	now func() time.Time

	keyMu sync.Mutex // serialises the import of the Windows key pair

	mu        sync.Mutex
	inited    bool
	closed    bool
	cfg       config
	client    *ec2.Client
	limit     *limiter
	placement *pluginkit.Placement // subnets
	keys      *sshKeys
	win       *windowsKey
	imported  bool              // win is imported as an EC2 key pair
	cache     map[string]cached // instance data by id
	hostKeys  map[string]string
	passwords map[string]string
	certs     map[string][]byte // WinRM certificate (PEM) by instance id
	calls     map[string]int
}

var _ providers.Provider = (*Provider)(nil)

// New returns an uninitialised provider.
func New(opts Options) *Provider {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Provider{
		log:       opts.Logger,
		now:       opts.Now,
		cache:     map[string]cached{},
		hostKeys:  map[string]string{},
		passwords: map[string]string{},
		certs:     map[string][]byte{},
		calls:     map[string]int{},
	}
}

// Init implements providers.Provider. It makes no API call.
func (p *Provider) Init(ctx context.Context, raw json.RawMessage) (providers.Info, error) {
	cfg, err := parseSettings(raw, p.log)
	if err != nil {
		return providers.Info{}, err
	}
	client, err := newClient(ctx, cfg)
	if err != nil {
		return providers.Info{}, providers.Permanent(fmt.Errorf("aws init: %w", err))
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return providers.Info{}, providers.Permanent(fmt.Errorf("aws init: %w", providers.ErrClosed))
	}
	keys, win := p.keys, p.win
	if cfg.os == "linux" && (keys == nil || cfg.KeySecretFile != p.cfg.KeySecretFile || cfg.KeySecretFile != "") {
		if keys, err = newSSHKeys(cfg.KeySecretFile); err != nil {
			return providers.Info{}, fmt.Errorf("aws init: %w", err)
		}
	}
	if cfg.os == "windows" && (win == nil || cfg.WindowsKeyFile != p.cfg.WindowsKeyFile || cfg.NamePrefix != p.cfg.NamePrefix || cfg.WindowsKeyFile != "") {
		if win, err = newWindowsKey(cfg.WindowsKeyFile, cfg.NamePrefix); err != nil {
			return providers.Info{}, fmt.Errorf("aws init: %w", err)
		}
		p.imported = false
	}
	p.cfg, p.client, p.keys, p.win = cfg, client, keys, win
	p.limit = newLimiter(cfg.RateLimit, p.now)
	p.placement = pluginkit.NewPlacement(pluginkit.PlacementOptions{
		Kind: "subnet", Locations: cfg.SubnetIDs, Cooldown: cfg.capacityCooldown, Now: p.now, Logger: p.log,
	})
	p.inited = true
	p.log.Info("aws provider initialised", "region", cfg.Region, "group", cfg.NamePrefix, "os", cfg.os,
		"subnets", len(cfg.SubnetIDs), "spot", cfg.Spot, "endpoint", cfg.Endpoint)
	return providers.Info{ID: "aws/" + cfg.Region + "/" + cfg.NamePrefix, MaxSize: cfg.MaxSize, Version: Version}, nil
}

func newClient(ctx context.Context, cfg config) (*ec2.Client, error) {
	opts := []func(*awsconfig.LoadOptions) error{
		awsconfig.WithRegion(cfg.Region),
		awsconfig.WithRetryer(newRetryer),
	}
	if cfg.AccessKeyID != "" {
		opts = append(opts, awsconfig.WithCredentialsProvider(
			credentials.NewStaticCredentialsProvider(cfg.AccessKeyID, cfg.SecretAccessKey, cfg.SessionToken)))
	}
	awsCfg, err := awsconfig.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("load AWS config: %w", err)
	}
	return ec2.NewFromConfig(awsCfg, func(o *ec2.Options) {
		if cfg.Endpoint != "" {
			o.BaseEndpoint = aws.String(cfg.Endpoint)
		}
	}), nil
}

// newRetryer retries only what a quick retry can fix: connection errors
// and EC2's internal errors, three attempts at most. Throttling, capacity
// and quota errors go straight back to the plugin, which pauses or falls
// back to another subnet, and then to the fleet.
func newRetryer() aws.Retryer {
	return retry.NewStandard(func(o *retry.StandardOptions) {
		o.MaxAttempts = 3
		o.MaxBackoff = 2 * time.Second
		o.RateLimiter = ratelimit.None
		o.Retryables = []retry.IsErrorRetryable{
			retry.IsErrorRetryableFunc(func(err error) aws.Ternary {
				if code := errorCode(err); code != "" {
					return aws.BoolTernary(transientCodes[code])
				}
				return aws.UnknownTernary
			}),
			retry.NoRetryCanceledError{},
			retry.RetryableConnectionError{},
			retry.RetryableHTTPStatusCode{Codes: retry.DefaultRetryableHTTPStatusCodes},
		}
	})
}

// state is what one call needs, read under p.mu.
type state struct {
	cfg       config
	client    *ec2.Client
	limit     *limiter
	placement *pluginkit.Placement
	keys      *sshKeys
	win       *windowsKey
}

func (p *Provider) state(op string) (state, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.closed:
		return state{}, providers.Permanent(fmt.Errorf("aws %s: %w", op, providers.ErrClosed))
	case !p.inited:
		return state{}, providers.InvalidArgument(fmt.Errorf("aws %s: provider is not initialised", op))
	}
	return state{cfg: p.cfg, client: p.client, limit: p.limit, placement: p.placement, keys: p.keys, win: p.win}, nil
}

// call runs one EC2 API call of action affecting n instances, paced by
// the limiter and bounded by the API timeout.
func (p *Provider) call(ctx context.Context, st state, action string, n int, fn func(context.Context) error) error {
	if err := st.limit.wait(ctx, action, n); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, st.cfg.apiTimeout)
	defer cancel()
	p.mu.Lock()
	p.calls[action]++
	p.mu.Unlock()
	err := fn(ctx)
	if err == nil {
		st.limit.succeeded(action)
	}
	return err
}

// APICalls returns the EC2 API calls made so far, by action (SDK retries
// of one call count once).
func (p *Provider) APICalls() map[string]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return maps.Clone(p.calls)
}

// Shutdown implements providers.Provider. It deletes the Windows key pair
// when the plugin generated it; instances are left alone.
func (p *Provider) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	st := state{cfg: p.cfg, client: p.client, limit: p.limit, placement: p.placement, keys: p.keys, win: p.win}
	deleteKey := p.inited && p.win != nil && p.win.ephemeral && p.imported
	p.closed = true
	p.mu.Unlock()
	if !deleteKey {
		return nil
	}
	err := p.call(ctx, st, "DeleteKeyPair", 0, func(ctx context.Context) error {
		_, err := st.client.DeleteKeyPair(ctx, &ec2.DeleteKeyPairInput{KeyName: aws.String(st.win.name)})
		return err
	})
	if err != nil {
		return fmt.Errorf("aws shutdown: delete key pair %s: %w", st.win.name, p.classify(st, "DeleteKeyPair", err, st.cfg.Region))
	}
	return nil
}
