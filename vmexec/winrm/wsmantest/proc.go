package wsmantest

import (
	"bytes"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// groupAlive reports whether a live (not zombie) process is in process group
// pgid. Zombies count as dead: orphans are reaped by whatever init the
// machine has, which may be slow or absent in containers.
func groupAlive(pgid int) bool {
	if err := syscall.Kill(-pgid, 0); err == syscall.ESRCH {
		return false
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return true
	}
	want := strconv.Itoa(pgid)
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if len(f) > 3 && f[2] == want && f[0] != "Z" && f[0] != "X" {
			return true
		}
	}
	return false
}

// killGroup sends sig to process group pgid; for SIGKILL it then waits,
// bounded by timeout, until no live member is left, and reports whether so.
func killGroup(pgid int, sig syscall.Signal, timeout time.Duration) bool {
	if pgid <= 0 {
		return true
	}
	syscall.Kill(-pgid, sig) // ESRCH when the group is gone
	if sig != syscall.SIGKILL {
		return true
	}
	deadline := time.Now().Add(timeout)
	for groupAlive(pgid) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
		syscall.Kill(-pgid, sig)
	}
	return true
}
