package manager

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strings"
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
	sums  map[*byte]string // by binary
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
	if baked(ctx, plan, exec, m.helpers.sum(bin)) {
		phases.since(PhaseUpload, start)
		return nil
	}
	if err := exec.Upload(ctx, plan.HelperPath, bin, 0o755); err != nil {
		return fmt.Errorf("upload mayfly-helper to %s: %w", plan.HelperPath, err)
	}
	phases.since(PhaseUpload, start)
	return nil
}

// helperUploadAttempts bounds the uploads of mayfly-helper to a job's VM
// over connections that drop.
const helperUploadAttempts = 8

// retryOnNewConnection runs step on exec and, when it fails with a system
// failure (the connection dropped), again on a new connection from redial,
// up to attempts times in all: the helper upload (megabytes) is the one
// step before the stages, which reconnect by themselves. It returns the
// executor the step succeeded on, for the steps after it.
func retryOnNewConnection(ctx context.Context, exec vmexec.Executor, redial func(context.Context) (vmexec.Executor, error), attempts int,
	step func(vmexec.Executor) error, log *slog.Logger) (vmexec.Executor, error) {
	for attempt := 1; ; attempt++ {
		err := step(exec)
		if err == nil {
			return exec, nil
		}
		if attempt >= attempts || ctx.Err() != nil || !vmexec.IsSystemFailure(err) {
			return exec, err
		}
		log.Warn("the connection dropped; trying again on a new one", "attempt", attempt, "err", err)
		e, rerr := redial(ctx)
		if rerr != nil {
			return exec, fmt.Errorf("%w (reconnecting: %v)", err, rerr)
		}
		exec = e
	}
}

// maxCacheArchiveSize is the runner's MaxUploadedArchiveSize, or 0 (the
// helper's default, 5 GB) without a distributed cache.
func maxCacheArchiveSize(rc config.Runner) int64 {
	if rc.Cache == nil {
		return 0
	}
	return rc.Cache.MaxUploadedArchiveSize
}

// BakedHelperPath is where a VM image may hold mayfly-helper: when its
// SHA-256 is the manager's helper's, the job links it instead of getting
// an upload (about 7 MB over the job's connection).
const BakedHelperPath = "/usr/local/bin/mayfly-helper"

// bakedHelperPath is BakedHelperPath, or a test's file.
var bakedHelperPath = BakedHelperPath

// bakedMarker is what the check prints when the image's helper is used.
const bakedMarker = "mayfly-helper-baked"

// baked links the image's helper at the plan's path when it is the same
// binary, in one round trip; false means it has to be uploaded.
func baked(ctx context.Context, plan *buildscript.Plan, exec vmexec.Executor, sum string) bool {
	if plan.Shell != buildscript.ShellBash && plan.Shell != buildscript.ShellSh {
		return false
	}
	q := func(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }
	script := fmt.Sprintf(`p=%s; if [ -x "$p" ] && [ "$(sha256sum "$p" 2>/dev/null | cut -d' ' -f1)" = %s ]; then mkdir -p %s && ln -sf "$p" %s && echo %s; fi`,
		q(bakedHelperPath), q(sum), q(path.Dir(plan.HelperPath)), q(plan.HelperPath), bakedMarker)
	var out strings.Builder
	code, err := exec.Run(ctx, vmexec.Command{Script: script, Shell: "sh", Stdout: &out})
	return err == nil && code == 0 && strings.TrimSpace(out.String()) == bakedMarker
}

// sum is the SHA-256 of a helper binary, in hex, computed once.
func (h *Helpers) sum(bin []byte) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.sums == nil {
		h.sums = map[*byte]string{}
	}
	if len(bin) == 0 {
		return ""
	}
	if s, ok := h.sums[&bin[0]]; ok {
		return s
	}
	d := sha256.Sum256(bin)
	s := hex.EncodeToString(d[:])
	h.sums[&bin[0]] = s
	return s
}
