package gce

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	compute "cloud.google.com/go/compute/apiv1"
	"cloud.google.com/go/compute/apiv1/computepb"

	"github.com/mayfly-ci/mayfly/providers"
)

// Delete implements providers.Provider: one instances.delete per id; an
// accepted deletion or a 404 confirms the id. It does not wait for the
// delete operation: List shows the instance deleting until it is gone.
// Ids that are not of the form <zone>/<name> were never issued by this
// plugin and are confirmed without a call.
func (p *Provider) Delete(ctx context.Context, ids []string) ([]string, error) {
	s, ic, _, err := p.client()
	if err != nil {
		return nil, err
	}
	var (
		mu        sync.Mutex
		confirmed []string
		errs      []error
		todo      []string
		wg        sync.WaitGroup
	)
	for _, id := range slices.Compact(slices.Sorted(slices.Values(ids))) {
		if _, _, ok := splitID(id); ok {
			todo = append(todo, id)
		} else {
			confirmed = append(confirmed, id)
		}
	}
	for range min(len(todo), s.CreateConcurrency) {
		wg.Go(func() {
			for {
				mu.Lock()
				if len(todo) == 0 {
					mu.Unlock()
					return
				}
				id := todo[0]
				todo = todo[1:]
				mu.Unlock()
				err := p.deleteOne(ctx, s, ic, id)
				mu.Lock()
				if err == nil {
					confirmed = append(confirmed, id)
				} else {
					errs = append(errs, err)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	slices.Sort(confirmed)
	return confirmed, errors.Join(errs...)
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
		err = classify(err, zone)
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
