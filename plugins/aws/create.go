package aws

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/pluginkit"
)

// Create implements providers.Provider: one RunInstances per instance, up
// to Settings.CreateConcurrency at a time, each trying the subnets in
// order until one has capacity (pluginkit.Placement). Partial failures
// follow pluginkit.FanOut's rule; the ids made are returned with the
// error.
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
	ids, err := pluginkit.FanOut(ctx, n, st.cfg.CreateConcurrency, func(ctx context.Context, _ int) (string, error) {
		return p.createOne(ctx, st, labels)
	})
	if err != nil {
		return ids, fmt.Errorf("aws create: %w", err)
	}
	return ids, nil
}

// reservedTags are set by the plugin and may not come as labels.
var reservedTags = []string{TagName, TagGroup, TagKeyID}

func checkLabels(cfg config, labels map[string]string) error {
	if err := pluginkit.CheckCreateLabels(labels, cfg.Manager, reservedTags...); err != nil {
		return fmt.Errorf("aws %w", err)
	}
	if len(labels)+len(reservedTags) > 50 {
		return providers.InvalidArgument(fmt.Errorf("aws create: %d labels; EC2 allows 50 tags per instance, %d of them taken by mayfly", len(labels), len(reservedTags)))
	}
	for k, v := range labels {
		if err := checkTag(k, v); err != nil {
			return providers.InvalidArgument(fmt.Errorf("aws create: label: %w", err))
		}
	}
	return nil
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
		spec := &types.LaunchTemplateSpecification{Version: aws.String(cmp.Or(lt.Version, "$Default"))}
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

	var id string
	err := st.placement.Try(cfg.Region, func(subnet string, attempt int) error {
		// A fresh client token per attempt: the nonce part names the key,
		// the suffix keeps EC2 from treating another subnet as a replay.
		in.ClientToken = aws.String(nonce + "-" + strconv.Itoa(attempt))
		if subnet != "" {
			in.SubnetId = aws.String(subnet)
		}
		var out *ec2.RunInstancesOutput
		err := p.call(ctx, st, "RunInstances", 1, func(ctx context.Context) error {
			var err error
			out, err = st.client.RunInstances(ctx, in)
			return err
		})
		if err != nil {
			return p.classify(st, "RunInstances", err, cfg.Region)
		}
		if len(out.Instances) == 0 || out.Instances[0].InstanceId == nil {
			return providers.Transient(errors.New("ec2 RunInstances: answer lists no instance"))
		}
		inst := out.Instances[0]
		id = aws.ToString(inst.InstanceId)
		p.remember(inst)
		if cert != nil {
			p.mu.Lock()
			p.certs[id] = cert.certPEM
			p.mu.Unlock()
		}
		p.log.Info("instance launched", "id", id, "subnet", aws.ToString(inst.SubnetId), "attempt", attempt+1)
		return nil
	})
	if _, capacity := providers.IsCapacityExhausted(err); capacity && len(cfg.SubnetIDs) > 0 {
		return "", fmt.Errorf("ec2 RunInstances of %s: %w", cmp.Or(cfg.InstanceType, "the instance"), err)
	}
	return id, err
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
