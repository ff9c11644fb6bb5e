package image

import (
	"bytes"
	"compress/gzip"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"

	"golang.org/x/crypto/ssh"
)

// Paths inside the guest that the per-instance overlay fills and /init reads.
const (
	GuestHostKeyPath        = "/etc/dropbear/dropbear_ed25519_host_key"
	GuestAuthorizedKeysPath = "/root/.ssh/authorized_keys"
	GuestHostnamePath       = "/etc/hostname"
)

// Identity is what makes one VM distinct from every other VM booted from the
// same base image: its SSH host key, the keys that may log in as root, and its
// hostname. It reaches the guest as a small initramfs overlay (see Overlay), so
// the shared base image never holds a key.
type Identity struct {
	// Hostname is the guest's hostname (a DNS label, e.g. the instance name).
	Hostname string
	// HostKey is the guest's SSH host key. The caller keeps its public half to
	// pin the host key before the VM has booted.
	HostKey ed25519.PrivateKey
	// AuthorizedKeys may log in as root; at least one is required.
	AuthorizedKeys []ssh.PublicKey
}

var hostnameRE = regexp.MustCompile(`^[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$`)

// Validate reports the first invalid field of id.
func (id Identity) Validate() error {
	if !hostnameRE.MatchString(id.Hostname) {
		return fmt.Errorf("identity: Hostname %q is not a DNS label (letters, digits, '-', at most 63)", id.Hostname)
	}
	if len(id.HostKey) != ed25519.PrivateKeySize {
		return fmt.Errorf("identity: HostKey is missing or not an ed25519 private key (got %d bytes)", len(id.HostKey))
	}
	if len(id.AuthorizedKeys) == 0 {
		return errors.New("identity: AuthorizedKeys is empty; the VM would accept no login")
	}
	for i, k := range id.AuthorizedKeys {
		if k == nil {
			return fmt.Errorf("identity: AuthorizedKeys[%d] is nil", i)
		}
	}
	return nil
}

// HostPublicKey returns the SSH public half of id.HostKey, for pinning.
func (id Identity) HostPublicKey() (ssh.PublicKey, error) {
	if len(id.HostKey) != ed25519.PrivateKeySize {
		return nil, errors.New("identity: HostKey is missing")
	}
	pub, err := ssh.NewPublicKey(id.HostKey.Public())
	if err != nil {
		return nil, fmt.Errorf("identity: host public key: %w", err)
	}
	return pub, nil
}

// NewHostKey generates a fresh ed25519 SSH host key.
func NewHostKey() (ed25519.PrivateKey, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate host key: %w", err)
	}
	return priv, nil
}

// DropbearKey encodes an ed25519 private key in dropbear's own key-file
// format, which is what `dropbear -r` reads (it does not read OpenSSH keys):
// string "ssh-ed25519", then a string holding the 32-byte seed followed by the
// 32-byte public key, each string prefixed by its big-endian uint32 length.
func DropbearKey(k ed25519.PrivateKey) ([]byte, error) {
	if len(k) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("dropbear key: want a %d-byte ed25519 private key, got %d bytes", ed25519.PrivateKeySize, len(k))
	}
	var b bytes.Buffer
	putString := func(s []byte) {
		var n [4]byte
		binary.BigEndian.PutUint32(n[:], uint32(len(s)))
		b.Write(n[:])
		b.Write(s)
	}
	putString([]byte(ssh.KeyAlgoED25519))
	putString(k) // Go's ed25519.PrivateKey is already seed || public key.
	return b.Bytes(), nil
}

// Overlay returns a gzip-compressed newc cpio archive holding id's files:
// the host key (in dropbear's format for the busybox profile and in
// OpenSSH's for the Debian profiles), root's authorized_keys and the hostname. Appended to
// the base initrd it completes the image for one VM: the kernel unpacks
// concatenated archives in order, later files replacing earlier ones.
func Overlay(id Identity) ([]byte, error) {
	if err := id.Validate(); err != nil {
		return nil, err
	}
	hostKey, err := DropbearKey(id.HostKey)
	if err != nil {
		return nil, err
	}
	block, err := ssh.MarshalPrivateKey(id.HostKey, id.Hostname)
	if err != nil {
		return nil, fmt.Errorf("overlay: host key: %w", err)
	}
	openSSHKey := pem.EncodeToMemory(block)
	var auth bytes.Buffer
	for _, k := range id.AuthorizedKeys {
		auth.Write(ssh.MarshalAuthorizedKey(k))
	}
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
	if err != nil {
		return nil, fmt.Errorf("overlay: %w", err)
	}
	cw := newCPIOWriter(zw)
	steps := []func() error{
		func() error { return cw.Dir("etc", 0o755) },
		func() error { return cw.Dir("etc/dropbear", 0o700) },
		func() error { return cw.File(GuestHostKeyPath[1:], 0o600, hostKey) },
		func() error { return cw.Dir("etc/ssh", 0o755) },
		func() error { return cw.File(GuestOpenSSHHostKeyPath[1:], 0o600, openSSHKey) },
		func() error { return cw.File(GuestHostnamePath[1:], 0o644, []byte(id.Hostname+"\n")) },
		func() error { return cw.Dir("root", 0o700) },
		func() error { return cw.Dir("root/.ssh", 0o700) },
		func() error { return cw.File(GuestAuthorizedKeysPath[1:], 0o600, auth.Bytes()) },
		cw.Close,
		zw.Close,
	}
	for _, step := range steps {
		if err := step(); err != nil {
			return nil, fmt.Errorf("overlay: %w", err)
		}
	}
	return buf.Bytes(), nil
}

// WriteInstanceInitrd writes to dst the base initrd followed by id's overlay:
// the initrd to boot one VM with. dst is created with mode 0600 (it holds a
// private host key) and must not exist yet.
func WriteInstanceInitrd(dst, baseInitrd string, id Identity) (err error) {
	overlay, err := Overlay(id)
	if err != nil {
		return err
	}
	src, err := os.Open(baseInitrd)
	if err != nil {
		return fmt.Errorf("instance initrd: open base initrd: %w", err)
	}
	defer src.Close()
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return fmt.Errorf("instance initrd: %w", err)
	}
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("instance initrd: %w", err)
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("instance initrd: close %s: %w", dst, cerr)
		}
	}()
	n, err := io.Copy(f, src)
	if err != nil {
		return fmt.Errorf("instance initrd: copy base: %w", err)
	}
	// The kernel looks for the next archive's magic at a 4-byte boundary.
	if pad := n % 4; pad != 0 {
		if _, err := f.Write(make([]byte, 4-pad)); err != nil {
			return fmt.Errorf("instance initrd: pad: %w", err)
		}
	}
	if _, err := f.Write(overlay); err != nil {
		return fmt.Errorf("instance initrd: write overlay: %w", err)
	}
	return nil
}
