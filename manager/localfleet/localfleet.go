// Package localfleet is a stand-in fleet for tests of the job lifecycle: each
// "instance" is a fresh temporary directory on this machine, and scripts run
// in it with the local shell. It keeps the fleet's rules that the manager
// relies on: an instance is handed out once, and is deleted after its job.
package localfleet

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/mayfly-ci/mayfly/manager"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/vmexec"
)

// Fleet keeps Size idle instances ready.
type Fleet struct {
	dir  string
	size int

	mu       sync.Mutex
	cond     *sync.Cond
	idle     []*instance
	next     int
	used     map[string]bool      // every instance ever handed out
	leased   map[string]*instance // instances handed out and not yet released
	reserved int                  // promises not yet taken
	deleted  []string
	closed   bool
}

type instance struct {
	id   string
	root string // plays the role of the VM's file system root
	lost chan struct{}
}

// New returns a fleet of size idle instances whose directories live in dir.
func New(dir string, size int) *Fleet {
	f := &Fleet{dir: dir, size: size, used: map[string]bool{}, leased: map[string]*instance{}}
	f.cond = sync.NewCond(&f.mu)
	f.mu.Lock()
	f.refillLocked()
	f.mu.Unlock()
	return f
}

func (f *Fleet) refillLocked() {
	for !f.closed && len(f.idle) < f.size {
		f.next++
		id := fmt.Sprintf("local-%d", f.next)
		root := filepath.Join(f.dir, id)
		if err := os.MkdirAll(root, 0o755); err != nil {
			panic(fmt.Sprintf("localfleet: %v", err)) // test-only package; a broken temp dir ends the test
		}
		f.idle = append(f.idle, &instance{id: id, root: root, lost: make(chan struct{})})
		f.cond.Broadcast()
	}
}

// Reserve implements manager.Fleet: it promises one of the idle
// instances not promised yet; there is nothing on demand.
func (f *Fleet) Reserve() (manager.Reservation, time.Duration, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed || len(f.idle)-f.reserved <= 0 {
		return nil, 0, false
	}
	f.reserved++
	return &reservation{f: f}, 0, true
}

type reservation struct {
	f    *Fleet
	once sync.Once
}

func (r *reservation) Cancel() {
	r.once.Do(func() {
		r.f.mu.Lock()
		r.f.reserved--
		r.f.mu.Unlock()
	})
}

// Acquire hands out an idle instance, waiting for one until ctx ends.
func (r *reservation) Acquire(ctx context.Context) (manager.Lease, error) {
	ended := true
	r.once.Do(func() { ended = false })
	if ended {
		return nil, errors.New("localfleet: reservation already ended")
	}
	f := r.f
	stop := context.AfterFunc(ctx, func() {
		f.mu.Lock()
		f.cond.Broadcast()
		f.mu.Unlock()
	})
	defer stop()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reserved--
	for len(f.idle) == 0 {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if f.closed {
			return nil, errors.New("localfleet: closed")
		}
		f.cond.Wait()
	}
	in := f.idle[len(f.idle)-1]
	f.idle = f.idle[:len(f.idle)-1]
	if f.used[in.id] {
		return nil, fmt.Errorf("localfleet: instance %s handed out twice", in.id)
	}
	f.used[in.id] = true
	f.leased[in.id] = in
	return &lease{f: f, in: in}, nil
}

// Claim implements manager.Claimer: a manager that resumes a job takes
// back the instance an earlier manager leased to it and never released.
func (f *Fleet) Claim(id string, _ providers.ConnectInfo) (manager.Lease, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	in, ok := f.leased[id]
	if !ok {
		return nil, fmt.Errorf("localfleet: instance %s is not leased (gone)", id)
	}
	return &lease{f: f, in: in}, nil
}

// Lose makes a leased instance vanish under its job, as a preempted VM
// would: its directory is removed and its lease's Lost channel closed.
func (f *Fleet) Lose(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if in, ok := f.leased[id]; ok {
		delete(f.leased, id)
		f.deleteLocked(id)
		close(in.lost)
	}
}

// Leased returns the ids of instances handed out and not yet released.
func (f *Fleet) Leased() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var ids []string
	for id := range f.leased {
		ids = append(ids, id)
	}
	return ids
}

// Deleted returns the ids of deleted instances, in order.
func (f *Fleet) Deleted() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.deleted...)
}

// Close stops refilling and removes every idle instance.
func (f *Fleet) Close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	for _, in := range f.idle {
		os.RemoveAll(in.root)
	}
	f.idle = nil
	f.cond.Broadcast()
}

func (f *Fleet) deleteLocked(id string) {
	for _, d := range f.deleted {
		if d == id {
			return
		}
	}
	f.deleted = append(f.deleted, id)
	os.RemoveAll(filepath.Join(f.dir, id))
}

type lease struct {
	f    *Fleet
	in   *instance
	once sync.Once
}

func (l *lease) ID() string { return l.in.id }

func (l *lease) Lost() <-chan struct{} { return l.in.lost }

func (l *lease) Connect(ctx context.Context) (vmexec.Executor, error) {
	return &executor{root: l.in.root}, nil
}

// Release deletes the instance: every instance runs one job.
func (l *lease) Release(bool) {
	l.once.Do(func() {
		l.f.mu.Lock()
		defer l.f.mu.Unlock()
		delete(l.f.leased, l.in.id)
		l.f.deleteLocked(l.in.id)
		l.f.refillLocked()
	})
}

// executor runs scripts with the local shell; absolute paths in uploads are
// placed under the instance's root directory.
type executor struct {
	root string
}

func (e *executor) Run(ctx context.Context, cmd vmexec.Command) (int, error) {
	shell := cmd.Shell
	if shell == "" {
		shell = "sh"
	}
	env, err := vmexec.ParseEnv(cmd.Env)
	if err != nil {
		return 0, &vmexec.SystemError{Op: "run", Err: err}
	}
	c := exec.Command(shell, "-s")
	c.Dir = e.root
	c.Stdin = strings.NewReader(cmd.Script)
	c.Stdout, c.Stderr = cmd.Stdout, cmd.Stderr
	c.Env = append(os.Environ(), "MAYFLY_INSTANCE_ROOT="+e.root)
	for _, kv := range env {
		c.Env = append(c.Env, kv.Name+"="+kv.Value)
	}
	c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	c.WaitDelay = 5 * time.Second
	if err := c.Start(); err != nil {
		return 0, &vmexec.SystemError{Op: "run", Err: err}
	}
	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			_ = syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
		case <-done:
		}
	}()
	err = c.Wait()
	close(done)
	if ctx.Err() != nil {
		return 0, &vmexec.AbortedError{Cause: context.Cause(ctx), Killed: true}
	}
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) {
		return exitErr.ExitCode(), nil
	}
	if err != nil {
		return 0, &vmexec.SystemError{Op: "run", Err: err}
	}
	return 0, nil
}

func (e *executor) Upload(ctx context.Context, path string, content []byte, mode fs.FileMode) error {
	dst := filepath.Join(e.root, path)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return &vmexec.SystemError{Op: "upload " + path, Err: err}
	}
	if err := os.WriteFile(dst, content, mode); err != nil {
		return &vmexec.SystemError{Op: "upload " + path, Err: err}
	}
	return nil
}

func (e *executor) Close() error { return nil }
