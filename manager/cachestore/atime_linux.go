package cachestore

import (
	"io/fs"
	"syscall"
	"time"
)

// atime is when a file was last read (for least-recently-used removal).
func atime(fi fs.FileInfo) time.Time {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return time.Unix(st.Atim.Sec, st.Atim.Nsec)
	}
	return fi.ModTime()
}
