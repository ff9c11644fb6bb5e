// Package image builds the base images of mayfly's local microVMs from
// Debian packages only, and the small per-instance overlay that gives each
// VM its own SSH identity. There are three profiles (see Profile):
//
//   - busybox (the default): a Debian kernel, unpacked with dpkg -x and
//     never installed, and an initramfs with busybox and dropbear.
//   - debian: the same kernel, a small initramfs (busybox, virtio and ext4
//     modules) and an ext4 disk image with a Debian rootfs built by
//     mmdebstrap from the machine's apt sources: bash, git, curl,
//     ca-certificates, OpenSSH's sshd. No systemd: a tiny init (see
//     debian_files.go). VMs boot it through a copy-on-write overlay each.
//   - debian-docker: debian plus Docker Engine from Debian's packages.
//
// Images are cached under CacheDir/images/<hash>, the hash covering every
// input, so a second Build of the same inputs does nothing.
//
// Keys are never in a shared base image. For each VM the caller generates
// an ed25519 host key in Go (so its public half is known, and pinned, before
// the VM boots) and passes the client public keys; Overlay packs them, in
// dropbear's and OpenSSH's key formats and as authorized_keys, into a tiny
// gzip'ed cpio that WriteInstanceInitrd appends to a copy of the base
// initrd. The kernel unpacks concatenated archives in order, so the
// overlay's files land on top of the base (the Debian profiles' first stage
// copies them onto the VM's own disk). This was chosen over the kernel
// command line because the files arrive with their modes and owners,
// /proc/cmdline stays free of key material, /init needs no decoding, and the
// same overlay can carry more per-instance files later.
package image

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"time"
)

// DefaultCacheDir is the cache directory relative to the repository root, as
// used by scripts/setup-vm.sh (which downloads the kernel .deb into its debs/).
const DefaultCacheDir = ".cache/mayfly"

// formatVersion changes whenever the image layout changes, so old cache
// entries are not reused.
const formatVersion = "mayfly-image-v3"

// Options configure Build. Only CacheDir is required.
type Options struct {
	// CacheDir holds debs/ (where the kernel .deb is looked up; debs/apt
	// keeps the packages mmdebstrap downloads) and images/<hash>/ (the built
	// images).
	CacheDir string
	// Profile is what the image holds; default ProfileBusybox.
	Profile Profile
	// KernelDeb is a linux-image-*-amd64 .deb. Empty: the newest one in CacheDir/debs.
	KernelDeb string
	// Busybox is a statically linked busybox. Default /bin/busybox (Debian's busybox-static).
	Busybox string
	// Dropbear is the dropbear server binary (busybox profile). Default
	// /usr/sbin/dropbear (Debian's dropbear-bin).
	Dropbear string
	// Modules are the kernel modules the initramfs loads, in order (their
	// dependencies are added before them). Default DefaultModules for the
	// busybox profile and DebianStage1Modules for the Debian ones.
	Modules []string
	// Suite is the Debian release of the Debian profiles; default the
	// machine's own (VERSION_CODENAME in /etc/os-release).
	Suite string
	// Sources are apt source files (one-line or deb822) for mmdebstrap;
	// default the machine's own: /etc/apt/sources.list and
	// /etc/apt/sources.list.d/*.{list,sources}.
	Sources []string
	// DiskSize is the size of the Debian profiles' ext4 disk in bytes
	// (a sparse file: only what is written takes space). Default
	// DefaultDiskSize.
	DiskSize int64
	// WorkDir is where the Debian rootfs is assembled before it becomes the
	// disk image; default os.TempDir(). A tmpfs makes the build faster.
	WorkDir string
	// Logger receives progress; default slog.Default().
	Logger *slog.Logger
}

// DefaultDiskSize is the default size of a Debian disk image: room for a
// job's build directory and its Docker images on top of the system.
const DefaultDiskSize = 16 << 30

// Image is a built base image.
type Image struct {
	// Profile is what the image holds.
	Profile Profile `json:"profile"`
	// Kernel is the path of the kernel to boot: the uncompressed vmlinux
	// when PVH, else the bzImage.
	Kernel string `json:"kernel,omitempty"`
	// PVH says the kernel is booted through its PVH entry point (see
	// extractPVH), which skips the firmware's loader and the decompressor.
	PVH bool `json:"pvh,omitempty"`
	// Initrd is the path of the gzip-compressed base initramfs. It holds no
	// keys: boot it with an instance overlay appended (WriteInstanceInitrd).
	Initrd string `json:"initrd,omitempty"`
	// Disk is the path of the raw ext4 disk image of the Debian profiles
	// ("" for busybox). It is shared and read-only: boot each VM from a
	// copy-on-write overlay of it.
	Disk string `json:"disk,omitempty"`
	// DiskSize is the disk's size in bytes, DiskAllocated what its sparse
	// file takes on the host.
	DiskSize      int64 `json:"disk_size,omitempty"`
	DiskAllocated int64 `json:"disk_allocated,omitempty"`
	// Hash is the content hash of all inputs; it names the cache entry.
	Hash string `json:"hash"`
	// KernelVersion is the kernel release, e.g. "6.1.0-56-amd64".
	KernelVersion string `json:"kernel_version"`
	// Modules are the modules the initramfs loads, in order (built-in ones omitted).
	Modules []string `json:"modules"`
	// Suite and Packages (name=version, sorted) are the Debian release and
	// every package installed on a Debian disk.
	Suite    string   `json:"suite,omitempty"`
	Packages []string `json:"packages,omitempty"`
	// BuildTime is how long the build took.
	BuildTime time.Duration `json:"build_time_ns"`
	// Cached reports that Build found the image in the cache and did nothing.
	Cached bool `json:"-"`
}

// Files of an image directory.
const (
	kernelFile    = "vmlinuz"
	pvhKernelFile = "vmlinux"
	initrdFile    = "initrd.gz"
	diskFile      = "disk.img"
	manifestFile  = "manifest.json"
)

// ErrMissing is wrapped by errors about a missing package, file or tool.
var ErrMissing = errors.New("missing build input")

// input is one file that goes into the hash and the image.
type input struct {
	src  string // file on the host
	dest string // path in the initramfs, no leading slash ("" for the kernel deb)
}

// recipe builds one profile's image.
type recipe interface {
	// hash returns the content hash of every input.
	hash() (string, error)
	// build writes the image's files into out (work is scratch space) and
	// fills in img.
	build(ctx context.Context, work, out string, img *Image) error
}

// ErrNotBuilt is wrapped by Lookup's error when the image is not in the cache.
var ErrNotBuilt = errors.New("image not built")

// Lookup returns the image Build would return for opts if it is in the
// cache, and an error wrapping ErrNotBuilt (naming the command that builds
// it) if it is not. It never builds: for callers that must answer quickly,
// since a Debian image takes minutes to build.
func Lookup(ctx context.Context, opts Options) (*Image, error) {
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	r, err := newRecipe(ctx, opts)
	if err != nil {
		return nil, err
	}
	hash, err := r.hash()
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(opts.CacheDir, "images", hash)
	img, err := load(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: the %s image for these inputs (%s) is not in %s: build it with `mayfly image build --profile %s --cache-dir %s`",
			ErrNotBuilt, opts.Profile, hash, filepath.Dir(dir), opts.Profile, opts.CacheDir)
	}
	if err != nil {
		return nil, err
	}
	img.Cached = true
	return img, nil
}

func newRecipe(ctx context.Context, opts Options) (recipe, error) {
	if opts.Profile.HasDisk() {
		return newDebianRecipe(ctx, opts)
	}
	return newBusyboxRecipe(ctx, opts)
}

// Build returns the base image for opts, building it only when no image with
// the same input hash is in the cache. Concurrent builds of the same image
// (also by other processes) wait for one another through a lock file, and
// each builds in its own temporary directory that is renamed into place.
func Build(ctx context.Context, opts Options) (*Image, error) {
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	log := opts.Logger
	r, err := newRecipe(ctx, opts)
	if err != nil {
		return nil, err
	}
	hash, err := r.hash()
	if err != nil {
		return nil, err
	}
	images := filepath.Join(opts.CacheDir, "images")
	dir := filepath.Join(images, hash)
	if img, err := load(dir); err == nil {
		img.Cached = true
		log.Debug("image cached", "profile", img.Profile, "hash", hash, "dir", dir)
		return img, nil
	}
	if err := os.MkdirAll(images, 0o755); err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	unlock, err := lockFile(ctx, filepath.Join(images, "."+hash+".lock"))
	if err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	defer unlock()
	if img, err := load(dir); err == nil { // built while we waited for the lock
		img.Cached = true
		return img, nil
	}

	start := time.Now()
	log.Info("building image", "profile", opts.Profile, "hash", hash, "kernel_deb", opts.KernelDeb)
	tmp, err := os.MkdirTemp(images, ".build-*")
	if err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	defer os.RemoveAll(tmp)
	out := filepath.Join(tmp, "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	img := &Image{Hash: hash, Profile: opts.Profile}
	if err := r.build(ctx, tmp, out, img); err != nil {
		return nil, fmt.Errorf("build %s image: %w", opts.Profile, err)
	}
	img.BuildTime = time.Since(start)
	// The manifest is written last: its presence marks a complete image.
	manifest, err := json.MarshalIndent(img, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	if err := os.WriteFile(filepath.Join(out, manifestFile), manifest, 0o644); err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	if err := os.Rename(out, dir); err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	img, err = load(dir)
	if err != nil {
		return nil, fmt.Errorf("build image: %w", err)
	}
	log.Info("image built", "profile", img.Profile, "hash", hash, "kernel", img.KernelVersion, "dir", dir,
		"disk_allocated_mb", img.DiskAllocated>>20, "took", time.Since(start).Round(time.Millisecond))
	return img, nil
}

// lockFile takes an exclusive flock on path, waiting while ctx allows, and
// returns its release.
func lockFile(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock %s (another build of this image runs): %w", path, ctx.Err())
		case <-tick.C:
		}
	}
}

// load reads a complete image from its cache directory.
func load(dir string) (*Image, error) {
	b, err := os.ReadFile(filepath.Join(dir, manifestFile))
	if err != nil {
		return nil, err
	}
	img := new(Image)
	if err := json.Unmarshal(b, img); err != nil {
		return nil, fmt.Errorf("image manifest %s: %w", dir, err)
	}
	if img.Profile == "" {
		img.Profile = ProfileBusybox
	}
	img.Kernel = filepath.Join(dir, kernelFile)
	if img.PVH {
		img.Kernel = filepath.Join(dir, pvhKernelFile)
	}
	img.Initrd = filepath.Join(dir, initrdFile)
	files := []string{img.Kernel, img.Initrd}
	if img.Profile.HasDisk() {
		img.Disk = filepath.Join(dir, diskFile)
		files = append(files, img.Disk)
	}
	for _, p := range files {
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
	if o.Profile, err = ParseProfile(string(o.Profile)); err != nil {
		return fmt.Errorf("image options: Profile: %w", err)
	}
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
		if o.Profile.HasDisk() {
			o.Modules = DebianStage1Modules
		}
	}
	for i, m := range o.Modules {
		if m == "" || strings.ContainsAny(m, "/ \t\n") || strings.HasSuffix(m, ".ko") {
			return fmt.Errorf("image options: Modules[%d] %q: want a bare module name like virtio_net", i, m)
		}
	}
	if o.DiskSize == 0 {
		o.DiskSize = DefaultDiskSize
	}
	if o.DiskSize < 1<<30 || o.DiskSize > 1<<40 {
		return fmt.Errorf("image options: DiskSize %d: want 1 GiB to 1 TiB", o.DiskSize)
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

// findKernel returns the bzImage in an unpacked kernel package and its release.
func findKernel(root string) (path, version string, err error) {
	matches, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if len(matches) != 1 {
		return "", "", fmt.Errorf("%w: want exactly one boot/vmlinuz-* in the package, found %d", ErrMissing, len(matches))
	}
	return matches[0], strings.TrimPrefix(filepath.Base(matches[0]), "vmlinuz-"), nil
}

func copyFile(src, dst string, perm os.FileMode) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, data, perm)
}

// unpackKernel unpacks the kernel package into work/deb with dpkg -x and
// copies the kernel to out/vmlinuz. It returns the unpacked tree and the
// kernel release.
func unpackKernel(ctx context.Context, deb, work, out string) (root, version string, err error) {
	root = filepath.Join(work, "deb")
	if b, err := exec.CommandContext(ctx, "dpkg", "-x", deb, root).CombinedOutput(); err != nil {
		return "", "", fmt.Errorf("dpkg -x %s: %w: %s", deb, err, bytes.TrimSpace(b))
	}
	kernel, version, err := findKernel(root)
	if err != nil {
		return "", "", fmt.Errorf("%s: %w", deb, err)
	}
	if err := copyFile(kernel, filepath.Join(out, kernelFile), 0o644); err != nil {
		return "", "", err
	}
	return root, version, nil
}
