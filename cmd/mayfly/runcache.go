package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"time"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/cachestore"
	"github.com/mayfly-ci/mayfly/manager/config"
	"github.com/mayfly-ci/mayfly/manager/gitlab"
)

// cacheStores are the cache signers of the runners and the local stores
// the manager serves for them (one per listen address).
type cacheStores struct {
	signers map[string]buildscript.CacheSigner
	wg      sync.WaitGroup
}

// startCaches builds each runner's cache signer from [runners.cache] and
// serves the local stores until ctx ends; wait for them with wg.
func startCaches(ctx context.Context, cfg *config.Config, log *slog.Logger) (*cacheStores, error) {
	cs := &cacheStores{signers: map[string]buildscript.CacheSigner{}}
	locals := map[string]*cachestore.Local{}
	for _, r := range cfg.Runners {
		if r.Cache == nil {
			continue
		}
		var local *cachestore.Local
		if l := r.Cache.Local; l != nil {
			local = locals[l.ListenAddress]
			if local == nil {
				var err error
				local, err = cachestore.NewLocal(cachestore.LocalOptions{
					Dir: filepath.Clean(l.Dir), URL: l.URL, MaxBytes: l.MaxSizeMB << 20,
					Expiry: time.Duration(l.ExpiryDays) * 24 * time.Hour, MaxObjectBytes: r.Cache.MaxUploadedArchiveSize, Logger: log.With("component", "local-cache"),
				})
				if err != nil {
					return nil, fmt.Errorf("runner %q: %w", r.Name, err)
				}
				var lc net.ListenConfig
				ln, err := lc.Listen(ctx, "tcp", l.ListenAddress)
				if err != nil {
					return nil, fmt.Errorf("runner %q: local cache: %w", r.Name, err)
				}
				locals[l.ListenAddress] = local
				cs.wg.Add(1)
				go func() {
					defer cs.wg.Done()
					if err := local.Serve(ctx, ln); err != nil {
						log.Error("local cache stopped", "addr", l.ListenAddress, "err", err)
					}
				}()
				log.Info("local cache serving", "addr", l.ListenAddress, "url", l.URL, "dir", l.Dir)
			}
		}
		s, err := cachestore.New(ctx, r.Cache, gitlab.ShortToken(r.Token), local)
		if err != nil {
			return nil, fmt.Errorf("runner %q: %w", r.Name, err)
		}
		cs.signers[r.Name] = s
	}
	return cs, nil
}
