package qemuvm

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/crypto/ssh"
)

// Condition is what a VM's metadata, process and console log say about it.
type Condition string

// Conditions reported by Check.
const (
	// Booting: qemu runs, the guest is not ready yet, the deadline is ahead.
	Booting Condition = "booting"
	// Ready: qemu runs and the guest printed the ready marker.
	Ready Condition = "ready"
	// Failed: the boot failed or timed out, or qemu is gone.
	Failed Condition = "failed"
)

// Check tells whether the VM is booting, ready or failed, and why it
// failed. It works on a VM found with Open, e.g. by a process that did not
// start it. A Failed VM whose qemu still runs (a passed boot deadline
// nobody enforced) should be stopped by the caller, e.g. with Fail.
func (vm *VM) Check() (Condition, string) {
	if vm.FailReason != "" {
		return Failed, vm.FailReason
	}
	running := vm.Running()
	switch m := markers(vm.StateDir); {
	case m == markerFailed:
		reason := ErrGuestFailed.Error()
		if last := vm.lastOutput(); last != "" {
			reason += ": " + last
		}
		return Failed, reason
	case (m == markerReady || vm.ReadyAfter > 0) && running:
		return Ready, ""
	case m == markerReady || vm.ReadyAfter > 0:
		return Failed, fmt.Sprintf("qemu (pid %d) exited after the guest was ready", vm.PID)
	case !running:
		reason := fmt.Sprintf("%v (pid %d)", ErrExited, vm.PID)
		if last := vm.lastOutput(); last != "" {
			reason += ": " + last
		}
		return Failed, reason
	case !vm.BootDeadline.IsZero() && time.Now().After(vm.BootDeadline):
		return Failed, fmt.Sprintf("%v by %s", ErrBootTimeout, vm.BootDeadline.Format(time.RFC3339))
	}
	return Booting, ""
}

// Fail kills the VM's qemu and records reason in its metadata, so that Check
// reports it failed from then on. The state directory stays.
func (vm *VM) Fail(ctx context.Context, reason string) error {
	if err := vm.kill(ctx); err != nil {
		return err
	}
	vm.FailReason = reason
	if err := vm.writeState(); err != nil {
		return fmt.Errorf("fail vm %s: %w", vm.Name, err)
	}
	vm.log.Warn("vm failed", "vm", vm.Name, "pid", vm.PID, "reason", reason)
	return nil
}

// writeState writes the pid file and the metadata file, each atomically.
func (vm *VM) writeState() error {
	meta, err := json.MarshalIndent(vm, "", "  ")
	if err != nil {
		return fmt.Errorf("vm %s metadata: %w", vm.Name, err)
	}
	for name, data := range map[string][]byte{
		PIDFile:      []byte(strconv.Itoa(vm.PID) + "\n"),
		MetadataFile: meta,
	} {
		p := filepath.Join(vm.StateDir, name)
		if err := os.WriteFile(p+".tmp", data, 0o600); err != nil {
			return fmt.Errorf("vm %s: %w", vm.Name, err)
		}
		if err := os.Rename(p+".tmp", p); err != nil {
			return fmt.Errorf("vm %s: %w", vm.Name, err)
		}
	}
	return nil
}

// tail returns the last n lines of a file, prefixed with its name.
func tail(p string, n int) string {
	b, err := os.ReadFile(p)
	if err != nil || len(bytes.TrimSpace(b)) == 0 {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "--- " + filepath.Base(p) + "\n" + strings.Join(lines, "\n") + "\n"
}

// Open finds the VM whose state directory is dir, e.g. one started by an
// earlier process, so that it can be stopped.
func Open(dir string) (*VM, error) {
	b, err := os.ReadFile(filepath.Join(dir, MetadataFile))
	if err != nil {
		return nil, fmt.Errorf("open vm %s: %w", dir, err)
	}
	vm := new(VM)
	if err := json.Unmarshal(b, vm); err != nil {
		return nil, fmt.Errorf("open vm %s: %s: %w", dir, MetadataFile, err)
	}
	if p, err := os.ReadFile(filepath.Join(dir, PIDFile)); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(p))); err == nil {
			vm.PID = pid
		}
	}
	if vm.PID <= 0 {
		return nil, fmt.Errorf("open vm %s: no valid pid", dir)
	}
	if vm.HostKeyLine != "" {
		if vm.HostKey, _, _, _, err = ssh.ParseAuthorizedKey([]byte(vm.HostKeyLine)); err != nil {
			return nil, fmt.Errorf("open vm %s: host key: %w", dir, err)
		}
	}
	vm.StateDir = dir
	vm.log = slog.Default()
	return vm, nil
}

// List opens every VM state directory directly under root. Directories
// without metadata (half-created or half-removed) are returned in partial.
func List(root string) (vms []*VM, partial []string, err error) {
	entries, err := os.ReadDir(root)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("list vms: %w", err)
	}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(root, e.Name())
		vm, err := Open(dir)
		if err != nil {
			partial = append(partial, dir)
			continue
		}
		vms = append(vms, vm)
	}
	return vms, partial, nil
}

// Running reports whether the VM's qemu process is alive.
func (vm *VM) Running() bool {
	if vm.exited != nil {
		select {
		case <-vm.exited:
			return false
		default:
			return true
		}
	}
	return vm.ours()
}

// ours reports whether PID is alive and is this VM's qemu (guards against a
// recycled pid): its command line names the state directory.
func (vm *VM) ours() bool {
	cmdline, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(vm.PID), "cmdline"))
	if err != nil || len(cmdline) == 0 { // gone, or a zombie
		return false
	}
	return bytes.Contains(cmdline, []byte(vm.StateDir+string(filepath.Separator)))
}

// Stop kills the VM's qemu process group, waits for it to exit and removes
// the state directory. It is safe to call more than once and on a VM found
// with Open; ctx bounds the wait.
func (vm *VM) Stop(ctx context.Context) error {
	if err := vm.kill(ctx); err != nil {
		return err
	}
	_, statErr := os.Stat(vm.StateDir)
	if err := os.RemoveAll(vm.StateDir); err != nil {
		return fmt.Errorf("stop vm %s: %w", vm.Name, err)
	}
	if statErr == nil {
		vm.log.Info("vm stopped", "vm", vm.Name, "pid", vm.PID)
	}
	return nil
}

// kill sends SIGKILL to the qemu process group and waits until it is gone.
func (vm *VM) kill(ctx context.Context) error {
	if vm.exited != nil { // our child: the group is ours, Wait reaps it
		_ = syscall.Kill(-vm.PID, syscall.SIGKILL)
		select {
		case <-vm.exited:
			return nil
		case <-ctx.Done():
			return fmt.Errorf("stop vm %s: pid %d did not exit: %w", vm.Name, vm.PID, ctx.Err())
		}
	}
	if !vm.ours() {
		return nil
	}
	if err := syscall.Kill(-vm.PID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("stop vm %s: kill %d: %w", vm.Name, vm.PID, err)
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for vm.ours() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("stop vm %s: pid %d did not exit: %w", vm.Name, vm.PID, ctx.Err())
		case <-tick.C:
		}
	}
	return nil
}

// Remove stops the VM whose state directory is dir and removes dir. Unlike
// Open followed by Stop it also handles a directory whose metadata was never
// written (a process that died while starting the VM): every qemu process
// whose command line names dir's console file is killed. A missing dir is
// not an error.
func Remove(ctx context.Context, dir string) error {
	dir = filepath.Clean(dir)
	if vm, err := Open(dir); err == nil {
		if err := vm.kill(ctx); err != nil {
			return err
		}
	}
	for _, pid := range processesUsing(dir) {
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("remove vm %s: kill %d: %w", dir, pid, err)
		}
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for len(processesUsing(dir)) > 0 {
		select {
		case <-ctx.Done():
			return fmt.Errorf("remove vm %s: processes still running: %w", dir, ctx.Err())
		case <-tick.C:
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove vm %s: %w", dir, err)
	}
	return nil
}
