package gce

import (
	"context"
	"fmt"
	"slices"
	"time"

	compute "cloud.google.com/go/compute/apiv1"
	"cloud.google.com/go/compute/apiv1/computepb"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/pluginkit"
)

// Delete implements providers.Provider: one instances.delete per id; an
// accepted deletion or a 404 confirms the id. It does not wait for the
// delete operation: List shows the instance deleting until it is gone.
// Ids that are not of the form <zone>/<name> were never issued by this
// plugin and are confirmed without a call. At most CreateConcurrency
// deletions are requested at once; partial failures follow
// pluginkit.FanOut's rule.
func (p *Provider) Delete(ctx context.Context, ids []string) ([]string, error) {
	s, ic, _, err := p.client()
	if err != nil {
		return nil, err
	}
	var confirmed, todo []string
	for _, id := range slices.Compact(slices.Sorted(slices.Values(ids))) {
		if _, _, ok := splitID(id); ok {
			todo = append(todo, id)
		} else {
			confirmed = append(confirmed, id)
		}
	}
	deleted, err := pluginkit.FanOut(ctx, len(todo), s.CreateConcurrency, func(ctx context.Context, i int) (string, error) {
		if err := p.deleteOne(ctx, s, ic, todo[i]); err != nil {
			return "", err
		}
		return todo[i], nil
	})
	confirmed = append(confirmed, deleted...)
	slices.Sort(confirmed)
	return confirmed, err
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
		err = p.throttle(classify(err, zone))
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
