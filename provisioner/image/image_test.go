package image

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/ed25519"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/internal/testenv"
)

// need skips the test when a host tool is missing, or fails it when CI=true.
func need(t *testing.T, what string, ok bool) {
	t.Helper()
	if ok {
		return
	}
	testenv.Missing(t, what+" is missing (run scripts/setup-vm.sh)")
}

func haveTool(name string) bool {
	_, err := exec.LookPath(name)
	return err == nil
}

// cacheDir is the repository's .cache/mayfly (shared with scripts/setup-vm.sh),
// or $MAYFLY_CACHE_DIR.
func cacheDir(t *testing.T) string {
	t.Helper()
	if d := os.Getenv("MAYFLY_CACHE_DIR"); d != "" {
		return d
	}
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return filepath.Join(dir, DefaultCacheDir)
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test directory")
		}
		dir = parent
	}
}

// cpioList lists a (possibly gzip-compressed) newc archive with Debian's cpio.
func cpioList(t *testing.T, archive []byte) []string {
	t.Helper()
	need(t, "cpio (Debian package cpio)", haveTool("cpio"))
	if bytes.HasPrefix(archive, []byte{0x1f, 0x8b}) {
		zr, err := gzip.NewReader(bytes.NewReader(archive))
		if err != nil {
			t.Fatal(err)
		}
		if archive, err = io.ReadAll(zr); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command("cpio", "-t", "-v", "--quiet", "-H", "newc")
	cmd.Stdin = bytes.NewReader(archive)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("cpio -t: %v", err)
	}
	return strings.Split(strings.TrimSpace(string(out)), "\n")
}

// extract unpacks a newc archive into a new directory with Debian's cpio.
func extract(t *testing.T, archive []byte) string {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command("cpio", "-i", "-d", "--quiet", "-H", "newc", "--no-absolute-filenames")
	cmd.Dir = dir
	cmd.Stdin = bytes.NewReader(archive)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -i: %v: %s", err, out)
	}
	return dir
}

func TestCPIOWriterReadBySystemCpio(t *testing.T) {
	var buf bytes.Buffer
	w := newCPIOWriter(&buf)
	for _, err := range []error{
		w.Dir("etc", 0o755),
		w.File("etc/a", 0o640, []byte("hello")),
		w.File("etc/empty", 0o600, nil),
		w.File("etc/odd", 0o644, []byte("abc")),
		w.Symlink("etc/link", "/etc/a"),
		w.CharDev("console", 0o600, 5, 1),
		w.Close(),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	if buf.Len()%4 != 0 {
		t.Errorf("archive length %d is not 4-byte aligned", buf.Len())
	}
	lines := cpioList(t, buf.Bytes())
	want := []struct{ prefix, suffix string }{
		{"drwxr-xr-x", "etc"},
		{"-rw-r-----", "etc/a"},
		{"-rw-------", "etc/empty"},
		{"-rw-r--r--", "etc/odd"},
		{"lrwxrwxrwx", "etc/link -> /etc/a"},
		{"crw-------", "console"},
	}
	if len(lines) != len(want) {
		t.Fatalf("cpio listed %d entries, want %d:\n%s", len(lines), len(want), strings.Join(lines, "\n"))
	}
	for i, w := range want {
		if !strings.HasPrefix(lines[i], w.prefix) || !strings.HasSuffix(lines[i], w.suffix) {
			t.Errorf("entry %d = %q, want %s … %s", i, lines[i], w.prefix, w.suffix)
		}
	}
	if !strings.Contains(lines[5], "5,") {
		t.Errorf("console entry %q lacks device numbers 5, 1", lines[5])
	}
	dir := extract(t, buf.Bytes())
	for name, content := range map[string]string{"etc/a": "hello", "etc/odd": "abc", "etc/empty": ""} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || string(b) != content {
			t.Errorf("%s = %q, %v; want %q", name, b, err, content)
		}
	}
}

func TestCPIOWriterRejectsBadNames(t *testing.T) {
	tests := []struct {
		name    string
		entries []string
		want    string
	}{
		{"empty", []string{""}, "clean relative path"},
		{"dotdot", []string{"../etc"}, "clean relative path"},
		{"trailing slash", []string{"etc/"}, "clean relative path"},
		{"double slash", []string{"etc//a"}, "clean relative path"},
		{"duplicate", []string{"etc", "etc"}, "duplicate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newCPIOWriter(io.Discard)
			var err error
			for _, e := range tt.entries {
				if err = w.Dir(e, 0o755); err != nil {
					break
				}
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want one containing %q", err, tt.want)
			}
		})
	}
}

// TestDropbearKeyAcceptedByDropbear checks the key encoding against dropbear's
// own tool: dropbearkey -y must print the same public key Go computes.
func TestDropbearKeyAcceptedByDropbear(t *testing.T) {
	need(t, "dropbearkey (Debian package dropbear-bin)", haveTool("dropbearkey"))
	key, err := NewHostKey()
	if err != nil {
		t.Fatal(err)
	}
	enc, err := DropbearKey(key)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "host_key")
	if err := os.WriteFile(p, enc, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("dropbearkey", "-y", "-f", p).CombinedOutput()
	if err != nil {
		t.Fatalf("dropbearkey -y: %v: %s", err, out)
	}
	pub, err := ssh.NewPublicKey(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	want := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub)))
	if !strings.Contains(string(out), want) {
		t.Fatalf("dropbearkey -y printed\n%s\nwant it to contain %s", out, want)
	}
	if _, err := DropbearKey(key[:10]); err == nil {
		t.Error("DropbearKey accepted a truncated key")
	}
}

func testIdentity(t *testing.T, hostname string) (Identity, ed25519.PrivateKey) {
	t.Helper()
	hk, err := NewHostKey()
	if err != nil {
		t.Fatal(err)
	}
	_, client, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := ssh.NewPublicKey(client.Public())
	if err != nil {
		t.Fatal(err)
	}
	return Identity{Hostname: hostname, HostKey: hk, AuthorizedKeys: []ssh.PublicKey{pub}}, client
}

func TestIdentityValidate(t *testing.T) {
	good, _ := testIdentity(t, "vm-1")
	tests := []struct {
		name   string
		mutate func(*Identity)
		want   string // "" = valid
	}{
		{"valid", func(*Identity) {}, ""},
		{"empty hostname", func(id *Identity) { id.Hostname = "" }, "Hostname"},
		{"hostname with dot", func(id *Identity) { id.Hostname = "a.b" }, "Hostname"},
		{"hostname too long", func(id *Identity) { id.Hostname = strings.Repeat("a", 64) }, "Hostname"},
		{"no host key", func(id *Identity) { id.HostKey = nil }, "HostKey"},
		{"no authorized keys", func(id *Identity) { id.AuthorizedKeys = nil }, "AuthorizedKeys"},
		{"nil authorized key", func(id *Identity) { id.AuthorizedKeys = []ssh.PublicKey{nil} }, "AuthorizedKeys[0]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id := good
			tt.mutate(&id)
			err := id.Validate()
			if tt.want == "" {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Validate() = %v, want an error naming %s", err, tt.want)
			}
			if _, err := Overlay(id); err == nil {
				t.Fatal("Overlay accepted an invalid identity")
			}
		})
	}
}

func TestOverlayContents(t *testing.T) {
	id, _ := testIdentity(t, "vm-7")
	gz, err := Overlay(id)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(gz, []byte{0x1f, 0x8b}) {
		t.Fatal("overlay is not gzip-compressed")
	}
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	need(t, "cpio (Debian package cpio)", haveTool("cpio"))
	dir := extract(t, raw)
	hostKey, _ := DropbearKey(id.HostKey)
	files := map[string]struct {
		perm os.FileMode
		data string
	}{
		GuestHostKeyPath:        {0o600, string(hostKey)},
		GuestAuthorizedKeysPath: {0o600, string(ssh.MarshalAuthorizedKey(id.AuthorizedKeys[0]))},
		GuestHostnamePath:       {0o644, "vm-7\n"},
	}
	for name, want := range files {
		p := filepath.Join(dir, name)
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if string(b) != want.data {
			t.Errorf("%s = %q, want %q", name, b, want.data)
		}
		if fi, _ := os.Stat(p); fi.Mode().Perm() != want.perm {
			t.Errorf("%s mode %v, want %v", name, fi.Mode().Perm(), want.perm)
		}
	}
	if fi, err := os.Stat(filepath.Join(dir, "root/.ssh")); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("root/.ssh: %v %v, want a 0700 directory", fi, err)
	}

	// Two identities give two different overlays: nothing is shared.
	other, _ := testIdentity(t, "vm-7")
	gz2, err := Overlay(other)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(gz, gz2) {
		t.Error("two fresh identities produced identical overlays")
	}
}

func TestWriteInstanceInitrd(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.gz")
	if err := os.WriteFile(base, []byte("BASE-ARCHIVE"), 0o644); err != nil { // 12 bytes: aligned
		t.Fatal(err)
	}
	odd := filepath.Join(dir, "odd.gz")
	if err := os.WriteFile(odd, []byte("BASE"+"x"), 0o644); err != nil { // 5 bytes: needs padding
		t.Fatal(err)
	}
	id, _ := testIdentity(t, "vm")
	for _, tt := range []struct {
		base    string
		wantPad int
	}{{base, 0}, {odd, 3}} {
		dst := filepath.Join(dir, "inst-"+filepath.Base(tt.base))
		if err := WriteInstanceInitrd(dst, tt.base, id); err != nil {
			t.Fatal(err)
		}
		got, _ := os.ReadFile(dst)
		baseBytes, _ := os.ReadFile(tt.base)
		if !bytes.HasPrefix(got, baseBytes) {
			t.Fatalf("%s does not start with the base initrd", dst)
		}
		rest := got[len(baseBytes):]
		if !bytes.Equal(rest[:tt.wantPad], make([]byte, tt.wantPad)) || !bytes.HasPrefix(rest[tt.wantPad:], []byte{0x1f, 0x8b}) {
			t.Fatalf("after the base: % x…, want %d zero bytes then a gzip stream", rest[:8], tt.wantPad)
		}
		if fi, _ := os.Stat(dst); fi.Mode().Perm() != 0o600 {
			t.Errorf("instance initrd mode %v, want 0600 (it holds a private key)", fi.Mode().Perm())
		}
		if err := WriteInstanceInitrd(dst, tt.base, id); err == nil {
			t.Error("WriteInstanceInitrd overwrote an existing file")
		}
	}
	if err := WriteInstanceInitrd(filepath.Join(dir, "x"), filepath.Join(dir, "missing"), id); err == nil || !strings.Contains(err.Error(), "base initrd") {
		t.Errorf("missing base: err = %v", err)
	}
}

func TestVersionLess(t *testing.T) {
	tests := []struct {
		a, b string
		want bool
	}{
		{"linux-image-6.1.0-9-amd64_6.1.27-1_amd64.deb", "linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb", true},
		{"linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb", "linux-image-6.1.0-9-amd64_6.1.27-1_amd64.deb", false},
		{"linux-image-6.12.0-1-amd64_6.12.1-1_amd64.deb", "linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb", false},
		{"a", "a", false},
	}
	for _, tt := range tests {
		if got := versionLess(tt.a, tt.b); got != tt.want {
			t.Errorf("versionLess(%q, %q) = %v, want %v", tt.a, tt.b, got, tt.want)
		}
	}
}

func TestFindKernelDeb(t *testing.T) {
	dir := t.TempDir()
	if _, err := FindKernelDeb(dir); !errors.Is(err, ErrMissing) || !strings.Contains(err.Error(), "setup-vm.sh") {
		t.Fatalf("empty dir: err = %v, want ErrMissing pointing at setup-vm.sh", err)
	}
	for _, n := range []string{
		"linux-image-6.1.0-9-amd64_6.1.27-1_amd64.deb",
		"linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb",
		"linux-image-amd64_6.1.192-2_amd64.deb", // the metapackage: no kernel inside
		"linux-headers-6.1.0-99-amd64_6.1.300-1_amd64.deb",
	} {
		if err := os.WriteFile(filepath.Join(dir, n), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := FindKernelDeb(dir)
	if err != nil {
		t.Fatal(err)
	}
	if want := "linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb"; filepath.Base(got) != want {
		t.Fatalf("FindKernelDeb = %s, want %s", got, want)
	}
}

func TestBuildMissingInputs(t *testing.T) {
	dir := t.TempDir()
	fakeDeb := filepath.Join(dir, "linux-image-6.1.0-1-amd64_6.1.1-1_amd64.deb")
	if err := os.WriteFile(fakeDeb, []byte("not a deb"), 0o644); err != nil {
		t.Fatal(err)
	}
	need(t, "dropbear (Debian package dropbear-bin)", haveTool("dropbear") || fileExists("/usr/sbin/dropbear"))
	tests := []struct {
		name string
		opts Options
		want string
	}{
		{"no cache dir", Options{}, "CacheDir is required"},
		{"no kernel deb in cache", Options{CacheDir: filepath.Join(dir, "empty")}, "no linux-image-*-amd64 .deb"},
		{"kernel deb missing", Options{CacheDir: dir, KernelDeb: filepath.Join(dir, "nope.deb")}, "kernel package"},
		{"busybox missing", Options{CacheDir: dir, KernelDeb: fakeDeb, Busybox: filepath.Join(dir, "busybox")}, "busybox-static"},
		{"busybox dynamic", Options{CacheDir: dir, KernelDeb: fakeDeb, Busybox: "/usr/sbin/dropbear"}, "dynamically linked"},
		{"dropbear missing", Options{CacheDir: dir, KernelDeb: fakeDeb, Dropbear: filepath.Join(dir, "dropbear")}, "dropbear-bin"},
		{"bad module name", Options{CacheDir: dir, KernelDeb: fakeDeb, Modules: []string{"virtio.ko"}}, "Modules[0]"},
		{"not a deb", Options{CacheDir: dir, KernelDeb: fakeDeb}, "dpkg -x"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.opts.Busybox == "" && !fileExists("/bin/busybox") {
				need(t, "busybox (Debian package busybox-static)", false)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			_, err := Build(ctx, tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Build() err = %v, want one containing %q", err, tt.want)
			}
		})
	}
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// TestBuild builds the real base image from the Debian packages (or finds it
// in the cache), checks its contents, and checks that a second Build is a no-op.
func TestBuild(t *testing.T) {
	cache := cacheDir(t)
	_, debErr := FindKernelDeb(filepath.Join(cache, "debs"))
	need(t, "the kernel .deb in "+filepath.Join(cache, "debs"), debErr == nil)
	need(t, "busybox-static", fileExists("/bin/busybox"))
	need(t, "dropbear-bin", fileExists("/usr/sbin/dropbear"))
	need(t, "dpkg", haveTool("dpkg"))

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	img, err := Build(ctx, Options{CacheDir: cache})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("image %s (cached=%v): kernel %s, modules %v", img.Hash, img.Cached, img.KernelVersion, img.Modules)
	if !slices.Equal(img.Modules, DefaultModules) {
		t.Errorf("modules = %v, want %v", img.Modules, DefaultModules)
	}
	if !strings.HasSuffix(img.KernelVersion, "-amd64") {
		t.Errorf("kernel version %q", img.KernelVersion)
	}
	bz, err := os.ReadFile(filepath.Join(filepath.Dir(img.Initrd), kernelFile))
	if err != nil {
		t.Fatal(err)
	}
	// A bzImage carries "HdrS" at offset 0x202.
	if len(bz) < 0x206 || string(bz[0x202:0x206]) != "HdrS" {
		t.Error("vmlinuz is not a bzImage")
	}
	// Debian's kernels have CONFIG_PVH, and xz is on every Debian system:
	// the image boots the uncompressed vmlinux through its PVH entry.
	if !img.PVH || filepath.Base(img.Kernel) != pvhKernelFile {
		t.Errorf("image boots %s (PVH %v), want the PVH vmlinux", img.Kernel, img.PVH)
	} else if kernel, err := os.ReadFile(img.Kernel); err != nil {
		t.Error(err)
	} else if ok, err := hasPVHNote(kernel); !ok || err != nil || !bytes.HasPrefix(kernel, []byte("\x7fELF")) {
		t.Errorf("vmlinux: ELF %v, PVH note %v, %v", bytes.HasPrefix(kernel, []byte("\x7fELF")), ok, err)
	}
	if _, err := extractPVH(context.Background(), []byte("not a kernel")); !errors.Is(err, errNoPVH) {
		t.Errorf("extractPVH(junk) = %v, want errNoPVH", err)
	}

	initrd, err := os.ReadFile(img.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	lines := cpioList(t, initrd)
	entries := make(map[string]string)
	for _, l := range lines {
		f := strings.Fields(l)
		name := f[len(f)-1]
		if len(f) > 2 && f[len(f)-2] == "->" {
			name = f[len(f)-3]
		}
		entries[name] = l
	}
	for _, want := range []string{
		"init", "bin/busybox", "usr/sbin/dropbear", "lib64/ld-linux-x86-64.so.2",
		"lib/x86_64-linux-gnu/libc.so.6", "etc/passwd", "dev/console",
		"lib/modules/mayfly/virtio_net.ko", "lib/modules/mayfly/virtio_ring.ko",
	} {
		l, ok := entries[want]
		if !ok {
			t.Errorf("initrd lacks %s", want)
			continue
		}
		if want == "bin/busybox" && !strings.HasPrefix(l, "-rwx") {
			t.Errorf("bin/busybox must be a real executable file, got %q", l)
		}
	}
	if l := entries["bin/sh"]; !strings.HasSuffix(l, "-> /bin/busybox") {
		t.Errorf("bin/sh = %q, want a symlink to /bin/busybox", l)
	}
	for _, secret := range []string{GuestHostKeyPath[1:], GuestAuthorizedKeysPath[1:]} {
		if _, ok := entries[secret]; ok {
			t.Errorf("the shared base image contains %s; keys must be per instance", secret)
		}
	}

	start := time.Now()
	again, err := Build(ctx, Options{CacheDir: cache})
	if err != nil {
		t.Fatal(err)
	}
	if !again.Cached || again.Hash != img.Hash || again.Initrd != img.Initrd {
		t.Fatalf("second Build = %+v, want the cached image %s", again, img.Hash)
	}
	t.Logf("second Build (cache hit) took %v", time.Since(start))

	// A different module list is a different image.
	h1, err := hashInputs([]input{{src: img.Kernel}}, DefaultModules)
	if err != nil {
		t.Fatal(err)
	}
	h2, err := hashInputs([]input{{src: img.Kernel}}, DefaultModules[:3])
	if err != nil {
		t.Fatal(err)
	}
	if h1 == h2 {
		t.Error("the module list does not change the hash")
	}
}
