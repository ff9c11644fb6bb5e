package aws

import (
	"context"
	"fmt"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/pluginkit"
)

// maxPages bounds the DescribeInstances pages of one List.
const maxPages = 1000

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
	return tags[TagGroup] == cfg.NamePrefix && pluginkit.Owned(tags, cfg.Manager)
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
