//go:build !linux

package cachestore

import (
	"io/fs"
	"time"
)

// atime is the modification time where the access time is not portable.
func atime(fi fs.FileInfo) time.Time { return fi.ModTime() }
