package image

import (
	"fmt"
	"io"
	"path"
	"strings"
)

// The initramfs is a "newc" cpio archive, the format the kernel unpacks
// (Documentation/driver-api/early-userspace/buffer-format.rst). It is written
// here by hand rather than with a library because the format is a 110-byte
// ASCII header per entry, the kernel needs character-device entries (rdev
// fields), and the base image must be byte-for-byte reproducible (fixed inode
// numbers, owner 0, mtime 0) for its content hash: the maintained Go cpio
// libraries either cannot write device nodes or pull in a large module.

// Entry types for cpioWriter, as they appear in the mode field.
const (
	cpioTypeReg     = 0o100000
	cpioTypeDir     = 0o040000
	cpioTypeSymlink = 0o120000
	cpioTypeChar    = 0o020000
)

// cpioWriter writes a newc archive. All entries are owned by root, have
// mtime 0 and get sequential inode numbers, so the same input gives the same bytes.
type cpioWriter struct {
	w     io.Writer
	ino   uint32
	seen  map[string]bool
	err   error
	total int64
}

func newCPIOWriter(w io.Writer) *cpioWriter {
	return &cpioWriter{w: w, seen: make(map[string]bool)}
}

// Dir adds a directory.
func (c *cpioWriter) Dir(name string, perm uint32) error {
	return c.entry(name, cpioTypeDir|perm, 0, 0, nil)
}

// File adds a regular file.
func (c *cpioWriter) File(name string, perm uint32, data []byte) error {
	return c.entry(name, cpioTypeReg|perm, 0, 0, data)
}

// Symlink adds a symbolic link to target.
func (c *cpioWriter) Symlink(name, target string) error {
	return c.entry(name, cpioTypeSymlink|0o777, 0, 0, []byte(target))
}

// CharDev adds a character device node.
func (c *cpioWriter) CharDev(name string, perm, major, minor uint32) error {
	return c.entry(name, cpioTypeChar|perm, major, minor, nil)
}

// Close writes the trailer entry. It does not close the underlying writer.
func (c *cpioWriter) Close() error {
	if c.err != nil {
		return c.err
	}
	c.writeRecord("TRAILER!!!", 0, 0, 0, 0, nil)
	return c.err
}

func (c *cpioWriter) entry(name string, mode, rmajor, rminor uint32, data []byte) error {
	if c.err != nil {
		return c.err
	}
	clean := strings.TrimPrefix(path.Clean("/"+name), "/")
	if clean == "" || clean != strings.TrimPrefix(name, "/") {
		return fmt.Errorf("cpio entry %q: name must be a clean relative path", name)
	}
	if c.seen[clean] {
		return fmt.Errorf("cpio entry %q: duplicate name", clean)
	}
	c.seen[clean] = true
	nlink := uint32(1)
	if mode&0o170000 == cpioTypeDir {
		nlink = 2
	}
	c.writeRecord(clean, mode, nlink, rmajor, rminor, data)
	return c.err
}

func (c *cpioWriter) writeRecord(name string, mode, nlink, rmajor, rminor uint32, data []byte) {
	c.ino++
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmajor, rminor, len(name)+1, 0)
	c.write([]byte(hdr))
	c.write([]byte(name))
	c.write([]byte{0})
	c.pad()
	c.write(data)
	c.pad()
}

func (c *cpioWriter) write(p []byte) {
	if c.err != nil || len(p) == 0 {
		return
	}
	n, err := c.w.Write(p)
	c.total += int64(n)
	if err != nil {
		c.err = fmt.Errorf("write cpio: %w", err)
	}
}

// pad aligns the stream to 4 bytes, as newc requires after names and data.
func (c *cpioWriter) pad() {
	if r := c.total % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}
