package config

import (
	"context"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// Store holds the config in force and reloads it from disk. A reload that
// fails keeps the config in force: a bad edit never stops a running manager.
type Store struct {
	path string
	log  *slog.Logger

	mu   sync.RWMutex
	cur  *Config
	hash [sha256.Size]byte
}

// NewStore loads path; unlike a reload, the first load must succeed.
func NewStore(path string, log *slog.Logger) (*Store, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Store{path: path, log: log}
	if _, err := s.Reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// SetLogger sets the logger of Watch, once the config has told how to log.
func (s *Store) SetLogger(log *slog.Logger) {
	s.mu.Lock()
	s.log = log
	s.mu.Unlock()
}

// Current returns the config in force. The returned value is never modified.
func (s *Store) Current() *Config {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.cur
}

// Reload reads the file again. When its content is unchanged it does
// nothing; when the new content is invalid it returns the error and keeps
// the config in force. changed reports whether a new config took effect.
func (s *Store) Reload() (changed bool, err error) {
	data, err := os.ReadFile(s.path)
	if err != nil {
		return false, fmt.Errorf("reload config: %w", err)
	}
	sum := sha256.Sum256(data)
	s.mu.RLock()
	same := s.cur != nil && sum == s.hash
	s.mu.RUnlock()
	if same {
		return false, nil
	}
	return s.apply(data, sum)
}

// apply parses data and makes it the config in force.
func (s *Store) apply(data []byte, sum [sha256.Size]byte) (bool, error) {
	cfg, err := Parse(s.path, data)
	if err != nil {
		return false, fmt.Errorf("reload config (keeping the config in force): %w", err)
	}
	s.mu.Lock()
	s.cur, s.hash = cfg, sum
	s.mu.Unlock()
	return true, nil
}

// Watch reloads the file every interval until ctx ends, calling onChange
// with each new config that takes effect. A changed file is applied only
// once it has stayed the same for one whole interval, so a file caught
// half-written is never applied (even when what was written so far
// parses). Rejected reloads are logged once per distinct error; the config
// in force stays until the file is fixed. A reload that leaves a runner
// without the idle policy entries it had is applied with a warning.
func (s *Store) Watch(ctx context.Context, interval time.Duration, onChange func(*Config)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	w := watcher{s: s, onChange: onChange}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			w.tick()
		}
	}
}

// watcher is what Watch keeps from one tick to the next.
type watcher struct {
	s        *Store
	onChange func(*Config)
	lastErr  string
	pending  [sha256.Size]byte // content seen changed at the last tick
}

// tick reads the file once and applies it when it is what the last tick
// saw changed.
func (w *watcher) tick() {
	s := w.s
	data, err := os.ReadFile(s.path)
	if err != nil {
		w.lastErr = s.logRejected(fmt.Errorf("reload config: %w", err), w.lastErr)
		return
	}
	sum := sha256.Sum256(data)
	s.mu.RLock()
	same := sum == s.hash
	s.mu.RUnlock()
	switch {
	case same:
		w.pending = [sha256.Size]byte{}
		return
	case sum != w.pending:
		w.pending = sum // changed: apply it if it is still this at the next tick
		return
	}
	old := s.Current()
	changed, err := s.apply(data, sum)
	switch {
	case err != nil:
		w.lastErr = s.logRejected(err, w.lastErr)
	case changed:
		w.lastErr = ""
		cfg := s.Current()
		s.log.Info("config reloaded", "path", s.path, "runners", len(cfg.Runners))
		for _, warn := range cfg.Warnings {
			s.log.Warn("config", "warning", warn.String())
		}
		for _, warn := range PolicyLoss(old, cfg) {
			s.log.Warn("config reloaded without idle policies a runner had", "path", s.path, "warning", warn)
		}
		if w.onChange != nil {
			w.onChange(cfg)
		}
	}
}

// logRejected logs a rejected reload unless it is the same error as the
// last one, and returns the error's text.
func (s *Store) logRejected(err error, last string) string {
	if err.Error() != last {
		s.log.Error("config reload rejected; keeping the config in force", "path", s.path, "err", err)
	}
	return err.Error()
}

// PolicyLoss names each runner of old whose idle policy entries (autoscaling
// periods or autoscaler policies) are all gone in next: a reload that does
// that is more often a mistake than a wish, and is worth a warning.
func PolicyLoss(old, next *Config) []string {
	if old == nil || next == nil {
		return nil
	}
	var out []string
	for _, o := range old.Runners {
		for _, n := range next.Runners {
			if o.Name == n.Name && len(o.Fleet.Schedule.Entries) > 0 && len(n.Fleet.Schedule.Entries) == 0 {
				out = append(out, fmt.Sprintf("runner %q had %d idle policy entries and has none now; its default policy (IdleCount %d) applies",
					o.Name, len(o.Fleet.Schedule.Entries), n.Fleet.Schedule.Default.IdleCount))
			}
		}
	}
	return out
}
