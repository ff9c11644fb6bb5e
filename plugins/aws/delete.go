package aws

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/aws/smithy-go"
)

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
