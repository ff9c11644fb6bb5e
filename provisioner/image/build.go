// Package image builds the base image of mayfly's local microVMs — a Debian
// kernel and an initramfs with busybox and dropbear — from Debian packages
// only, and the small per-instance overlay that gives each VM its own SSH
// identity. The kernel package is unpacked with dpkg -x, never installed.
//
// Keys are never in the shared base image. For each VM the caller generates
// an ed25519 host key in Go (so its public half is known, and pinned, before
// the VM boots) and passes the client public keys; Overlay packs them, in
// dropbear's key format and as authorized_keys, into a tiny gzip'ed cpio
// that WriteInstanceInitrd appends to a copy of the base initrd. The kernel
// unpacks concatenated archives in order, so the overlay's files land on top
// of the base. This was chosen over the kernel command line because the
// files arrive with their modes and owners, /proc/cmdline stays free of key
// material, /init needs no decoding, and the same overlay can carry more
// per-instance files later.
package image

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"
)

// DefaultCacheDir is the cache directory relative to the repository root, as
// used by scripts/setup-vm.sh (which downloads the kernel .deb into its debs/).
const DefaultCacheDir = ".cache/mayfly"

// formatVersion changes whenever the image layout changes, so old cache
// entries are not reused.
const formatVersion = "mayfly-image-v1"

// Options configure Build. Only CacheDir is required.
type Options struct {
	// CacheDir holds debs/ (where the kernel .deb is looked up) and
	// images/<hash>/ (the built images).
	CacheDir string
	// KernelDeb is a linux-image-*-amd64 .deb. Empty: the newest one in CacheDir/debs.
	KernelDeb string
	// Busybox is a statically linked busybox. Default /bin/busybox (Debian's busybox-static).
	Busybox string
	// Dropbear is the dropbear server binary. Default /usr/sbin/dropbear (Debian's dropbear-bin).
	Dropbear string
	// Modules are the kernel modules to load, in order. Default DefaultModules.
	Modules []string
	// Logger receives progress; default slog.Default().
	Logger *slog.Logger
}

// Image is a built base image.
type Image struct {
	// Kernel is the path of the kernel (bzImage).
	Kernel string `json:"kernel,omitempty"`
	// Initrd is the path of the gzip-compressed base initramfs. It holds no
	// keys: boot it with an instance overlay appended (WriteInstanceInitrd).
	Initrd string `json:"initrd,omitempty"`
	// Hash is the content hash of all inputs; it names the cache entry.
	Hash string `json:"hash"`
	// KernelVersion is the kernel release, e.g. "6.1.0-56-amd64".
	KernelVersion string `json:"kernel_version"`
	// Modules are the modules the initramfs loads, in order (built-in ones omitted).
	Modules []string `json:"modules"`
	// Cached reports that Build found the image in the cache and did nothing.
	Cached bool `json:"-"`
}

// ErrMissing is wrapped by errors about a missing package, file or tool.
var ErrMissing = errors.New("missing build input")

// input is one file that goes into the hash and the image.
type input struct {
	src  string // file on the host
	dest string // path in the initramfs, no leading slash ("" for the kernel deb)
}

// Build returns the base image for opts, building it only when no image with
// the same input hash is in the cache. Concurrent builds are safe: each
// builds in its own temporary directory and the first rename wins.
func Build(ctx context.Context, opts Options) (*Image, error) {
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	log := opts.Logger
	inputs, err := collectInputs(ctx, opts)
	if err != nil {
		return nil, err
	}
	hash, err := hashInputs(inputs, opts.Modules)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(opts.CacheDir, "images", hash)
	if img, err := load(dir); err == nil {
		img.Cached = true
		log.Debug("image cached", "hash", hash, "dir", dir)
		return img, nil
	}

	start := time.Now()
	log.Info("building image", "hash", hash, "kernel_deb", opts.KernelDeb)
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".build-*")
	if err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	defer os.RemoveAll(tmp)

	unpacked := filepath.Join(tmp, "deb")
	if out, err := exec.CommandContext(ctx, "dpkg", "-x", opts.KernelDeb, unpacked).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build image: dpkg -x %s: %w: %s", opts.KernelDeb, err, bytes.TrimSpace(out))
	}
	out := filepath.Join(tmp, "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	img := &Image{Hash: hash}
	kernel, version, err := findKernel(unpacked)
	if err != nil {
		return nil, fmt.Errorf("build image: %s: %w", opts.KernelDeb, err)
	}
	img.KernelVersion = version
	if err := copyFile(kernel, filepath.Join(out, "vmlinuz"), 0o644); err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	modules, err := findModules(unpacked, version, opts.Modules)
	if err != nil {
		return nil, fmt.Errorf("build image: %s: %w", opts.KernelDeb, err)
	}
	for _, m := range modules {
		img.Modules = append(img.Modules, m.name)
	}
	applets, err := busyboxApplets(ctx, opts.Busybox)
	if err != nil {
		return nil, err
	}
	if err := writeInitrd(filepath.Join(out, "initrd.gz"), inputs, modules, applets, opts.Modules); err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	// The manifest is written last: its presence marks a complete image.
	manifest, err := json.MarshalIndent(img, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	if err := os.WriteFile(filepath.Join(out, "manifest.json"), manifest, 0o644); err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	if err := os.Rename(out, dir); err != nil {
		// Another build of the same inputs may have won the race.
		if img, lerr := load(dir); lerr == nil {
			img.Cached = true
			return img, nil
		}
		return nil, fmt.Errorf("build image: %w", err)
	}
	img, err = load(dir)
	if err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	log.Info("image built", "hash", hash, "kernel", img.KernelVersion, "dir", dir, "took", time.Since(start).Round(time.Millisecond))
	return img, nil
}

// load reads a complete image from its cache directory.
func load(dir string) (*Image, error) {
	b, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		return nil, err
	}
	img := new(Image)
	if err := json.Unmarshal(b, img); err != nil {
		return nil, fmt.Errorf("image manifest %s: %w", dir, err)
	}
	img.Kernel = filepath.Join(dir, "vmlinuz")
	img.Initrd = filepath.Join(dir, "initrd.gz")
	for _, p := range []string{img.Kernel, img.Initrd} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("image %s: %w", dir, err)
		}
	}
	return img, nil
}

func (o *Options) defaults() error {
	if o.CacheDir == "" {
		return errors.New("image options: CacheDir is required")
	}
	abs, err := filepath.Abs(o.CacheDir)
	if err != nil {
		return fmt.Errorf("image options: CacheDir: %w", err)
	}
	o.CacheDir = abs
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Busybox == "" {
		o.Busybox = "/bin/busybox"
	}
	if o.Dropbear == "" {
		o.Dropbear = "/usr/sbin/dropbear"
	}
	if len(o.Modules) == 0 {
		o.Modules = DefaultModules
	}
	for i, m := range o.Modules {
		if m == "" || strings.ContainsAny(m, "/ \t\n") || strings.HasSuffix(m, ".ko") {
			return fmt.Errorf("image options: Modules[%d] %q: want a bare module name like virtio_net", i, m)
		}
	}
	if o.KernelDeb == "" {
		deb, err := FindKernelDeb(filepath.Join(o.CacheDir, "debs"))
		if err != nil {
			return err
		}
		o.KernelDeb = deb
	}
	return nil
}

var kernelDebRE = regexp.MustCompile(`^linux-image-[0-9][^_]*-amd64(-unsigned)?_[^_]+_amd64\.deb$`)

// FindKernelDeb returns the newest linux-image-*-amd64 .deb in dir (by name),
// as downloaded by scripts/setup-vm.sh.
func FindKernelDeb(dir string) (string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("find kernel deb: %w", err)
	}
	var debs []string
	for _, e := range entries {
		if !e.IsDir() && kernelDebRE.MatchString(e.Name()) {
			debs = append(debs, e.Name())
		}
	}
	if len(debs) == 0 {
		return "", fmt.Errorf("%w: no linux-image-*-amd64 .deb in %s (run scripts/setup-vm.sh, which downloads the package linux-image-amd64 depends on, or set KernelDeb)", ErrMissing, dir)
	}
	sort.Slice(debs, func(i, j int) bool { return versionLess(debs[i], debs[j]) })
	return filepath.Join(dir, debs[len(debs)-1]), nil
}

var versionPartRE = regexp.MustCompile(`\d+|\D+`)

// versionLess orders names comparing runs of digits numerically.
func versionLess(a, b string) bool {
	pa, pb := versionPartRE.FindAllString(a, -1), versionPartRE.FindAllString(b, -1)
	for i := 0; i < len(pa) && i < len(pb); i++ {
		if pa[i] == pb[i] {
			continue
		}
		na, ea := parseUint(pa[i])
		nb, eb := parseUint(pb[i])
		if ea && eb {
			return na < nb
		}
		return pa[i] < pb[i]
	}
	return len(pa) < len(pb)
}

func parseUint(s string) (uint64, bool) {
	var n uint64
	for _, c := range s {
		if c < '0' || c > '9' || n > 1e17 {
			return 0, false
		}
		n = n*10 + uint64(c-'0')
	}
	return n, s != ""
}

// collectInputs checks the host files the image is made of and lists them:
// the kernel deb first, then busybox, dropbear, its libraries and the loader.
func collectInputs(ctx context.Context, o Options) ([]input, error) {
	if _, err := os.Stat(o.KernelDeb); err != nil {
		return nil, fmt.Errorf("%w: kernel package %s: %v (run scripts/setup-vm.sh)", ErrMissing, o.KernelDeb, err)
	}
	if _, err := exec.LookPath("dpkg"); err != nil {
		return nil, fmt.Errorf("%w: dpkg not on PATH (needed to unpack %s)", ErrMissing, o.KernelDeb)
	}
	if err := checkStatic(o.Busybox); err != nil {
		return nil, err
	}
	if _, err := os.Stat(o.Dropbear); err != nil {
		return nil, fmt.Errorf("%w: dropbear %s: %v (install Debian's dropbear-bin: scripts/setup-vm.sh)", ErrMissing, o.Dropbear, err)
	}
	libs, err := sharedLibs(ctx, o.Dropbear)
	if err != nil {
		return nil, err
	}
	inputs := []input{
		{src: o.KernelDeb},
		{src: o.Busybox, dest: "bin/busybox"},
		{src: o.Dropbear, dest: "usr/sbin/dropbear"},
	}
	for _, l := range libs {
		inputs = append(inputs, input{src: l, dest: strings.TrimPrefix(l, "/")})
	}
	return inputs, nil
}

// checkStatic fails unless path is a statically linked ELF executable: a
// dynamic busybox (Debian's "busybox" package) would need its libraries too.
func checkStatic(p string) error {
	f, err := elf.Open(p)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("%w: busybox %s not found (install Debian's busybox-static: scripts/setup-vm.sh)", ErrMissing, p)
		}
		return fmt.Errorf("busybox %s: %w", p, err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return fmt.Errorf("busybox %s is dynamically linked; install Debian's busybox-static (it replaces busybox)", p)
		}
	}
	return nil
}

var lddLineRE = regexp.MustCompile(`^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)$`)

// sharedLibs lists the absolute library paths `ldd bin` reports, including
// the dynamic loader, sorted.
func sharedLibs(ctx context.Context, bin string) ([]string, error) {
	if _, err := exec.LookPath("ldd"); err != nil {
		return nil, fmt.Errorf("%w: ldd not on PATH (Debian's libc-bin)", ErrMissing)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ldd", bin).Output()
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %w", bin, err)
	}
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		if strings.Contains(line, "not found") {
			return nil, fmt.Errorf("%w: ldd %s: %s", ErrMissing, bin, strings.TrimSpace(line))
		}
		if m := lddLineRE.FindStringSubmatch(line); m != nil {
			libs = append(libs, m[1])
		}
	}
	if len(libs) == 0 {
		return nil, fmt.Errorf("ldd %s listed no libraries: %q", bin, out)
	}
	sort.Strings(libs)
	return slices.Compact(libs), nil
}

// hashInputs hashes everything the image is made of: the format version, the
// init script, the module list and every input file's destination and content.
func hashInputs(inputs []input, modules []string) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%s\x00%s\x00", formatVersion, renderInit(modules), strings.Join(modules, ","))
	for _, s := range staticFiles {
		fmt.Fprintf(h, "%s\x00%s\x00", s.name, s.data)
	}
	for _, in := range inputs {
		f, err := os.Open(in.src)
		if err != nil {
			return "", fmt.Errorf("hash image inputs: %w", err)
		}
		fmt.Fprintf(h, "%s\x00", in.dest)
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			return "", fmt.Errorf("hash image inputs: %s: %w", in.src, err)
		}
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil))[:20], nil
}

// findKernel returns the bzImage in an unpacked kernel package and its release.
func findKernel(root string) (path, version string, err error) {
	matches, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if len(matches) != 1 {
		return "", "", fmt.Errorf("%w: want exactly one boot/vmlinuz-* in the package, found %d", ErrMissing, len(matches))
	}
	return matches[0], strings.TrimPrefix(filepath.Base(matches[0]), "vmlinuz-"), nil
}

type module struct {
	name string
	path string
}

// findModules locates each module's .ko in the unpacked kernel. A module that
// is built into the kernel (modules.builtin) is skipped; one that is neither
// is an error naming it.
func findModules(root, version string, names []string) ([]module, error) {
	modRoot := filepath.Join(root, "lib", "modules", version)
	if _, err := os.Stat(modRoot); err != nil {
		// Debian's usrmerged packages may ship /usr/lib/modules.
		alt := filepath.Join(root, "usr", "lib", "modules", version)
		if _, aerr := os.Stat(alt); aerr != nil {
			return nil, fmt.Errorf("%w: no lib/modules/%s in the package", ErrMissing, version)
		}
		modRoot = alt
	}
	found := make(map[string]string)
	err := filepath.WalkDir(filepath.Join(modRoot, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(p, ".ko") {
			name := strings.TrimSuffix(d.Name(), ".ko")
			found[name] = p
			found[strings.ReplaceAll(name, "-", "_")] = p
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("scan modules: %w", err)
	}
	builtin := make(map[string]bool)
	if b, err := os.ReadFile(filepath.Join(modRoot, "modules.builtin")); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			name := strings.TrimSuffix(path.Base(line), ".ko")
			builtin[strings.ReplaceAll(name, "-", "_")] = true
		}
	}
	var mods []module
	for _, n := range names {
		if p, ok := found[n]; ok {
			mods = append(mods, module{name: n, path: p})
			continue
		}
		if builtin[n] {
			continue
		}
		return nil, fmt.Errorf("%w: kernel module %s.ko not in %s and not built in (compressed .ko.xz/.ko.zst modules are not supported)", ErrMissing, n, modRoot)
	}
	return mods, nil
}

// busyboxApplets returns the applet paths busybox provides (busybox --list-full),
// e.g. "bin/sh", "usr/bin/wget".
func busyboxApplets(ctx context.Context, bb string) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bb, "--list-full").Output()
	if err != nil {
		return nil, fmt.Errorf("%s --list-full: %w", bb, err)
	}
	var applets []string
	for _, l := range strings.Fields(string(out)) {
		l = strings.TrimPrefix(path.Clean("/"+l), "/")
		if l != "" && l != "bin/busybox" && l != "init" && l != "linuxrc" {
			applets = append(applets, l)
		}
	}
	if !slices.Contains(applets, "bin/sh") {
		return nil, fmt.Errorf("%s has no sh applet", bb)
	}
	return applets, nil
}

type staticFile struct {
	name string
	perm uint32
	data string
}

// staticFiles are the fixed configuration files of the base image.
var staticFiles = []staticFile{
	{"etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\n"},
	{"etc/group", 0o644, "root:x:0:\ntty:x:5:\n"},
	{"etc/shells", 0o644, "/bin/sh\n/bin/ash\n"},
	{"etc/hosts", 0o644, "127.0.0.1\tlocalhost\n"},
	{"etc/resolv.conf", 0o644, "nameserver " + GuestDNS + "\n"},
}

// writeInitrd writes the gzip-compressed base initramfs.
func writeInitrd(dst string, inputs []input, modules []module, applets, order []string) (err error) {
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = cerr
		}
	}()
	bw := bufio.NewWriterSize(f, 1<<20)
	zw, err := gzip.NewWriterLevel(bw, gzip.BestCompression)
	if err != nil {
		return err
	}
	cw := newCPIOWriter(zw)

	dirs := map[string]uint32{
		"bin": 0o755, "sbin": 0o755, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755,
		"lib": 0o755, "lib/modules": 0o755, strings.TrimPrefix(guestModuleDir, "/"): 0o755,
		"etc": 0o755, "etc/dropbear": 0o700, "root": 0o700, "root/.ssh": 0o700,
		"proc": 0o555, "sys": 0o555, "dev": 0o755, "dev/pts": 0o755, "tmp": 0o1777,
		"var": 0o755, "var/log": 0o755, "var/run": 0o755, "run": 0o755, "home": 0o755,
	}
	addParents := func(p string) {
		for d := path.Dir(p); d != "." && d != "/"; d = path.Dir(d) {
			if _, ok := dirs[d]; !ok {
				dirs[d] = 0o755
			}
		}
	}
	for _, in := range inputs[1:] {
		addParents(in.dest)
	}
	for _, a := range applets {
		addParents(a)
	}
	dirNames := make([]string, 0, len(dirs))
	for d := range dirs {
		dirNames = append(dirNames, d)
	}
	sort.Strings(dirNames) // parents sort before children
	for _, d := range dirNames {
		if err := cw.Dir(d, dirs[d]); err != nil {
			return err
		}
	}
	if err := cw.CharDev("dev/console", 0o600, 5, 1); err != nil {
		return err
	}
	if err := cw.CharDev("dev/null", 0o666, 1, 3); err != nil {
		return err
	}
	for _, in := range inputs[1:] {
		data, err := os.ReadFile(in.src)
		if err != nil {
			return err
		}
		if err := cw.File(in.dest, 0o755, data); err != nil {
			return err
		}
	}
	for _, a := range applets {
		if err := cw.Symlink(a, "/bin/busybox"); err != nil {
			return err
		}
	}
	for _, m := range modules {
		data, err := os.ReadFile(m.path)
		if err != nil {
			return err
		}
		if err := cw.File(path.Join(guestModuleDir[1:], m.name+".ko"), 0o644, data); err != nil {
			return err
		}
	}
	for _, s := range staticFiles {
		if err := cw.File(s.name, s.perm, []byte(s.data)); err != nil {
			return err
		}
	}
	if err := cw.File("init", 0o755, []byte(renderInit(order))); err != nil {
		return err
	}
	if err := cw.Close(); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	return bw.Flush()
}

func copyFile(src, dst string, perm os.FileMode) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, data, perm)
}
