package aws

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"

	"github.com/mayfly-ci/mayfly/providers"
)

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
	if st.cfg.UseExternalIP {
		ci.Address = aws.ToString(inst.PublicIpAddress)
	}
	if ci.Address == "" {
		return providers.ConnectInfo{}, providers.Transient(fmt.Errorf("aws connect info %s: instance has no address yet (use_external_ip=%t)", id, st.cfg.UseExternalIP))
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
