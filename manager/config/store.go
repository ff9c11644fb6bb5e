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
// with each new config that takes effect. Errors are logged, not returned:
// the old config stays in force until the file is fixed.
func (s *Store) Watch(ctx context.Context, interval time.Duration, onChange func(*Config)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	var lastErr string
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		changed, err := s.Reload()
		switch {
		case err != nil:
			// Log a broken file once, not on every tick.
			if err.Error() != lastErr {
				s.log.Error("config reload failed; keeping the config in force", "path", s.path, "err", err)
				lastErr = err.Error()
			}
		case changed:
			lastErr = ""
			cfg := s.Current()
			s.log.Info("config reloaded", "path", s.path, "runners", len(cfg.Runners))
			for _, w := range cfg.Warnings {
				s.log.Warn("config", "warning", w.String())
			}
			if onChange != nil {
				onChange(cfg)
			}
		}
	}
}
