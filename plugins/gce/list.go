package gce

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"cloud.google.com/go/compute/apiv1/computepb"
	"google.golang.org/api/iterator"
	"google.golang.org/protobuf/proto"

	"github.com/mayfly-ci/mayfly/providers"
)

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
			return nil, fmt.Errorf("list instances: %w", p.throttle(classify(err, "")))
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
