package qemuvm

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// processesUsing returns the live (non-zombie) qemu processes of the VM whose
// state directory is dir: those whose command line has its console file.
func processesUsing(dir string) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	needle := []byte("\x00file:" + filepath.Join(dir, ConsoleFile) + "\x00")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, needle) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// ListeningTCP returns the addresses on which process pid has listening TCP
// sockets, read from /proc (the sockets among its open files). It needs the
// right to read /proc/<pid>/fd: the same user, or root.
func ListeningTCP(pid int) ([]netip.AddrPort, error) {
	fdDir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
	fds, err := os.ReadDir(fdDir)
	if err != nil {
		return nil, fmt.Errorf("listening sockets of %d: %w", pid, err)
	}
	inodes := make(map[string]bool)
	for _, fd := range fds {
		link, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
		if err == nil && strings.HasPrefix(link, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]")] = true
		}
	}
	var addrs []netip.AddrPort
	for _, table := range []string{"tcp", "tcp6"} {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "net", table))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("listening sockets of %d: %w", pid, err)
		}
		found, err := parseProcNetTCP(b, inodes)
		if err != nil {
			return nil, fmt.Errorf("listening sockets of %d: %s: %w", pid, table, err)
		}
		addrs = append(addrs, found...)
	}
	return addrs, nil
}

// parseProcNetTCP returns the local addresses of the listening sockets in a
// /proc/net/tcp or tcp6 table whose inode is in inodes.
func parseProcNetTCP(table []byte, inodes map[string]bool) ([]netip.AddrPort, error) {
	var addrs []netip.AddrPort
	lines := strings.Split(strings.TrimSpace(string(table)), "\n")
	for _, line := range lines[1:] { // the first line is the header
		f := strings.Fields(line)
		if len(f) < 10 || f[3] != tcpListen || !inodes[f[9]] {
			continue
		}
		ap, err := parseHexAddrPort(f[1])
		if err != nil {
			return nil, err
		}
		addrs = append(addrs, ap)
	}
	return addrs, nil
}

// parseHexAddrPort parses /proc/net/tcp's "0100007F:1F90": the address as
// 32-bit words in host (little-endian) byte order, the port big-endian.
func parseHexAddrPort(s string) (netip.AddrPort, error) {
	host, port, ok := strings.Cut(s, ":")
	if !ok || (len(host) != 8 && len(host) != 32) {
		return netip.AddrPort{}, fmt.Errorf("bad address %q", s)
	}
	raw, err := hex.DecodeString(host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("bad address %q: %w", s, err)
	}
	for i := 0; i < len(raw); i += 4 {
		raw[i], raw[i+1], raw[i+2], raw[i+3] = raw[i+3], raw[i+2], raw[i+1], raw[i]
	}
	p, err := strconv.ParseUint(port, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("bad port in %q: %w", s, err)
	}
	addr, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(addr.Unmap(), uint16(p)), nil
}

// tcpListen is the st column value of a listening socket in /proc/net/tcp.
const tcpListen = "0A"
