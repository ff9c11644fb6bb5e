package aws

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"

	"github.com/mayfly-ci/mayfly/providers"
)

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
