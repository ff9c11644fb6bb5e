package gce

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/base32"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"cloud.google.com/go/compute/apiv1/computepb"
	"google.golang.org/protobuf/proto"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/pluginkit"
)

var nameEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// newName returns prefix-<12 random characters>.
func newName(prefix string) string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return prefix + "-" + nameEncoding.EncodeToString(b)[:12]
}

// Create implements providers.Provider: one instances.insert per instance
// (in parallel, at most CreateConcurrency at once), each followed by
// zoneOperations.wait until the operation is done. A zone out of capacity
// is tried last for CapacityCooldown and the next zone is tried
// (pluginkit.Placement). Partial failures follow pluginkit.FanOut's rule.
func (p *Provider) Create(ctx context.Context, n int, labels map[string]string) ([]string, error) {
	s, _, _, err := p.client()
	if err != nil {
		return nil, err
	}
	switch {
	case n < 0:
		return nil, providers.InvalidArgument(fmt.Errorf("create %d instances: count is negative", n))
	case n == 0:
		return nil, nil
	}
	if err := pluginkit.CheckCreateLabels(labels, s.Manager); err != nil {
		return nil, err
	}
	gl, err := gceLabels(labels)
	if err != nil {
		return nil, providers.InvalidArgument(fmt.Errorf("create: %w", err))
	}
	stored, err := json.Marshal(labels)
	if err != nil {
		return nil, providers.InvalidArgument(fmt.Errorf("create: labels: %w", err))
	}

	ids, err := pluginkit.FanOut(ctx, n, s.CreateConcurrency, func(ctx context.Context, _ int) (string, error) {
		return p.createOne(ctx, s, gl, string(stored))
	})
	slices.Sort(ids)
	return ids, err
}

// createOne creates one instance, falling back through the zones on
// capacity exhaustion. It returns the id when the instance exists or may
// exist (an operation whose outcome is unknown), so that it is tracked.
func (p *Provider) createOne(ctx context.Context, s Settings, labels map[string]string, stored string) (string, error) {
	name := newName(s.NamePrefix)
	sec, err := newSecret(s)
	if err != nil {
		return "", fmt.Errorf("create instance %s: %w", name, err)
	}
	_, ic, _, err := p.client()
	if err != nil {
		return "", err
	}
	var id string
	err = p.placement().Try("", func(zone string, _ int) error {
		id = instanceID(zone, name)
		res, err := p.instanceResource(s, zone, name, labels, stored, sec)
		if err != nil {
			id = ""
			return err
		}
		cctx, cancel := context.WithTimeout(ctx, apiCallTimeout)
		op, err := ic.Insert(cctx, &computepb.InsertInstanceRequest{Project: s.Project, Zone: zone, InstanceResource: res}, noRetry)
		cancel()
		if err != nil {
			id = ""
			return p.throttle(classify(err, zone))
		}
		err = p.waitOp(ctx, s, zone, op.Proto())
		switch {
		case err == nil:
			p.putSecret(id, sec)
			p.log.Info("instance created", "id", id, "zone", zone)
			return nil
		case isCapacity(err) || isDefinite(err):
			// The operation failed: the instance does not exist.
			id = ""
			return err
		}
		// The insert was accepted and its outcome is unknown: the instance
		// may exist, so hand its id out to be tracked.
		p.putSecret(id, sec)
		return err
	})
	if err != nil {
		return id, fmt.Errorf("create instance %s: %w", cmp.Or(id, name), err)
	}
	return id, nil
}

func isCapacity(err error) bool {
	_, ok := providers.IsCapacityExhausted(err)
	return ok
}

// isDefinite reports whether err is a failed operation whose instance
// certainly does not exist (the operation finished with an error).
func isDefinite(err error) bool {
	var oe *opFailed
	return errors.As(err, &oe)
}

// opFailed marks an error reported by a finished operation.
type opFailed struct{ err error }

func (e *opFailed) Error() string { return e.err.Error() }
func (e *opFailed) Unwrap() error { return e.err }

// waitOp waits for a zone operation to finish, with zoneOperations.wait,
// bounded by OperationTimeout and maxWaitCalls. A failed operation's error
// is classified and wrapped in *opFailed.
func (p *Provider) waitOp(ctx context.Context, s Settings, zone string, op *computepb.Operation) error {
	_, _, oc, err := p.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, time.Duration(s.OperationTimeout))
	defer cancel()
	for i := 0; op.GetStatus() != computepb.Operation_DONE; i++ {
		if i >= maxWaitCalls {
			return providers.Transient(fmt.Errorf("operation %s not done after %d waits", op.GetName(), i))
		}
		wctx, wcancel := context.WithTimeout(ctx, waitCallTimeout)
		next, err := oc.Wait(wctx, &computepb.WaitZoneOperationRequest{Project: s.Project, Zone: zone, Operation: op.GetName()}, noRetry)
		wcancel()
		if err != nil {
			return fmt.Errorf("wait for operation %s: %w", op.GetName(), p.throttle(classify(err, zone)))
		}
		op = next
	}
	if err := operationError(op, zone); err != nil {
		return &opFailed{err: p.throttle(err)}
	}
	return nil
}

// instanceResource builds the instances.insert body.
func (p *Provider) instanceResource(s Settings, zone, name string, labels map[string]string, stored string, sec *secret) (*computepb.Instance, error) {
	items := []*computepb.Items{
		{Key: proto.String(metadataLabels), Value: proto.String(stored)},
	}
	if s.OS == "windows" {
		entry, err := sec.windowsKeyEntry(s.Username, time.Now().Add(time.Hour))
		if err != nil {
			return nil, err
		}
		items = append(items,
			&computepb.Items{Key: proto.String(metadataWindowsKeys), Value: proto.String(entry)},
			// The startup script creates the WinRM HTTPS listener and
			// publishes its certificate in guest attributes.
			&computepb.Items{Key: proto.String("windows-startup-script-ps1"), Value: proto.String(windowsStartupScript(s.StartupScript))},
			&computepb.Items{Key: proto.String(metadataGuestAttributes), Value: proto.String("TRUE")},
		)
	} else {
		items = append(items,
			&computepb.Items{Key: proto.String(metadataSSHKeys), Value: proto.String(sec.sshKeysEntry(s.Username))},
			// Only our key logs in, also when the project sets keys or OS Login.
			&computepb.Items{Key: proto.String("block-project-ssh-keys"), Value: proto.String("TRUE")},
			&computepb.Items{Key: proto.String("enable-oslogin"), Value: proto.String("FALSE")},
			// The guest agent publishes the SSH host keys there.
			&computepb.Items{Key: proto.String(metadataGuestAttributes), Value: proto.String("TRUE")},
		)
		if s.StartupScript != "" {
			items = append(items, &computepb.Items{Key: proto.String("startup-script"), Value: proto.String(s.StartupScript)})
		}
	}
	disk := &computepb.AttachedDiskInitializeParams{SourceImage: proto.String(s.sourceImage())}
	if s.DiskSizeGB > 0 {
		disk.DiskSizeGb = proto.Int64(s.DiskSizeGB)
	}
	if s.DiskType != "" {
		disk.DiskType = proto.String(fmt.Sprintf("zones/%s/diskTypes/%s", zone, s.DiskType))
	}
	nic := &computepb.NetworkInterface{Network: proto.String(s.networkPath())}
	if sub := s.subnetworkPath(zone); sub != "" {
		nic.Subnetwork = proto.String(sub)
	}
	if *s.ExternalIP {
		nic.AccessConfigs = []*computepb.AccessConfig{{Name: proto.String("External NAT"), Type: proto.String("ONE_TO_ONE_NAT")}}
	}
	// A VM that crashes or loses its host must not come back mid-job.
	sched := &computepb.Scheduling{AutomaticRestart: proto.Bool(false)}
	switch {
	case s.Spot:
		sched.ProvisioningModel = proto.String("SPOT")
		sched.OnHostMaintenance = proto.String("TERMINATE")
	case s.Preemptible:
		sched.Preemptible = proto.Bool(true)
		sched.OnHostMaintenance = proto.String("TERMINATE")
	}
	inst := &computepb.Instance{
		Name:        proto.String(name),
		MachineType: proto.String(fmt.Sprintf("zones/%s/machineTypes/%s", zone, s.MachineType)),
		Labels:      labels,
		Metadata:    &computepb.Metadata{Items: items},
		Disks: []*computepb.AttachedDisk{{
			Boot:             proto.Bool(true),
			AutoDelete:       proto.Bool(true),
			Type:             proto.String("PERSISTENT"),
			InitializeParams: disk,
		}},
		NetworkInterfaces: []*computepb.NetworkInterface{nic},
		Scheduling:        sched,
	}
	if len(s.NetworkTags) > 0 {
		inst.Tags = &computepb.Tags{Items: s.NetworkTags}
	}
	if s.ServiceAccount != "" {
		inst.ServiceAccounts = []*computepb.ServiceAccount{{
			Email:  proto.String(s.ServiceAccount),
			Scopes: s.ServiceAccountScopes,
		}}
	}
	return inst, nil
}
