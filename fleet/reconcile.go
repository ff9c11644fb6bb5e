package fleet

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/mayfly-ci/mayfly/providers"
)

// journalError is a journal failure that makes running unsafe.
type journalError struct{ err error }

func (e *journalError) Error() string { return e.err.Error() }
func (e *journalError) Unwrap() error { return e.err }

// recover is the start-up reconciliation. It lists the provider and sorts
// the instances carrying this fleet's labels:
//   - claimed (Claim) for a job the manager resumes: kept, as acquired;
//   - recorded as acquired in the journal, or any at all when the journal
//     is missing or damaged: deleted (they may have run a job);
//   - failed: deleted;
//   - creating: adopted as creating;
//   - running: adopted through provisioning, so they become idle only if
//     the provider still gives valid connect info (and the provisioner
//     passes).
//
// A new journal naming exactly the instances to delete then replaces the
// old one, so a crash during recovery deletes them again next time.
func (f *Fleet) recover(ctx context.Context) error {
	live, trusted, err := loadJournal(f.cfg.JournalPath)
	if err != nil {
		return &journalError{err}
	}
	list, err := f.api.List(ctx)
	if err != nil {
		return fmt.Errorf("list instances: %w", err)
	}
	if !trusted {
		f.log.Warn("no intact journal of acquired instances; every instance with this fleet's labels will be deleted", "journal", f.cfg.JournalPath)
	}
	f.mu.Lock()
	now := f.clock.Now()
	var doomed []string
	adopted, skipped := 0, 0
	for i := range list {
		pi := &list[i]
		if !f.ours(pi) || pi.State == providers.StateDeleting || pi.State == providers.StateGone || f.books[pi.ID] != nil {
			continue
		}
		_, used := live[pi.ID]
		if !used && len(f.books) >= maxListIntake {
			skipped++ // later lists take it up as an orphan
			continue
		}
		switch {
		case used || !trusted:
			in := f.addLocked(pi.ID, StateCreating, now)
			in.journaled = true
			f.deleteLocked(in, ReasonRecovery)
			doomed = append(doomed, pi.ID)
		case pi.State == providers.StateFailed:
			f.deleteLocked(f.addLocked(pi.ID, StateCreating, now), ReasonFailed)
		case pi.State == providers.StateCreating:
			in := f.addLocked(pi.ID, StateCreating, now)
			if pi.ConnectInfo != nil {
				f.startProvisionLocked(in, pi.ConnectInfo)
			}
			adopted++
		case pi.State == providers.StateRunning:
			f.startProvisionLocked(f.addLocked(pi.ID, StateCreating, now), pi.ConnectInfo)
			adopted++
		}
	}
	f.mu.Unlock()
	if skipped > 0 {
		f.log.Warn("the provider lists more instances with this fleet's labels than one list may bring into the books; the rest are taken up by later lists",
			"bound", maxListIntake, "left", skipped)
	}

	f.mu.Lock()
	held := f.claimedLocked() // claimed for resumed jobs: still acquired
	f.mu.Unlock()
	slices.Sort(doomed)
	j, err := createJournal(f.cfg.JournalPath, append(doomed, held...))
	if err != nil {
		return &journalError{err}
	}
	f.mu.Lock()
	f.journal = j
	f.recovered = true
	f.lastList = now
	f.mu.Unlock()
	f.log.Info("start-up reconciliation done", "listed", len(list), "deleting", len(doomed), "adopted", adopted, "journal_trusted", trusted)
	return nil
}

// maxListIntake bounds the instances one list brings into the books
// (adopted at start, or orphans to delete): a provider that lists far more
// instances with this fleet's labels than it ever made (a plugin's bug, or
// a hostile one: its replies are input too) must not flood the books, the
// logs and the API budget. Later lists take up the rest.
const maxListIntake = 200

// orphansNamed is how many orphans one list names in a log line each;
// one line counts the others.
const orphansNamed = 10

// reconcile compares the provider's list with the books:
//   - an instance with our labels that the books do not know is deleted
//     (unless a Create call in flight may have made it: then only once it
//     has been unknown for OrphanGrace);
//   - a creating instance the provider reports running is provisioned;
//   - one reported failed is failed (deleted; if acquired, its lease is
//     lost);
//   - a books entry the list no longer shows is gone (if acquired, its
//     lease is lost; if deleting, its deletion is confirmed).
func (f *Fleet) reconcile(ctx context.Context) {
	f.mu.Lock()
	startSeq, startCalls, startActive := f.seq, f.createCalls, f.creating
	f.mu.Unlock()

	list, err := f.api.List(ctx)

	f.mu.Lock()
	orphans := f.applyListLocked(list, err, startSeq, startCalls, startActive)
	j := f.journal
	f.mu.Unlock()
	// An orphan may be an instance that once ran a job and was dropped
	// from the books: record it, so that a crash before its deletion does
	// not let a restarted fleet adopt it.
	for _, id := range orphans {
		if err := j.Acquired(id); err != nil {
			f.log.Error("journal", "error", err)
		}
	}
}

// applyListLocked applies one list to the books and returns the orphans
// found. f.mu is held.
func (f *Fleet) applyListLocked(list []providers.Instance, err error, startSeq, startCalls uint64, startActive int) (orphans []string) {
	now := f.clock.Now()
	f.lastList = now
	if err != nil {
		if !errors.Is(err, context.Canceled) {
			f.log.Warn("list instances failed", "kind", providers.KindOf(err), "error", err)
		}
		return nil
	}
	overlapped := startActive > 0 || f.createCalls != startCalls || f.creating > 0
	f.listGen++
	gen := f.listGen
	seen := make(map[string]bool, len(f.suspects))
	atProvider := 0
	orphanRoom := maxListIntake
	for _, in := range f.books {
		if in.state == StateDeleting && in.reason == ReasonOrphan {
			orphanRoom--
		}
	}
	skipped := 0
	for i := range list {
		pi := &list[i]
		if !f.ours(pi) {
			continue
		}
		if pi.State != providers.StateDeleting && pi.State != providers.StateGone {
			atProvider++
		}
		in := f.books[pi.ID]
		if in == nil {
			if pi.State == providers.StateDeleting || pi.State == providers.StateGone {
				continue
			}
			first, known := f.suspects[pi.ID]
			if !known {
				first = now
			}
			if overlapped && now.Sub(first) < f.cfg.OrphanGrace {
				f.suspects[pi.ID] = first
				seen[pi.ID] = true
				continue
			}
			if orphanRoom <= 0 {
				skipped++
				continue
			}
			orphanRoom--
			if len(orphans) < orphansNamed {
				f.log.Warn("instance with this fleet's labels is not in the books", "instance", pi.ID, "state", pi.State)
			}
			in := f.addLocked(pi.ID, StateCreating, now)
			in.journaled = true
			f.deleteLocked(in, ReasonOrphan)
			orphans = append(orphans, pi.ID)
			continue
		}
		in.listGen = gen
		switch pi.State {
		case providers.StateRunning:
			if in.state == StateCreating {
				if !in.requestedAt.IsZero() {
					f.seenRunning.Observe(now.Sub(in.createdAt))
				}
				f.startProvisionLocked(in, pi.ConnectInfo)
			}
		case providers.StateCreating:
			if in.state == StateCreating && pi.ConnectInfo != nil {
				f.startProvisionLocked(in, pi.ConnectInfo) // wait for SSH or WinRM now
			}
		case providers.StateFailed:
			f.providerLostLocked(in, "failed: "+pi.Reason)
		case providers.StateDeleting, providers.StateGone:
			if in.state != StateDeleting {
				f.providerLostLocked(in, string(pi.State)+" outside the fleet")
			}
		}
	}
	f.m.atProvider.WithLabelValues(f.cfg.Name).Set(float64(atProvider))
	if len(orphans) > orphansNamed || skipped > 0 {
		f.log.Warn("the provider lists many instances with this fleet's labels that are not in the books; deleting them, at most a bound at once, the rest after later lists",
			"deleting", len(orphans), "named", orphansNamed, "bound", maxListIntake, "left", skipped)
	}

	for id := range f.suspects {
		if !seen[id] {
			delete(f.suspects, id)
		}
	}
	for _, in := range f.books {
		if in.listGen == gen || in.addedSeq > startSeq {
			continue
		}
		switch in.state {
		case StateCreating, StateProvisioning, StateIdle:
			f.providerFailureLocked("list", "vanished", false)
			f.log.Warn("instance vanished from the provider", "instance", in.id, "state", in.state)
		case StateAcquired:
			f.log.Warn("acquired instance vanished from the provider", "instance", in.id)
		}
		f.goneLocked(in)
	}
	return orphans
}

// providerLostLocked handles an instance the provider reports failed or
// being deleted by someone else.
func (f *Fleet) providerLostLocked(in *instance, why string) {
	switch in.state {
	case StateCreating, StateProvisioning, StateIdle:
		f.failLocked(in, OpList, "instance_failed", errors.New(why))
	case StateAcquired:
		f.log.Warn("acquired instance lost", "instance", in.id, "why", why)
		f.loseLocked(in)
		f.deleteLocked(in, ReasonLost)
	}
}
