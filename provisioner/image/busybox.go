package image

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
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

// busyboxRecipe builds the busybox profile: the kernel and one initramfs
// with busybox, dropbear and its libraries, the virtio modules and /init.
type busyboxRecipe struct {
	opts   Options
	inputs []input // the kernel deb first
}

func newBusyboxRecipe(ctx context.Context, opts Options) (*busyboxRecipe, error) {
	inputs, err := collectInputs(ctx, opts)
	if err != nil {
		return nil, err
	}
	return &busyboxRecipe{opts: opts, inputs: inputs}, nil
}

func (r *busyboxRecipe) hash() (string, error) {
	return hashInputs(r.inputs, r.opts.Modules)
}

func (r *busyboxRecipe) build(ctx context.Context, work, out string, img *Image) error {
	unpacked, version, err := unpackKernel(ctx, r.opts.KernelDeb, work, out)
	if err != nil {
		return err
	}
	img.KernelVersion = version
	if img.PVH, err = writePVHKernel(ctx, out, r.opts.Logger); err != nil {
		return err
	}
	modules, err := findModules(unpacked, version, r.opts.Modules)
	if err != nil {
		return fmt.Errorf("%s: %w", r.opts.KernelDeb, err)
	}
	for _, m := range modules {
		img.Modules = append(img.Modules, m.name)
	}
	applets, err := busyboxApplets(ctx, r.opts.Busybox)
	if err != nil {
		return err
	}
	return writeInitrd(filepath.Join(out, initrdFile), initrdSpec{
		files: r.inputs[1:], modules: modules, applets: applets, init: renderInit(img.Modules),
	})
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

// initrdSpec is what a base initramfs holds besides busybox's applet links,
// the device nodes and staticFiles.
type initrdSpec struct {
	files   []input  // host files (busybox first)
	modules []module // copied flat into guestModuleDir
	applets []string // busybox applet paths, linked to /bin/busybox
	init    string   // the /init script
}

// writeInitrd writes a gzip-compressed base initramfs.
func writeInitrd(dst string, spec initrdSpec) (err error) {
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
	for _, in := range spec.files {
		addParents(in.dest)
	}
	for _, a := range spec.applets {
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
	for _, in := range spec.files {
		data, err := os.ReadFile(in.src)
		if err != nil {
			return err
		}
		if err := cw.File(in.dest, 0o755, data); err != nil {
			return err
		}
	}
	for _, a := range spec.applets {
		if err := cw.Symlink(a, "/bin/busybox"); err != nil {
			return err
		}
	}
	for _, m := range spec.modules {
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
	if err := cw.File("init", 0o755, []byte(spec.init)); err != nil {
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
