package image

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseProfile(t *testing.T) {
	for _, tt := range []struct {
		in      string
		want    Profile
		wantErr bool
	}{
		{"", ProfileBusybox, false},
		{"busybox", ProfileBusybox, false},
		{"debian", ProfileDebian, false},
		{"debian-docker", ProfileDebianDocker, false},
		{"Debian", "", true},
		{"ubuntu", "", true},
	} {
		got, err := ParseProfile(tt.in)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("ParseProfile(%q) = %q, %v", tt.in, got, err)
		}
		if err != nil && !strings.Contains(err.Error(), `"debian-docker"`) {
			t.Errorf("ParseProfile(%q) error %q does not list the profiles", tt.in, err)
		}
	}
	if !slices.Contains(ProfileDebianDocker.packages(), "docker.io") || slices.Contains(ProfileDebian.packages(), "docker.io") {
		t.Error("docker.io belongs to debian-docker only")
	}
	for _, p := range []string{"openssh-server", "git", "curl", "bash", "ca-certificates"} {
		if !slices.Contains(ProfileDebian.packages(), p) {
			t.Errorf("debian lacks %s", p)
		}
	}
}

func TestHostSuiteAndSources(t *testing.T) {
	dir := t.TempDir()
	osr := filepath.Join(dir, "os-release")
	os.WriteFile(osr, []byte("PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_CODENAME=bookworm\nID=debian\n"), 0o644)
	if s, err := hostSuite(osr); err != nil || s != "bookworm" {
		t.Errorf("hostSuite = %q, %v", s, err)
	}
	os.WriteFile(osr, []byte("ID=debian\n"), 0o644)
	if _, err := hostSuite(osr); err == nil || !strings.Contains(err.Error(), "VERSION_CODENAME") {
		t.Errorf("hostSuite without a codename: %v", err)
	}

	apt := filepath.Join(dir, "apt")
	os.MkdirAll(filepath.Join(apt, "sources.list.d"), 0o755)
	os.WriteFile(filepath.Join(apt, "sources.list"), []byte("# comments only\n\n"), 0o644)
	os.WriteFile(filepath.Join(apt, "sources.list.d", "debian.sources"), []byte("Types: deb\nURIs: http://deb.debian.org/debian\n"), 0o644)
	os.WriteFile(filepath.Join(apt, "sources.list.d", "extra.list"), []byte("deb http://example.invalid/debian bookworm main\n"), 0o644)
	os.WriteFile(filepath.Join(apt, "sources.list.d", "notes.txt"), []byte("deb x y z\n"), 0o644)
	got := hostSources(apt)
	want := []string{filepath.Join(apt, "sources.list.d", "extra.list"), filepath.Join(apt, "sources.list.d", "debian.sources")}
	if !slices.Equal(got, want) {
		t.Errorf("hostSources = %v, want %v", got, want)
	}
}

// TestDebianFiles checks the rendered init scripts and configuration: no
// placeholder left, shell syntax valid, the Docker parts only in the Docker
// profile, and sshd allowing exactly the forwarding the manager needs.
func TestDebianFiles(t *testing.T) {
	placeholder := regexp.MustCompile(`@[A-Z]+@`)
	for _, p := range []Profile{ProfileDebian, ProfileDebianDocker} {
		r := &debianRecipe{opts: Options{Profile: p}}
		files := r.files()
		files["stage1"] = renderDebian(debianStage1, p, DebianStage1Modules)
		for name, text := range files {
			if m := placeholder.FindString(text); m != "" {
				t.Errorf("%s %s: placeholder %s left", p, name, m)
			}
		}
		for _, name := range []string{"stage1", GuestInitPath} {
			sh, args := "bash", []string{"-n"} // stage 2 is bash
			if name == "stage1" {
				sh, args = "sh", []string{"-n"}
				if haveTool("busybox") {
					sh, args = "busybox", []string{"sh", "-n"} // stage 1 runs busybox's sh
				}
			}
			cmd := exec.Command(sh, args...)
			cmd.Stdin = strings.NewReader(files[name])
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("%s %s: %s -n: %v: %s", p, name, sh, err, out)
			}
		}
		_, hasDaemon := files[GuestDockerDaemonConfig]
		if hasDaemon != p.HasDocker() || strings.Contains(files[GuestInitPath], `[[ 1 == 1 ]]`) != p.HasDocker() {
			t.Errorf("%s: Docker configured = %v, want %v", p, hasDaemon, p.HasDocker())
		}
		sshd := files["/etc/ssh/sshd_config"]
		for _, want := range []string{"AllowStreamLocalForwarding local", "AllowTcpForwarding local", "PasswordAuthentication no",
			"PermitRootLogin prohibit-password", "HostKey " + GuestOpenSSHHostKeyPath} {
			if !strings.Contains(sshd, want+"\n") {
				t.Errorf("sshd_config lacks %q", want)
			}
		}
		if !strings.Contains(files["stage1"], "exec switch_root /newroot /usr/bin/tini -- "+GuestInitPath) {
			t.Errorf("stage 1 does not hand over to tini and %s", GuestInitPath)
		}
	}
	docker := (&debianRecipe{opts: Options{Profile: ProfileDebianDocker}}).files()
	if !strings.Contains(docker[GuestDockerDaemonConfig], `"insecure-registries": ["10.0.2.0/24"]`) {
		t.Errorf("daemon.json does not trust the coordinator's plain-HTTP registry:\n%s", docker[GuestDockerDaemonConfig])
	}
	// sshd starts before dockerd, so SSH is up while Docker starts.
	init := docker[GuestInitPath]
	if i, j := strings.Index(init, "/usr/sbin/sshd"), strings.Index(init, "dockerd --config-file"); i < 0 || j < 0 || i > j {
		t.Error("stage 2 does not start sshd before dockerd")
	}
}

// TestStage1Modules resolves the Debian initramfs's modules against the
// real kernel package: ext4's dependencies come before it.
func TestStage1Modules(t *testing.T) {
	cache := cacheDir(t)
	deb, err := FindKernelDeb(filepath.Join(cache, "debs"))
	need(t, "the kernel .deb in "+filepath.Join(cache, "debs"), err == nil)
	need(t, "dpkg", haveTool("dpkg"))
	out := t.TempDir()
	root, version, err := unpackKernel(context.Background(), deb, t.TempDir(), out)
	if err != nil {
		t.Fatal(err)
	}
	mods, err := findModules(root, version, DebianStage1Modules)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range mods {
		names = append(names, m.name)
	}
	t.Logf("stage-1 modules: %v", names)
	at := func(n string) int { return slices.Index(names, n) }
	for _, dep := range []string{"jbd2", "mbcache", "crc16"} {
		if at(dep) < 0 || at(dep) > at("ext4") {
			t.Errorf("%s missing or after ext4: %v", dep, names)
		}
	}
	if at("virtio_blk") < at("virtio") || at("virtio_net") < at("net_failover") {
		t.Errorf("virtio order: %v", names)
	}
	if _, err := findModules(root, version, []string{"no_such_module"}); !errors.Is(err, ErrMissing) {
		t.Errorf("unknown module: %v, want ErrMissing", err)
	}
	// The busybox profile's list is already in dependency order.
	mods, err = findModules(root, version, DefaultModules)
	if err != nil {
		t.Fatal(err)
	}
	if len(mods) != len(DefaultModules) {
		t.Errorf("DefaultModules resolved to %d modules, want %d", len(mods), len(DefaultModules))
	}
}

func TestMountsUnder(t *testing.T) {
	if got := unescapeMount(`/tmp/a\040b`); got != "/tmp/a b" {
		t.Errorf("unescapeMount = %q", got)
	}
	mounts, err := mountsUnder("/")
	if err != nil || !slices.Contains(mounts, "/") {
		t.Errorf("mountsUnder(/) = %v, %v", mounts, err)
	}
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "x/y"), 0o755)
	if err := removeRootfs(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("removeRootfs left %s: %v", dir, err)
	}
}

// needDebianBuild skips (or, with CI=true, fails) unless a Debian image can
// be built here.
func needDebianBuild(t *testing.T, cache string) {
	t.Helper()
	_, err := FindKernelDeb(filepath.Join(cache, "debs"))
	need(t, "the kernel .deb in "+filepath.Join(cache, "debs"), err == nil)
	need(t, "root (mmdebstrap --mode=root)", os.Geteuid() == 0)
	for _, tool := range []string{"mmdebstrap", "mkfs.ext4", "debugfs", "dpkg"} {
		need(t, tool+" (scripts/setup-vm.sh)", haveTool(tool))
	}
	need(t, "busybox-static", fileExists("/bin/busybox"))
}

// TestBuildDebian builds the debian profile (minutes the first time, then
// from the cache) and looks inside its disk with debugfs: mayfly's init and
// sshd_config, no SSH host key, the kernel modules with their index, and the
// packages a job needs.
func TestBuildDebian(t *testing.T) {
	cache := cacheDir(t)
	needDebianBuild(t, cache)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	start := time.Now()
	img, err := Build(ctx, Options{CacheDir: cache, Profile: ProfileDebian})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("debian image %s (cached=%v, %v; built in %v): disk %d MiB allocated of %d GiB, %d packages",
		img.Hash, img.Cached, time.Since(start).Round(time.Millisecond), img.BuildTime.Round(time.Second),
		img.DiskAllocated>>20, img.DiskSize>>30, len(img.Packages))
	if img.Profile != ProfileDebian || img.Disk == "" || img.Suite == "" {
		t.Fatalf("image = %+v", img)
	}
	if fi, err := os.Stat(img.Disk); err != nil || fi.Mode().Perm()&0o222 != 0 {
		t.Errorf("base disk %s: %v, mode %v; want read-only", img.Disk, err, fi.Mode())
	}
	for _, want := range []string{"openssh-server=", "git=", "curl=", "bash=", "ca-certificates=", "tini="} {
		if !slices.ContainsFunc(img.Packages, func(p string) bool { return strings.HasPrefix(p, want) }) {
			t.Errorf("packages lack %s*", want)
		}
	}
	for _, unwanted := range []string{"systemd=", "docker.io=", "dropbear"} {
		if slices.ContainsFunc(img.Packages, func(p string) bool { return strings.HasPrefix(p, unwanted) }) {
			t.Errorf("packages include %s*", unwanted)
		}
	}
	debugfs := func(req string) string {
		out, err := exec.Command("debugfs", "-R", req, img.Disk).Output()
		if err != nil {
			t.Fatalf("debugfs -R %q: %v", req, err)
		}
		return string(out)
	}
	if init := debugfs("cat /usr/sbin/mayfly-init"); !strings.Contains(init, ReadyMarker) {
		t.Errorf("no mayfly-init on the disk: %q", init)
	}
	if cfg := debugfs("cat /etc/ssh/sshd_config"); !strings.Contains(cfg, "AllowStreamLocalForwarding local") {
		t.Errorf("sshd_config is not mayfly's: %q", cfg)
	}
	if ls := debugfs("ls /etc/ssh"); strings.Contains(ls, "ssh_host_") {
		t.Errorf("the shared disk holds SSH host keys: %s", ls)
	}
	modDir := "/usr/lib/modules/" + img.KernelVersion
	if dep := debugfs("cat " + modDir + "/modules.dep"); !strings.Contains(dep, "kernel/fs/overlayfs/overlay.ko:") ||
		!strings.Contains(dep, "kernel/net/bridge/br_netfilter.ko: kernel/net/bridge/bridge.ko") {
		t.Errorf("modules.dep lacks overlay or br_netfilter (first 300 bytes): %.300s", dep)
	}
	if ls := debugfs("ls /usr/share/man"); strings.Contains(ls, "man1") {
		t.Errorf("manual pages were not excluded: %s", ls)
	}

	// Lookup finds it without building; a different disk size is another image.
	if found, err := Lookup(ctx, Options{CacheDir: cache, Profile: ProfileDebian}); err != nil || found.Hash != img.Hash {
		t.Errorf("Lookup = %v, %v; want %s", found, err, img.Hash)
	}
	_, err = Lookup(ctx, Options{CacheDir: cache, Profile: ProfileDebian, DiskSize: 3 << 30})
	if !errors.Is(err, ErrNotBuilt) || !strings.Contains(err.Error(), "mayfly image build --profile debian") {
		t.Errorf("Lookup of an unbuilt image: %v, want ErrNotBuilt naming the build command", err)
	}
}
