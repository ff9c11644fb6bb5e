package fleet

import (
	"context"
	"io"

	"github.com/mayfly-ci/mayfly/providers"
)

// Attachment is something a Provisioner keeps open for an instance it made
// ready, such as a verified connection, so that the job that takes the
// instance finds it warm. It is opaque to the fleet, which keeps it with the
// instance, hands it to the lease (Lease.Attachment), and closes it when the
// instance is deleted, gone or failed, and at shutdown for the instances
// not leased. Close must not block for long. It is an io.Closer, so a
// Provisioner need not import the fleet.
type Attachment = io.Closer

// Attacher is a Provisioner that leaves an Attachment with the instance it
// made ready. The fleet calls ProvisionAttach instead of Provision.
type Attacher interface {
	Provisioner
	ProvisionAttach(ctx context.Context, inst providers.Instance, ci providers.ConnectInfo) (Attachment, error)
}

// Attachment returns what the Provisioner left open for the instance (nil
// for none). It stays the fleet's: the holder of the lease uses it while
// the lease lasts and must not close it.
func (l *Lease) Attachment() Attachment {
	l.f.mu.Lock()
	defer l.f.mu.Unlock()
	return l.in.attach
}

// provisionAttach runs the provisioner, keeping its attachment if it has one.
func (f *Fleet) provisionAttach(ctx context.Context, inst providers.Instance, ci providers.ConnectInfo) (Attachment, error) {
	if a, ok := f.cfg.Provisioner.(Attacher); ok {
		return a.ProvisionAttach(ctx, inst, ci)
	}
	return nil, f.cfg.Provisioner.Provision(ctx, inst, ci)
}

// dropAttachLocked queues in's attachment for closing (closeAttachments).
// f.mu is held.
func (f *Fleet) dropAttachLocked(in *instance) {
	if in.attach != nil {
		f.toClose = append(f.toClose, in.attach)
		in.attach = nil
	}
}

// closeAttachments closes the attachments of instances that went away.
// f.mu must not be held.
func (f *Fleet) closeAttachments() {
	f.mu.Lock()
	list := f.toClose
	f.toClose = nil
	f.mu.Unlock()
	for _, a := range list {
		if err := a.Close(); err != nil {
			f.log.Debug("close instance attachment", "error", err)
		}
	}
}
