package manager

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/config"
	"github.com/mayfly-ci/mayfly/vmexec"
)

// Helpers finds the mayfly-helper binary for a VM's OS and architecture:
// files named mayfly-helper-<os>-<arch> (".exe" on Windows) in Dir, as
// `make helpers` builds them. Each is read once and kept in memory (about
// 7 MB): it is uploaded to every VM whose job needs it.
type Helpers struct {
	Dir string

	mu    sync.Mutex
	cache map[string][]byte
}

// HelperFileName is the helper's file name for an OS and architecture.
func HelperFileName(goos, arch string) string {
	name := fmt.Sprintf("mayfly-helper-%s-%s", goos, arch)
	if goos == "windows" {
		name += ".exe"
	}
	return name
}

// Lookup returns the helper for goos/arch, or an error wrapping
// fs.ErrNotExist when there is none.
func (h *Helpers) Lookup(goos, arch string) ([]byte, error) {
	if h == nil || h.Dir == "" {
		return nil, fmt.Errorf("no helper directory: %w", fs.ErrNotExist)
	}
	if goos == "" {
		goos = "linux"
	}
	if arch == "" {
		arch = "amd64"
	}
	name := HelperFileName(goos, arch)
	h.mu.Lock()
	defer h.mu.Unlock()
	if b, ok := h.cache[name]; ok {
		return b, nil
	}
	b, err := os.ReadFile(filepath.Join(h.Dir, name))
	if err != nil {
		return nil, fmt.Errorf("helper %s: %w", name, err)
	}
	if h.cache == nil {
		h.cache = map[string][]byte{}
	}
	h.cache[name] = b
	return b, nil
}

// available reports whether a helper exists for goos/arch.
func (h *Helpers) available(goos, arch string) bool {
	_, err := h.Lookup(goos, arch)
	return err == nil
}

// uploadHelper puts mayfly-helper where the plan's stages expect it, once
// per job, over the job's connection, when a stage runs it.
func (m *Manager) uploadHelper(ctx context.Context, r *runner, plan *buildscript.Plan, exec vmexec.Executor, phases *phaseLog) error {
	if !plan.NeedsHelper || plan.HelperPath == "" {
		return nil
	}
	bin, err := m.helpers.Lookup(r.cfg.Fleet.Connector.OS, r.cfg.Fleet.Connector.Arch)
	if err != nil {
		return fmt.Errorf("mayfly-helper for the VM: %w", err)
	}
	start := m.now()
	if err := exec.Upload(ctx, plan.HelperPath, bin, 0o755); err != nil {
		return fmt.Errorf("upload mayfly-helper to %s: %w", plan.HelperPath, err)
	}
	phases.since(PhaseUpload, start)
	return nil
}

// maxCacheArchiveSize is the runner's MaxUploadedArchiveSize, or 0 (the
// helper's default, 5 GB) without a distributed cache.
func maxCacheArchiveSize(rc config.Runner) int64 {
	if rc.Cache == nil {
		return 0
	}
	return rc.Cache.MaxUploadedArchiveSize
}
