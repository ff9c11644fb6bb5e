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
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/ratelimit"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/aws/smithy-go"

	"github.com/mayfly-ci/mayfly/providers"
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

// maxPages bounds the DescribeInstances pages of one List.
const maxPages = 1000

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
	keys      *sshKeys
	win       *windowsKey
	imported  bool                 // win is imported as an EC2 key pair
	exhausted map[string]time.Time // subnet → when it last had no capacity
	cache     map[string]cached    // instance data by id
	hostKeys  map[string]string
	passwords map[string]string
	certs     map[string][]byte // WinRM certificate (PEM) by instance id
	calls     map[string]int
}

type cached struct {
	inst types.Instance
	at   time.Time
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
		exhausted: map[string]time.Time{},
		cache:     map[string]cached{},
		hostKeys:  map[string]string{},
		passwords: map[string]string{},
		certs:     map[string][]byte{},
		calls:     map[string]int{},
	}
}

// Init implements providers.Provider. It makes no API call.
func (p *Provider) Init(ctx context.Context, raw json.RawMessage) (providers.Info, error) {
	cfg, err := parseSettings(raw)
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
	cfg    config
	client *ec2.Client
	limit  *limiter
	keys   *sshKeys
	win    *windowsKey
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
	return state{cfg: p.cfg, client: p.client, limit: p.limit, keys: p.keys, win: p.win}, nil
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

// Create implements providers.Provider: one RunInstances per instance, up
// to Settings.CreateConcurrency at a time, each trying the subnets in
// order until one has capacity. It stops at the first error other than a
// subnet's lack of capacity and returns the ids made so far with it.
func (p *Provider) Create(ctx context.Context, n int, labels map[string]string) ([]string, error) {
	st, err := p.state("create")
	if err != nil {
		return nil, err
	}
	if n < 0 {
		return nil, providers.InvalidArgument(fmt.Errorf("aws create: count %d is negative", n))
	}
	if n == 0 {
		return nil, nil
	}
	if err := checkLabels(st.cfg, labels); err != nil {
		return nil, err
	}
	if st.cfg.os == "windows" {
		if err := p.importWindowsKey(ctx, st); err != nil {
			return nil, err
		}
	}
	var (
		mu       sync.Mutex
		ids      []string
		firstErr error
		wg       sync.WaitGroup
	)
	sem := make(chan struct{}, st.cfg.CreateConcurrency)
	failed := func() bool {
		mu.Lock()
		defer mu.Unlock()
		return firstErr != nil
	}
launch:
	for range n {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			break launch
		}
		if failed() {
			<-sem
			break
		}
		wg.Go(func() {
			defer func() { <-sem }()
			id, err := p.createOne(ctx, st, labels)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if firstErr == nil {
					firstErr = err
				}
				return
			}
			ids = append(ids, id)
		})
	}
	wg.Wait()
	if firstErr == nil && len(ids) < n {
		firstErr = providers.Transient(fmt.Errorf("aws create: made %d of %d instances: %w", len(ids), n, ctx.Err()))
	}
	if firstErr != nil {
		return ids, fmt.Errorf("aws create: %w", firstErr)
	}
	return ids, nil
}

// reservedTags are set by the plugin and may not come as labels.
var reservedTags = []string{TagName, TagGroup, TagKeyID}

func checkLabels(cfg config, labels map[string]string) error {
	if labels[providers.LabelManager] == "" {
		return providers.InvalidArgument(fmt.Errorf("aws create: labels lack %q; every instance must carry its manager", providers.LabelManager))
	}
	if cfg.Manager != "" && labels[providers.LabelManager] != cfg.Manager {
		return providers.InvalidArgument(fmt.Errorf("aws create: label %s=%q differs from the manager setting %q; List would not see the instance",
			providers.LabelManager, labels[providers.LabelManager], cfg.Manager))
	}
	if len(labels)+len(reservedTags) > 50 {
		return providers.InvalidArgument(fmt.Errorf("aws create: %d labels; EC2 allows 50 tags per instance, %d of them taken by mayfly", len(labels), len(reservedTags)))
	}
	for k, v := range labels {
		if slices.Contains(reservedTags, k) {
			return providers.InvalidArgument(fmt.Errorf("aws create: label %q is reserved for the plugin", k))
		}
		if err := checkTag(k, v); err != nil {
			return providers.InvalidArgument(fmt.Errorf("aws create: label: %w", err))
		}
	}
	return nil
}

// subnetOrder returns the subnets to try: those without a recent capacity
// failure in configured order, then the others, least recently failed
// first. No subnet is ever skipped.
func (p *Provider) subnetOrder(cfg config) []string {
	if len(cfg.SubnetIDs) == 0 {
		return []string{""}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	var fresh, cooling []string
	for _, s := range cfg.SubnetIDs {
		if t, ok := p.exhausted[s]; ok && now.Sub(t) < cfg.capacityCooldown {
			cooling = append(cooling, s)
		} else {
			fresh = append(fresh, s)
		}
	}
	slices.SortStableFunc(cooling, func(a, b string) int { return p.exhausted[a].Compare(p.exhausted[b]) })
	return append(fresh, cooling...)
}

func (p *Provider) markExhausted(subnet string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.exhausted[subnet] = p.now()
}

func (p *Provider) createOne(ctx context.Context, st state, labels map[string]string) (string, error) {
	nonce := newNonce()
	var cert *winrmCert // Windows only
	in := &ec2.RunInstancesInput{
		MinCount:          aws.Int32(1),
		MaxCount:          aws.Int32(1),
		TagSpecifications: tagSpecs(st, labels, nonce),
	}
	cfg := st.cfg
	if lt := cfg.LaunchTemplate; lt != nil {
		spec := &types.LaunchTemplateSpecification{Version: aws.String(cmpOr(lt.Version, "$Default"))}
		if lt.ID != "" {
			spec.LaunchTemplateId = aws.String(lt.ID)
		} else {
			spec.LaunchTemplateName = aws.String(lt.Name)
		}
		in.LaunchTemplate = spec
	}
	if cfg.AMI != "" {
		in.ImageId = aws.String(cfg.AMI)
	}
	if cfg.InstanceType != "" {
		in.InstanceType = types.InstanceType(cfg.InstanceType)
	}
	in.SecurityGroupIds = cfg.SecurityGroupIDs
	if prof := cfg.IAMInstanceProfile; prof != "" {
		if strings.HasPrefix(prof, "arn:") {
			in.IamInstanceProfile = &types.IamInstanceProfileSpecification{Arn: aws.String(prof)}
		} else {
			in.IamInstanceProfile = &types.IamInstanceProfileSpecification{Name: aws.String(prof)}
		}
	}
	if cfg.Spot {
		opts := &types.SpotMarketOptions{
			SpotInstanceType:             types.SpotInstanceTypeOneTime,
			InstanceInterruptionBehavior: types.InstanceInterruptionBehaviorTerminate,
		}
		if cfg.SpotMaxPrice != "" {
			opts.MaxPrice = aws.String(cfg.SpotMaxPrice)
		}
		in.InstanceMarketOptions = &types.InstanceMarketOptionsRequest{MarketType: types.MarketTypeSpot, SpotOptions: opts}
	}
	switch cfg.os {
	case "linux":
		key, err := st.keys.authorizedKey(nonce)
		if err != nil {
			return "", err
		}
		ud, err := linuxUserData(key, cfg.UserData)
		if err != nil {
			return "", providers.InvalidArgument(err)
		}
		in.UserData = aws.String(ud)
	case "windows":
		in.KeyName = aws.String(st.win.name)
		var err error
		if cert, err = newWinRMCert(p.now()); err != nil {
			return "", err
		}
		ud, err := windowsUserData(cert, cfg.UserData)
		if err != nil {
			return "", providers.InvalidArgument(err)
		}
		in.UserData = aws.String(ud)
	}

	subnets := p.subnetOrder(cfg)
	var capErrs []error
	for i, subnet := range subnets {
		// A fresh client token per attempt: the nonce part names the key,
		// the suffix keeps EC2 from treating another subnet as a replay.
		in.ClientToken = aws.String(nonce + "-" + strconv.Itoa(i))
		if subnet != "" {
			in.SubnetId = aws.String(subnet)
		}
		var out *ec2.RunInstancesOutput
		err := p.call(ctx, st, "RunInstances", 1, func(ctx context.Context) error {
			var err error
			out, err = st.client.RunInstances(ctx, in)
			return err
		})
		if err == nil {
			if len(out.Instances) == 0 || out.Instances[0].InstanceId == nil {
				return "", providers.Transient(errors.New("ec2 RunInstances: answer lists no instance"))
			}
			inst := out.Instances[0]
			id := aws.ToString(inst.InstanceId)
			p.remember(inst)
			if cert != nil {
				p.mu.Lock()
				p.certs[id] = cert.certPEM
				p.mu.Unlock()
			}
			p.log.Info("instance launched", "id", id, "subnet", aws.ToString(inst.SubnetId), "attempt", i+1)
			return id, nil
		}
		if subnet != "" && isCapacity(err) {
			p.markExhausted(subnet)
			p.log.Warn("no capacity in subnet, trying the next", "subnet", subnet, "code", errorCode(err), "error", err)
			capErrs = append(capErrs, fmt.Errorf("subnet %s: %w", subnet, err))
			continue
		}
		return "", p.classify(st, "RunInstances", err, cfg.Region)
	}
	return "", providers.CapacityExhausted(cfg.Region,
		fmt.Errorf("ec2 RunInstances: no subnet could launch %s: %w", cmpOr(cfg.InstanceType, "the instance"), errors.Join(capErrs...)))
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func tagSpecs(st state, labels map[string]string, nonce string) []types.TagSpecification {
	all := maps.Clone(labels)
	all[TagName] = st.cfg.NamePrefix + "-" + nonce[:12]
	all[TagGroup] = st.cfg.NamePrefix
	if st.keys != nil && st.cfg.os == "linux" {
		all[TagKeyID] = st.keys.id
	}
	var tags []types.Tag
	for _, k := range slices.Sorted(maps.Keys(all)) {
		tags = append(tags, types.Tag{Key: aws.String(k), Value: aws.String(all[k])})
	}
	return []types.TagSpecification{
		{ResourceType: types.ResourceTypeInstance, Tags: tags},
		{ResourceType: types.ResourceTypeVolume, Tags: tags},
	}
}

func (p *Provider) remember(inst types.Instance) {
	id := aws.ToString(inst.InstanceId)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cache[id] = cached{inst: inst, at: p.now()}
}

func (p *Provider) forget(ids ...string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, id := range ids {
		delete(p.cache, id)
		delete(p.hostKeys, id)
		delete(p.passwords, id)
		delete(p.certs, id)
	}
}

// importWindowsKey imports the Windows key pair once per plugin process.
func (p *Provider) importWindowsKey(ctx context.Context, st state) error {
	p.keyMu.Lock()
	defer p.keyMu.Unlock()
	p.mu.Lock()
	done := p.imported && p.win == st.win
	p.mu.Unlock()
	if done {
		return nil
	}
	err := p.call(ctx, st, "ImportKeyPair", 0, func(ctx context.Context) error {
		_, err := st.client.ImportKeyPair(ctx, &ec2.ImportKeyPairInput{
			KeyName:           aws.String(st.win.name),
			PublicKeyMaterial: st.win.material,
		})
		return err
	})
	if err != nil && errorCode(err) != "InvalidKeyPair.Duplicate" {
		return fmt.Errorf("aws create: import windows key pair %s: %w", st.win.name, p.classify(st, "ImportKeyPair", err, st.cfg.Region))
	}
	// A duplicate is our own key: the name carries its fingerprint.
	p.mu.Lock()
	if p.win == st.win {
		p.imported = true
	}
	p.mu.Unlock()
	p.log.Info("windows key pair in place", "name", st.win.name)
	return nil
}

// groupFilters select the instances of the group.
func groupFilters(cfg config) []types.Filter {
	f := []types.Filter{{Name: aws.String("tag:" + TagGroup), Values: []string{cfg.NamePrefix}}}
	if cfg.Manager != "" {
		f = append(f, types.Filter{Name: aws.String("tag:" + providers.LabelManager), Values: []string{cfg.Manager}})
	} else {
		f = append(f, types.Filter{Name: aws.String("tag-key"), Values: []string{providers.LabelManager}})
	}
	return f
}

// inGroup reports whether inst carries the group's tags.
func inGroup(cfg config, inst types.Instance) bool {
	tags := tagMap(inst.Tags)
	if tags[TagGroup] != cfg.NamePrefix {
		return false
	}
	if cfg.Manager != "" {
		return tags[providers.LabelManager] == cfg.Manager
	}
	_, ok := tags[providers.LabelManager]
	return ok
}

func tagMap(tags []types.Tag) map[string]string {
	m := make(map[string]string, len(tags))
	for _, t := range tags {
		m[aws.ToString(t.Key)] = aws.ToString(t.Value)
	}
	return m
}

// List implements providers.Provider: DescribeInstances filtered on the
// group's tags, page by page. Terminated instances (EC2 lists them for
// about an hour) are reported gone.
func (p *Provider) List(ctx context.Context) ([]providers.Instance, error) {
	st, err := p.state("list")
	if err != nil {
		return nil, err
	}
	in := &ec2.DescribeInstancesInput{
		Filters:    groupFilters(st.cfg),
		MaxResults: aws.Int32(int32(st.cfg.PageSize)),
	}
	var insts []types.Instance
	seen := map[string]bool{}
	for page := 0; ; page++ {
		if page == maxPages {
			return nil, providers.Transient(fmt.Errorf("aws list: more than %d pages of instances", maxPages))
		}
		var out *ec2.DescribeInstancesOutput
		err := p.call(ctx, st, "DescribeInstances", 0, func(ctx context.Context) error {
			var err error
			out, err = st.client.DescribeInstances(ctx, in)
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("aws list: page %d: %w", page+1, p.classify(st, "DescribeInstances", err, st.cfg.Region))
		}
		for _, r := range out.Reservations {
			insts = append(insts, r.Instances...)
		}
		next := aws.ToString(out.NextToken)
		if next == "" {
			break
		}
		if seen[next] {
			return nil, providers.Transient(fmt.Errorf("aws list: EC2 repeated page token %q", next))
		}
		seen[next] = true
		in.NextToken = aws.String(next)
	}

	now := p.now()
	list := make([]providers.Instance, 0, len(insts))
	listed := map[string]bool{}
	p.mu.Lock()
	for _, inst := range insts {
		id := aws.ToString(inst.InstanceId)
		if listed[id] {
			continue
		}
		listed[id] = true
		p.cache[id] = cached{inst: inst, at: now}
		list = append(list, toInstance(inst))
	}
	for id := range p.cache {
		if !listed[id] && now.Sub(p.cache[id].at) > st.cfg.cacheTTL {
			delete(p.cache, id)
			delete(p.hostKeys, id)
			delete(p.passwords, id)
			delete(p.certs, id)
		}
	}
	p.mu.Unlock()
	return list, nil
}

func toInstance(inst types.Instance) providers.Instance {
	s, reason := mapState(inst)
	return providers.Instance{
		ID:        aws.ToString(inst.InstanceId),
		State:     s,
		Labels:    tagMap(inst.Tags),
		CreatedAt: aws.ToTime(inst.LaunchTime),
		Reason:    reason,
	}
}

// ReasonSpotInterrupted is the Reason of an instance EC2 reclaimed.
const ReasonSpotInterrupted = "spot-interrupted"

// mapState maps an EC2 instance state and state reason to a providers
// state and reason.
func mapState(inst types.Instance) (providers.State, string) {
	var name types.InstanceStateName
	if inst.State != nil {
		name = inst.State.Name
	}
	code := ""
	if inst.StateReason != nil {
		code = aws.ToString(inst.StateReason.Code)
	}
	reason := reasonOf(code)
	if reason == ReasonSpotInterrupted {
		return providers.StateGone, reason
	}
	switch name {
	case types.InstanceStateNamePending:
		return providers.StateCreating, ""
	case types.InstanceStateNameRunning:
		return providers.StateRunning, ""
	case types.InstanceStateNameShuttingDown:
		return providers.StateDeleting, reason
	case types.InstanceStateNameTerminated:
		return providers.StateGone, reason
	case types.InstanceStateNameStopping, types.InstanceStateNameStopped:
		// A stopped instance might have run a job: never reuse it.
		return providers.StateFailed, strings.TrimSuffix("stopped: "+reason, ": ")
	}
	return providers.StateFailed, "unknown EC2 state " + string(name)
}

func reasonOf(code string) string {
	switch code {
	case "":
		return ""
	case "Server.SpotInstanceTermination", "Server.SpotInstanceShutdown":
		return ReasonSpotInterrupted
	case "Client.UserInitiatedShutdown":
		return ""
	case "Client.InstanceInitiatedShutdown":
		return "shut down from inside the instance"
	case "Server.ScheduledStop":
		return "scheduled retirement"
	case "Server.InsufficientInstanceCapacity", "Server.InternalError", "Client.InternalError",
		"Client.VolumeLimitExceeded", "Client.InvalidSnapshot.NotFound":
		return "launch failed: " + code
	}
	return code
}

// describe returns instance id of the group, from the cache when fresh
// enough and allowed.
func (p *Provider) describe(ctx context.Context, st state, id string, useCache bool) (types.Instance, error) {
	if !instanceRE.MatchString(id) {
		return types.Instance{}, providers.NotFound(id)
	}
	if useCache {
		p.mu.Lock()
		c, ok := p.cache[id]
		p.mu.Unlock()
		if ok && p.now().Sub(c.at) <= st.cfg.cacheTTL {
			return c.inst, nil
		}
	}
	var out *ec2.DescribeInstancesOutput
	err := p.call(ctx, st, "DescribeInstances", 0, func(ctx context.Context) error {
		var err error
		out, err = st.client.DescribeInstances(ctx, &ec2.DescribeInstancesInput{InstanceIds: []string{id}})
		return err
	})
	if err != nil {
		err = p.classify(st, "DescribeInstances", err, st.cfg.Region)
		if providers.IsNotFound(err) {
			p.forget(id)
			return types.Instance{}, fmt.Errorf("%w: %w", providers.NotFound(id), err)
		}
		return types.Instance{}, err
	}
	for _, r := range out.Reservations {
		for _, inst := range r.Instances {
			if aws.ToString(inst.InstanceId) != id {
				continue
			}
			if !inGroup(st.cfg, inst) {
				return types.Instance{}, fmt.Errorf("%w: it is not tagged %s=%s", providers.NotFound(id), TagGroup, st.cfg.NamePrefix)
			}
			p.remember(inst)
			return inst, nil
		}
	}
	return types.Instance{}, providers.NotFound(id)
}

// running returns instance id when it runs, or an error saying why not.
func (p *Provider) running(ctx context.Context, st state, id string) (types.Instance, error) {
	inst, err := p.describe(ctx, st, id, true)
	if err == nil && (inst.State == nil || inst.State.Name != types.InstanceStateNameRunning) {
		inst, err = p.describe(ctx, st, id, false) // the cache may be behind
	}
	if err != nil {
		return inst, err
	}
	s, reason := mapState(inst)
	switch s {
	case providers.StateRunning:
		return inst, nil
	case providers.StateCreating:
		return inst, providers.Transient(fmt.Errorf("instance %s is still pending", id))
	case providers.StateDeleting, providers.StateGone:
		return inst, fmt.Errorf("%w: it is %s (%s)", providers.NotFound(id), inst.State.Name, reason)
	}
	return inst, providers.Permanent(fmt.Errorf("instance %s is %s (%s)", id, inst.State.Name, reason))
}

// ConnectInfo implements providers.Provider.
//
// Linux: SSH on port 22 with the instance's derived key; HostKey is the
// host key cloud-init printed to the console (GetConsoleOutput), or empty
// while the console output does not show it yet (EC2 publishes the
// console some time after boot) or when Settings.HostKeyFromConsole is
// false: the caller then has no pinned key and must decide how to trust
// the first connection.
//
// Windows: WinRM over HTTPS on port 5986 as Administrator with the
// password from GetPasswordData, decrypted with the plugin's RSA key; a
// transient error until Windows has published it. TLSCert is the
// certificate the plugin made for the instance and put in its user data
// (see winrmcert.go); a restarted plugin reads it back from there.
func (p *Provider) ConnectInfo(ctx context.Context, id string) (providers.ConnectInfo, error) {
	st, err := p.state("connect info")
	if err != nil {
		return providers.ConnectInfo{}, err
	}
	inst, err := p.running(ctx, st, id)
	if err != nil {
		return providers.ConnectInfo{}, fmt.Errorf("aws connect info %s: %w", id, err)
	}
	ci := providers.ConnectInfo{
		ID:       id,
		Address:  aws.ToString(inst.PrivateIpAddress),
		OS:       st.cfg.os,
		Arch:     goArch(inst.Architecture),
		Username: st.cfg.Username,
	}
	if st.cfg.UsePublicIP {
		ci.Address = aws.ToString(inst.PublicIpAddress)
	}
	if ci.Address == "" {
		return providers.ConnectInfo{}, providers.Transient(fmt.Errorf("aws connect info %s: instance has no address yet (use_public_ip=%t)", id, st.cfg.UsePublicIP))
	}
	switch st.cfg.os {
	case "linux":
		if err := p.linuxConnect(ctx, st, inst, &ci); err != nil {
			return providers.ConnectInfo{}, fmt.Errorf("aws connect info %s: %w", id, err)
		}
	case "windows":
		if err := p.windowsConnect(ctx, st, inst, &ci); err != nil {
			return providers.ConnectInfo{}, fmt.Errorf("aws connect info %s: %w", id, err)
		}
	}
	return ci, nil
}

var nonceRE = regexp.MustCompile(`^([0-9a-f]{32})-\d+$`)

func (p *Provider) linuxConnect(ctx context.Context, st state, inst types.Instance, ci *providers.ConnectInfo) error {
	tags := tagMap(inst.Tags)
	if got := tags[TagKeyID]; got != st.keys.id {
		return providers.Permanent(fmt.Errorf("its SSH key derives from secret %q, this plugin holds %q (restarted without key_secret_file?)", got, st.keys.id))
	}
	m := nonceRE.FindStringSubmatch(aws.ToString(inst.ClientToken))
	if m == nil {
		return providers.Permanent(fmt.Errorf("client token %q is not mayfly's; cannot derive the SSH key", aws.ToString(inst.ClientToken)))
	}
	pemKey, err := st.keys.privatePEM(m[1])
	if err != nil {
		return err
	}
	ci.Protocol, ci.Port, ci.PrivateKey = providers.ProtocolSSH, 22, pemKey
	if st.cfg.hostKeyFromConsole {
		ci.HostKey, err = p.hostKey(ctx, st, ci.ID)
		if err != nil {
			return err
		}
	}
	return nil
}

func (p *Provider) hostKey(ctx context.Context, st state, id string) (string, error) {
	p.mu.Lock()
	k, ok := p.hostKeys[id]
	p.mu.Unlock()
	if ok {
		return k, nil
	}
	var out *ec2.GetConsoleOutputOutput
	err := p.call(ctx, st, "GetConsoleOutput", 0, func(ctx context.Context) error {
		var err error
		out, err = st.client.GetConsoleOutput(ctx, &ec2.GetConsoleOutputInput{InstanceId: aws.String(id)})
		return err
	})
	if err != nil {
		return "", p.classify(st, "GetConsoleOutput", err, st.cfg.Region)
	}
	raw, err := base64.StdEncoding.DecodeString(aws.ToString(out.Output))
	if err != nil {
		return "", providers.Transient(fmt.Errorf("console output is not base64: %w", err))
	}
	k = parseHostKey(string(raw))
	if k == "" {
		p.log.Debug("no SSH host key in the console output yet", "id", id, "bytes", len(raw))
		return "", nil
	}
	p.mu.Lock()
	p.hostKeys[id] = k
	p.mu.Unlock()
	return k, nil
}

func (p *Provider) windowsConnect(ctx context.Context, st state, inst types.Instance, ci *providers.ConnectInfo) error {
	if got := aws.ToString(inst.KeyName); got != st.win.name {
		return providers.Permanent(fmt.Errorf("its password is encrypted for key pair %q, this plugin holds %q (restarted without windows_key_file?)", got, st.win.name))
	}
	ci.Protocol, ci.Port = providers.ProtocolWinRM, 5986
	cert, err := p.winrmCert(ctx, st, ci.ID)
	if err != nil {
		return err
	}
	ci.TLSCert = cert
	p.mu.Lock()
	pw, ok := p.passwords[ci.ID]
	p.mu.Unlock()
	if ok {
		ci.Password = pw
		return nil
	}
	var out *ec2.GetPasswordDataOutput
	err = p.call(ctx, st, "GetPasswordData", 0, func(ctx context.Context) error {
		var err error
		out, err = st.client.GetPasswordData(ctx, &ec2.GetPasswordDataInput{InstanceId: aws.String(ci.ID)})
		return err
	})
	if err != nil {
		return p.classify(st, "GetPasswordData", err, st.cfg.Region)
	}
	data := strings.TrimSpace(aws.ToString(out.PasswordData))
	if data == "" {
		return providers.Transient(errors.New("the Windows password is not available yet (Windows publishes it a few minutes after boot)"))
	}
	pw, err = st.win.decryptPassword(data)
	if err != nil {
		return providers.Permanent(err)
	}
	p.mu.Lock()
	p.passwords[ci.ID] = pw
	p.mu.Unlock()
	ci.Password = pw
	return nil
}

// winrmCert returns the WinRM certificate of instance id: the one Create
// made, or, after a plugin restart, the one in the instance's user data,
// read with one DescribeInstanceAttribute and kept.
func (p *Provider) winrmCert(ctx context.Context, st state, id string) ([]byte, error) {
	p.mu.Lock()
	cert, ok := p.certs[id]
	p.mu.Unlock()
	if ok {
		return cert, nil
	}
	var out *ec2.DescribeInstanceAttributeOutput
	err := p.call(ctx, st, "DescribeInstanceAttribute", 0, func(ctx context.Context) error {
		var err error
		out, err = st.client.DescribeInstanceAttribute(ctx, &ec2.DescribeInstanceAttributeInput{
			InstanceId: aws.String(id),
			Attribute:  types.InstanceAttributeNameUserData,
		})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("read the WinRM certificate from the user data: %w", p.classify(st, "DescribeInstanceAttribute", err, st.cfg.Region))
	}
	var ud []byte
	if out.UserData != nil {
		if ud, err = base64.StdEncoding.DecodeString(aws.ToString(out.UserData.Value)); err != nil {
			return nil, providers.Permanent(fmt.Errorf("user data is not base64: %w", err))
		}
	}
	cert, err = certFromUserData(ud)
	if err != nil {
		return nil, providers.Permanent(err)
	}
	p.mu.Lock()
	p.certs[id] = cert
	p.mu.Unlock()
	p.log.Info("winrm certificate read back from the user data", "id", id)
	return cert, nil
}

func goArch(a types.ArchitectureValues) string {
	switch a {
	case types.ArchitectureValuesArm64, types.ArchitectureValuesArm64Mac:
		return "arm64"
	case types.ArchitectureValuesI386:
		return "386"
	}
	return "amd64"
}

// Heartbeat implements providers.Provider: nil while the instance runs.
func (p *Provider) Heartbeat(ctx context.Context, id string) error {
	st, err := p.state("heartbeat")
	if err != nil {
		return err
	}
	if _, err := p.running(ctx, st, id); err != nil {
		return fmt.Errorf("aws heartbeat %s: %w", id, err)
	}
	return nil
}

// terminateBatch is the most instance ids one TerminateInstances takes.
const terminateBatch = 1000

var instanceIDInText = regexp.MustCompile(`i-[0-9a-f]{8}(?:[0-9a-f]{9})?`)

// Delete implements providers.Provider with TerminateInstances. Ids that
// cannot be EC2 instance ids, and instances EC2 does not know (any more),
// count as deleted. An instance is confirmed once EC2 reports it
// shutting-down or terminated.
func (p *Provider) Delete(ctx context.Context, ids []string) ([]string, error) {
	st, err := p.state("delete")
	if err != nil {
		return nil, err
	}
	var confirmed, todo []string
	seen := map[string]bool{}
	for _, id := range ids {
		switch {
		case seen[id]:
		case !instanceRE.MatchString(id):
			confirmed = append(confirmed, id)
		default:
			todo = append(todo, id)
		}
		seen[id] = true
	}
	for batch := range slices.Chunk(todo, terminateBatch) {
		done, err := p.terminate(ctx, st, batch)
		confirmed = append(confirmed, done...)
		p.forget(done...)
		if err != nil {
			return confirmed, fmt.Errorf("aws delete: %w", err)
		}
	}
	return confirmed, nil
}

// terminate terminates ids. TerminateInstances fails as a whole when one
// id is unknown; the unknown ids, named in the error message, are then
// confirmed and the call repeated without them (a bounded number of times,
// then one id per call).
func (p *Provider) terminate(ctx context.Context, st state, ids []string) ([]string, error) {
	var confirmed []string
	for attempt := 0; len(ids) > 0; attempt++ {
		if attempt == 3 && len(ids) > 1 {
			for _, id := range ids {
				done, err := p.terminate(ctx, st, []string{id})
				confirmed = append(confirmed, done...)
				if err != nil {
					return confirmed, err
				}
			}
			return confirmed, nil
		}
		var out *ec2.TerminateInstancesOutput
		err := p.call(ctx, st, "TerminateInstances", len(ids), func(ctx context.Context) error {
			var err error
			out, err = st.client.TerminateInstances(ctx, &ec2.TerminateInstancesInput{InstanceIds: ids})
			return err
		})
		if err == nil {
			for _, sc := range out.TerminatingInstances {
				if sc.CurrentState == nil {
					continue
				}
				switch sc.CurrentState.Name {
				case types.InstanceStateNameShuttingDown, types.InstanceStateNameTerminated:
					id := aws.ToString(sc.InstanceId)
					if slices.Contains(ids, id) {
						confirmed = append(confirmed, id)
					}
				}
			}
			p.log.Info("instances terminated", "ids", ids, "confirmed", len(confirmed))
			return confirmed, nil
		}
		if errorCode(err) != "InvalidInstanceID.NotFound" {
			return confirmed, p.classify(st, "TerminateInstances", err, st.cfg.Region)
		}
		var missing []string
		if apiErr, ok := errors.AsType[smithy.APIError](err); ok {
			for _, id := range instanceIDInText.FindAllString(apiErr.ErrorMessage(), -1) {
				if slices.Contains(ids, id) && !slices.Contains(missing, id) {
					missing = append(missing, id)
				}
			}
		}
		if len(ids) == 1 {
			missing = ids
		}
		p.log.Info("instances already gone", "ids", missing)
		confirmed = append(confirmed, missing...)
		ids = slices.DeleteFunc(slices.Clone(ids), func(id string) bool { return slices.Contains(missing, id) })
	}
	return confirmed, nil
}

// Shutdown implements providers.Provider. It deletes the Windows key pair
// when the plugin generated it; instances are left alone.
func (p *Provider) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	st := state{cfg: p.cfg, client: p.client, limit: p.limit, keys: p.keys, win: p.win}
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
