package image

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"time"
)

// debianRecipe builds the Debian profiles: the kernel, a small initramfs
// (busybox, virtio and ext4 modules, stage-1 init) and an ext4 disk image
// with a rootfs made by mmdebstrap from the machine's apt sources.
type debianRecipe struct {
	opts    Options
	sources []input // apt source files (src), named by dest in the hash
}

func newDebianRecipe(ctx context.Context, o Options) (*debianRecipe, error) {
	if _, err := os.Stat(o.KernelDeb); err != nil {
		return nil, fmt.Errorf("%w: kernel package %s: %v (run scripts/setup-vm.sh)", ErrMissing, o.KernelDeb, err)
	}
	for _, tool := range []struct{ name, pkg string }{
		{"dpkg", "dpkg"}, {"mmdebstrap", "mmdebstrap"}, {"mkfs.ext4", "e2fsprogs"}, {"chroot", "coreutils"},
	} {
		if _, err := exec.LookPath(tool.name); err != nil {
			return nil, fmt.Errorf("%w: %s not on PATH (install Debian's %s: scripts/setup-vm.sh)", ErrMissing, tool.name, tool.pkg)
		}
	}
	if err := checkStatic(o.Busybox); err != nil {
		return nil, err
	}
	if o.Suite == "" {
		suite, err := hostSuite("/etc/os-release")
		if err != nil {
			return nil, fmt.Errorf("image options: Suite not set and %w", err)
		}
		o.Suite = suite
	}
	if len(o.Sources) == 0 {
		o.Sources = hostSources("/etc/apt")
		if len(o.Sources) == 0 {
			return nil, fmt.Errorf("%w: no apt sources in /etc/apt/sources.list or /etc/apt/sources.list.d (set Sources)", ErrMissing)
		}
	}
	r := &debianRecipe{opts: o}
	for _, s := range o.Sources {
		if _, err := os.Stat(s); err != nil {
			return nil, fmt.Errorf("image options: Sources: %w", err)
		}
		r.sources = append(r.sources, input{src: s, dest: "apt-source:" + s})
	}
	return r, nil
}

// hostSuite returns VERSION_CODENAME from an os-release file.
func hostSuite(osRelease string) (string, error) {
	b, err := os.ReadFile(osRelease)
	if err != nil {
		return "", fmt.Errorf("cannot tell the Debian release: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VERSION_CODENAME="); ok {
			if v = strings.Trim(v, `"' `); v != "" {
				return v, nil
			}
		}
	}
	return "", fmt.Errorf("cannot tell the Debian release: no VERSION_CODENAME in %s", osRelease)
}

// hostSources lists the machine's apt source files that hold an entry.
func hostSources(aptDir string) []string {
	var files []string
	if b, err := os.ReadFile(filepath.Join(aptDir, "sources.list")); err == nil && hasEntry(b) {
		files = append(files, filepath.Join(aptDir, "sources.list"))
	}
	for _, pattern := range []string{"*.list", "*.sources"} {
		matches, _ := filepath.Glob(filepath.Join(aptDir, "sources.list.d", pattern))
		sort.Strings(matches)
		for _, m := range matches {
			if b, err := os.ReadFile(m); err == nil && hasEntry(b) {
				files = append(files, m)
			}
		}
	}
	return files
}

// hasEntry reports whether an apt source file has a line that is neither
// blank nor a comment.
func hasEntry(b []byte) bool {
	for _, line := range strings.Split(string(b), "\n") {
		if l := strings.TrimSpace(line); l != "" && !strings.HasPrefix(l, "#") {
			return true
		}
	}
	return false
}

// files renders the files the recipe writes into the rootfs, by path.
func (r *debianRecipe) files() map[string]string {
	p := r.opts.Profile
	files := map[string]string{
		GuestInitPath:          renderDebian(debianStage2, p, nil),
		"/etc/ssh/sshd_config": renderDebian(debianSSHDConfig, p, nil),
		"/etc/resolv.conf":     "nameserver " + GuestDNS + "\n",
		"/etc/hostname":        "localhost\n",
	}
	if p.HasDocker() {
		files[GuestDockerDaemonConfig] = renderDebian(debianDaemonJSON, p, nil)
		files[GuestContainerdConfig] = renderDebian(debianContainerdTOML, p, nil)
	}
	return files
}

func (r *debianRecipe) hash() (string, error) {
	o := r.opts
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%s\x00%s\x00%d\x00", formatVersion, o.Profile, o.Suite, o.DiskSize)
	for _, list := range [][]string{o.Profile.packages(), debianExcludes, o.Modules, rootfsModuleDirs} {
		fmt.Fprintf(h, "%s\x00", strings.Join(list, ","))
	}
	fmt.Fprintf(h, "%s\x00", renderDebian(debianStage1, o.Profile, o.Modules))
	files := r.files()
	for _, name := range slices.Sorted(maps.Keys(files)) {
		fmt.Fprintf(h, "%s\x00%s\x00", name, files[name])
	}
	for _, s := range staticFiles {
		fmt.Fprintf(h, "%s\x00%s\x00", s.name, s.data)
	}
	inputs := append([]input{{src: o.KernelDeb}, {src: o.Busybox, dest: "bin/busybox"}}, r.sources...)
	for _, in := range inputs {
		if err := hashFile(h, in); err != nil {
			return "", err
		}
	}
	return hex.EncodeToString(h.Sum(nil))[:20], nil
}

// hashFile writes an input's destination and content into h.
func hashFile(h io.Writer, in input) error {
	f, err := os.Open(in.src)
	if err != nil {
		return fmt.Errorf("hash image inputs: %w", err)
	}
	defer f.Close()
	fmt.Fprintf(h, "%s\x00", in.dest)
	if _, err := io.Copy(h, f); err != nil {
		return fmt.Errorf("hash image inputs: %s: %w", in.src, err)
	}
	_, err = h.Write([]byte{0})
	return err
}

func (r *debianRecipe) build(ctx context.Context, work, out string, img *Image) error {
	o := r.opts
	log := o.Logger
	if os.Geteuid() != 0 {
		return fmt.Errorf("the %s profile is built as root (mmdebstrap --mode=root and mkfs.ext4 -d keep the files' owners)", o.Profile)
	}
	unpacked, version, err := unpackKernel(ctx, o.KernelDeb, work, out)
	if err != nil {
		return err
	}
	img.KernelVersion, img.Suite = version, o.Suite
	if img.PVH, err = writePVHKernel(ctx, out, log); err != nil {
		return err
	}
	modules, err := findModules(unpacked, version, o.Modules)
	if err != nil {
		return fmt.Errorf("%s: %w", o.KernelDeb, err)
	}
	for _, m := range modules {
		img.Modules = append(img.Modules, m.name)
	}
	applets, err := busyboxApplets(ctx, o.Busybox)
	if err != nil {
		return err
	}
	err = writeInitrd(filepath.Join(out, initrdFile), initrdSpec{
		files:   []input{{src: o.Busybox, dest: "bin/busybox"}},
		modules: modules, applets: applets,
		init: renderDebian(debianStage1, o.Profile, img.Modules),
	})
	if err != nil {
		return err
	}

	workDir := o.WorkDir
	if workDir == "" {
		workDir = os.TempDir()
	}
	rootfs, err := os.MkdirTemp(workDir, "mayfly-rootfs-*")
	if err != nil {
		return err
	}
	defer func() {
		if err := removeRootfs(rootfs); err != nil {
			log.Error("remove the build's rootfs", "dir", rootfs, "err", err)
		}
	}()
	start := time.Now()
	if err := r.mmdebstrap(ctx, rootfs); err != nil {
		return err
	}
	log.Info("rootfs installed", "profile", o.Profile, "suite", o.Suite, "took", time.Since(start).Round(time.Millisecond))
	if err := r.configure(ctx, rootfs, unpacked, version); err != nil {
		return fmt.Errorf("configure rootfs: %w", err)
	}
	if img.Packages, err = installedPackages(ctx, rootfs); err != nil {
		return err
	}
	disk := filepath.Join(out, diskFile)
	if err := makeExt4(ctx, rootfs, disk, o.DiskSize); err != nil {
		return err
	}
	var st syscall.Stat_t
	if err := syscall.Stat(disk, &st); err != nil {
		return err
	}
	img.DiskSize, img.DiskAllocated = st.Size, st.Blocks*512
	return nil
}

// mmdebstrap installs the profile's packages into rootfs from the apt
// sources, keeping the downloaded packages in CacheDir/debs/apt for the
// next build.
func (r *debianRecipe) mmdebstrap(ctx context.Context, rootfs string) error {
	o := r.opts
	aptCache := filepath.Join(o.CacheDir, "debs", "apt")
	if err := os.MkdirAll(aptCache, 0o755); err != nil {
		return err
	}
	args := []string{
		"--mode=root", "--variant=minbase", "--format=directory",
		"--include=" + strings.Join(o.Profile.packages(), ","),
		"--aptopt=Acquire::Retries \"3\"",
		// Reuse and keep the downloaded packages (mmdebstrap's documented recipe).
		"--skip=download/empty", "--skip=essential/unlink",
		"--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
		"--setup-hook=sync-in " + aptCache + " /var/cache/apt/archives/",
		"--customize-hook=sync-out /var/cache/apt/archives " + aptCache,
	}
	for _, x := range debianExcludes {
		args = append(args, "--dpkgopt="+x)
	}
	args = append(args, o.Suite, rootfs)
	args = append(args, o.Sources...)
	cmd := exec.CommandContext(ctx, "mmdebstrap", args...)
	// On cancellation mmdebstrap gets SIGTERM first, so it can unmount
	// what it mounted in the rootfs.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C.UTF-8")
	var output tailBuffer
	cmd.Stdout, cmd.Stderr = &output, &output
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("mmdebstrap %s %s: %w:\n%s", o.Suite, strings.Join(o.Profile.packages(), ","), err, output.String())
	}
	return nil
}

// configure writes mayfly's files into the rootfs, removes what must be
// per VM (SSH host keys) and installs the kernel modules with their index.
func (r *debianRecipe) configure(ctx context.Context, rootfs, unpacked, version string) error {
	for name, data := range r.files() {
		p := filepath.Join(rootfs, name)
		mode := os.FileMode(0o644)
		if name == GuestInitPath {
			mode = 0o755
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		os.Remove(p) // e.g. a symlink left by the packages
		if err := os.WriteFile(p, []byte(data), mode); err != nil {
			return err
		}
	}
	keys, _ := filepath.Glob(filepath.Join(rootfs, "etc/ssh/ssh_host_*"))
	for _, k := range keys {
		if err := os.Remove(k); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(rootfs, "etc/machine-id"), nil, 0o444); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(rootfs, "root/.ssh"), 0o700); err != nil {
		return err
	}
	src, err := moduleRoot(unpacked, version)
	if err != nil {
		return err
	}
	dst := filepath.Join(rootfs, "usr/lib/modules", version)
	for _, rel := range rootfsModuleDirs {
		if err := copyTree(filepath.Join(src, rel), filepath.Join(dst, rel)); err != nil {
			return fmt.Errorf("kernel modules: %w", err)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	commands := [][]string{{"depmod", "-a", version}}
	// iptables' legacy backend: Docker Engine runs iptables about 70 times
	// as it starts, and under software emulation the nftables backend takes
	// about 0.1 s a call more (measured), seconds in all.
	for _, cmd := range []string{"iptables", "ip6tables"} {
		if _, err := os.Stat(filepath.Join(rootfs, "usr/sbin", cmd+"-legacy")); err == nil {
			commands = append(commands, []string{"update-alternatives", "--quiet", "--set", cmd, "/usr/sbin/" + cmd + "-legacy"})
		}
	}
	for _, c := range commands {
		if b, err := exec.CommandContext(ctx, "chroot", append([]string{rootfs}, c...)...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s in the rootfs: %w: %s", strings.Join(c, " "), err, bytes.TrimSpace(b))
		}
	}
	return nil
}

// copyTree copies a file or a directory tree of regular files.
func copyTree(src, dst string) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		target := filepath.Join(dst, rel)
		switch {
		case d.IsDir():
			return os.MkdirAll(target, 0o755)
		case d.Type().IsRegular():
			if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
				return err
			}
			return copyFile(p, target, 0o644)
		}
		return nil
	})
}

// installedPackages lists the rootfs's packages as name=version, sorted.
func installedPackages(ctx context.Context, rootfs string) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "chroot", rootfs, "dpkg-query", "-W", "-f", "${Package}=${Version}\\n").Output()
	if err != nil {
		return nil, fmt.Errorf("list the rootfs's packages: %w", err)
	}
	pkgs := strings.Fields(string(out))
	sort.Strings(pkgs)
	return pkgs, nil
}

// makeExt4 makes disk, a sparse file of size bytes, an ext4 file system
// holding the tree at rootfs (mkfs.ext4 -d: no loop mount). No journal: a
// VM's disk lives as long as the VM; no reserved blocks.
func makeExt4(ctx context.Context, rootfs, disk string, size int64) error {
	f, err := os.OpenFile(disk, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-L", "mayfly-root", "-m", "0", "-O", "^has_journal",
		"-E", "root_owner=0:0", "-d", rootfs, disk)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4 -d %s %s: %w: %s", rootfs, disk, err, bytes.TrimSpace(b))
	}
	// The base disk is shared by every VM through copy-on-write overlays:
	// nothing may write it.
	return os.Chmod(disk, 0o444)
}

// removeRootfs removes a build's rootfs. If a mount is still inside it (an
// interrupted mmdebstrap), it is detached first; removing through a bind
// mount of the host's /dev or /sys would be a disaster, so anything still
// mounted makes it give up instead.
func removeRootfs(dir string) error {
	mounts, err := mountsUnder(dir)
	if err != nil {
		return err
	}
	for i := len(mounts) - 1; i >= 0; i-- { // deepest (mounted last) first
		_ = syscall.Unmount(mounts[i], syscall.MNT_DETACH)
	}
	if mounts, err = mountsUnder(dir); err != nil {
		return err
	}
	if len(mounts) > 0 {
		return fmt.Errorf("still mounted, not removed: %s", strings.Join(mounts, ", "))
	}
	return os.RemoveAll(dir)
}

// mountsUnder lists the mount points at or below dir, in mount order.
func mountsUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var mounts []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			mounts = append(mounts, mp)
		}
	}
	return mounts, sc.Err()
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var c byte
			if _, err := fmt.Sscanf(s[i+1:i+4], "%03o", &c); err == nil {
				b.WriteByte(c)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// tailBuffer keeps the last 8 KiB written to it.
type tailBuffer struct{ b []byte }

func (t *tailBuffer) Write(p []byte) (int, error) {
	const keep = 8 << 10
	t.b = append(t.b, p...)
	if len(t.b) > keep {
		t.b = t.b[len(t.b)-keep:]
	}
	return len(p), nil
}

func (t *tailBuffer) String() string { return strings.TrimSpace(string(t.b)) }
