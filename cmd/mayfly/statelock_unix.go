//go:build unix

package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// lockStateDir takes the state directory for this process alone: two
// managers must never share the journals of one fleet. A manager that
// takes over from one handing over (SIGUSR2) waits up to wait for it to
// exit. The lock goes with the process, also when it is killed.
func lockStateDir(dir string, wait time.Duration) (func(), error) {
	path := filepath.Join(dir, "lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state dir lock: %w", err)
	}
	deadline := time.Now().Add(wait)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("state dir lock %s: %w", path, err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("state dir %s is in use by another mayfly run (still running after %v)", dir, wait)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// sigHandOver hands the running jobs over to the next mayfly run.
var sigHandOver os.Signal = syscall.SIGUSR2
