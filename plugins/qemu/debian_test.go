package qemu_test

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/plugins/qemu/qemuvm"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/provisioner/image"
)

// debianBootTimeout is boot_timeout for the Debian profiles here: Docker
// Engine takes tens of seconds to start under software emulation, more on
// a loaded machine.
const debianBootTimeout = 4 * time.Minute

var (
	debianMu     sync.Mutex
	debianImages = map[image.Profile]*image.Image{}
)

// debianImage builds (or finds in the cache) a Debian profile's image:
// minutes the first time on a machine, as root.
func debianImage(t *testing.T, p image.Profile) *image.Image {
	t.Helper()
	baseImage(t) // qemu and the kernel package
	need(t, "root (mmdebstrap --mode=root)", os.Geteuid() == 0)
	for _, tool := range []string{"mmdebstrap", "mkfs.ext4", qemuvm.DefaultQEMUImg} {
		_, err := exec.LookPath(tool)
		need(t, tool+" (scripts/setup-vm.sh)", err == nil)
	}
	debianMu.Lock()
	defer debianMu.Unlock()
	if img := debianImages[p]; img != nil {
		return img
	}
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	img, err := image.Build(ctx, image.Options{CacheDir: imageCacheDir(t), Profile: p})
	if err != nil {
		t.Fatalf("build the %s image: %v", p, err)
	}
	t.Logf("%s image %s: cached %v, built in %v, disk %d MiB allocated", p, img.Hash, img.Cached,
		img.BuildTime.Round(time.Second), img.DiskAllocated>>20)
	debianImages[p] = img
	return img
}

// debianVM is one booted VM of a Debian profile, through its own plugin.
type debianVM struct {
	img    *image.Image
	plugin providers.Provider
	id     string
	dir    string // state directory
	ci     providers.ConnectInfo
	client *ssh.Client
}

// run runs a command over the VM's SSH connection; stdin may be nil.
func (v *debianVM) run(t *testing.T, stdin io.Reader, command string) (string, error) {
	t.Helper()
	sess, err := v.client.NewSession()
	if err != nil {
		return "", err
	}
	defer sess.Close()
	timer := time.AfterFunc(2*time.Minute, func() { sess.Close() })
	defer timer.Stop()
	sess.Stdin = stdin
	out, err := sess.CombinedOutput(command)
	return string(out), err
}

// TestDebianProfiles boots one VM of each Debian profile at once, each
// through its own plugin process with "image" set, and checks what jobs
// rely on: OpenSSH with the pinned per-VM host key, bash, git, curl and CA
// certificates, no systemd, the VM's own copy-on-write disk (the shared
// base is never written), no remote forwarding, and in the Docker
// profile a Docker Engine that answers through the SSH connection, trusts
// the coordinator's plain-HTTP registry, and runs containers on a network
// of their own where a service answers by its alias.
func TestDebianProfiles(t *testing.T) {
	profiles := []image.Profile{image.ProfileDebian, image.ProfileDebianDocker}
	vms := make([]*debianVM, len(profiles))
	for i, p := range profiles {
		vms[i] = &debianVM{img: debianImage(t, p)}
	}
	state := stateDir(t)
	ctx, cancel := context.WithTimeout(context.Background(), debianBootTimeout+5*time.Minute)
	defer cancel()
	for i, p := range profiles {
		v := vms[i]
		v.plugin = startPlugin(t)
		if _, err := v.plugin.Init(ctx, settingsJSON(t, map[string]any{
			"state_dir": state, "image_cache_dir": imageCacheDir(t), "image": string(p), "group": string(p),
			"boot_timeout": debianBootTimeout.String(),
		})); err != nil {
			t.Fatalf("Init with image %q: %v", p, err)
		}
		ids, err := v.plugin.Create(ctx, 1, map[string]string{providers.LabelManager: "test"})
		if err != nil || len(ids) != 1 {
			t.Fatalf("Create: %v, %v", ids, err)
		}
		v.id, v.dir = ids[0], filepath.Join(state, string(p), ids[0])
		t.Cleanup(func() {
			if v.client != nil {
				v.client.Close()
			}
			dctx, dcancel := context.WithTimeout(context.Background(), time.Minute)
			defer dcancel()
			if _, err := v.plugin.Delete(dctx, ids); err != nil {
				t.Errorf("Delete(%v): %v", ids, err)
			}
		})
	}
	start := time.Now()
	for i, p := range profiles { // both boot at once
		v := vms[i]
		waitList(t, v.plugin, debianBootTimeout+15*time.Second, string(p)+" VM to run", running(v.id))
		var err error
		if v.ci, err = v.plugin.ConnectInfo(ctx, v.id); err != nil {
			t.Fatal(err)
		}
		v.client = dialPinned(t, v.ci)
		t.Logf("%s VM %s running %v after Create", p, v.id, time.Since(start).Round(time.Millisecond))
	}
	t.Run("debian", func(t *testing.T) { checkDebianVM(t, vms[0]) })
	t.Run("debian-docker", func(t *testing.T) {
		checkDebianVM(t, vms[1])
		checkDocker(t, vms[1])
	})
}

// dialPinned opens an SSH connection to the instance with its key, pinning
// its host key.
func dialPinned(t *testing.T, ci providers.ConnectInfo) *ssh.Client {
	t.Helper()
	signer, err := ssh.ParsePrivateKey(ci.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	hostKey, _, _, _, err := ssh.ParseAuthorizedKey([]byte(ci.HostKey))
	if err != nil {
		t.Fatal(err)
	}
	client, err := ssh.Dial("tcp", net.JoinHostPort(ci.Address, strconv.Itoa(ci.Port)), &ssh.ClientConfig{
		User: ci.Username, Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback: ssh.FixedHostKey(hostKey), HostKeyAlgorithms: []string{hostKey.Type()}, Timeout: 30 * time.Second,
	})
	if err != nil {
		t.Fatalf("ssh to %s: %v", ci.ID, err)
	}
	return client
}

// checkDebianVM checks what both Debian profiles offer a job.
func checkDebianVM(t *testing.T, v *debianVM) {
	if sv := string(v.client.ServerVersion()); !strings.HasPrefix(sv, "SSH-2.0-OpenSSH") {
		t.Errorf("server version %q, want OpenSSH's sshd", sv)
	}
	out, err := v.run(t, nil, `set -e
bash -c 'echo bash=$BASH_VERSION'
git --version
curl --version | head -n 1
test -s /etc/ssl/certs/ca-certificates.crt && echo certs=ok
echo debian=$(cat /etc/debian_version)
echo hostname=$(hostname)
echo pid1=$(cat /proc/1/comm)
echo kernel=$(uname -r)
if command -v systemctl >/dev/null; then echo systemd=yes; fi
head -c 8000000 /dev/urandom >/root/junk && sync && echo wrote=ok`)
	t.Logf("%s:\n%s", v.img.Profile, out)
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	for _, want := range []string{"bash=5", "git version 2", "curl 7", "certs=ok", "debian=12",
		"hostname=" + v.id + "\n", "pid1=tini\n", "kernel=" + v.img.KernelVersion + "\n", "wrote=ok"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if strings.Contains(out, "systemd=yes") {
		t.Error("systemd is installed")
	}
	// The client may open channels (the Docker socket needs it); the VM may
	// not open any towards the client: no remote forwarding.
	if l, err := v.client.Listen("tcp", "127.0.0.1:0"); err == nil {
		l.Close()
		t.Error("sshd accepted a remote forward (AllowTcpForwarding should be local)")
	}

	// The VM wrote to its own overlay; the shared base disk is untouched.
	info, err := exec.Command(qemuvm.DefaultQEMUImg, "info", "--output=json", "-U", filepath.Join(v.dir, qemuvm.DiskFile)).Output()
	if err != nil {
		t.Fatalf("qemu-img info: %v", err)
	}
	var qi struct {
		Backing    string `json:"full-backing-filename"`
		ActualSize int64  `json:"actual-size"`
	}
	if err := json.Unmarshal(info, &qi); err != nil {
		t.Fatal(err)
	}
	if qi.Backing != v.img.Disk || qi.ActualSize < 8e6 {
		t.Errorf("overlay: backing %q (want %q), %d bytes (want the 8 MB the guest wrote)", qi.Backing, v.img.Disk, qi.ActualSize)
	}
	// The manifest is written after the disk, at the end of the build.
	manifest, merr := os.Stat(filepath.Join(filepath.Dir(v.img.Disk), "manifest.json"))
	fi, err := os.Stat(v.img.Disk)
	if err != nil || merr != nil || fi.Mode().Perm()&0o222 != 0 || fi.ModTime().After(manifest.ModTime()) {
		t.Errorf("base disk: %v, %v: want read-only and unchanged since the build", err, merr)
	}
}

// checkDocker checks the Docker profile's engine through the SSH
// connection, as the manager drives it: the API over direct-streamlocal,
// and containers run from an image imported over SSH (nothing here
// reaches a registry).
func checkDocker(t *testing.T, v *debianVM) {
	httpc := &http.Client{Timeout: time.Minute, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return v.client.DialContext(ctx, "unix", image.GuestDockerSocket)
		},
	}}
	resp, err := httpc.Get("http://docker/_ping")
	if err != nil {
		log, _ := v.run(t, nil, "tail -n 5 /var/log/sshd.log; ls -l "+image.GuestDockerSocket)
		t.Fatalf("GET /_ping through direct-streamlocal to %s: %v; in the VM:\n%s", image.GuestDockerSocket, err, log)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(body) != "OK" {
		t.Errorf("/_ping: %s %q", resp.Status, body)
	}
	resp, err = httpc.Get("http://docker/info")
	if err != nil {
		t.Fatal(err)
	}
	var info struct {
		ServerVersion, Driver, CgroupVersion string
		RegistryConfig                       struct{ InsecureRegistryCIDRs []string }
	}
	err = json.NewDecoder(resp.Body).Decode(&info)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("docker: %+v", info)
	if info.Driver != "overlay2" || info.CgroupVersion != "2" || !slicesContains(info.RegistryConfig.InsecureRegistryCIDRs, "10.0.2.0/24") {
		t.Errorf("docker info = %+v, want overlay2, cgroup v2 and 10.0.2.0/24 an insecure registry", info)
	}

	// A busybox image from the host's static busybox, imported over SSH.
	bb, err := os.ReadFile("/bin/busybox")
	need(t, "/bin/busybox (busybox-static)", err == nil)
	var tarball bytes.Buffer
	tw := tar.NewWriter(&tarball)
	tw.WriteHeader(&tar.Header{Name: "bin/", Typeflag: tar.TypeDir, Mode: 0o755})
	tw.WriteHeader(&tar.Header{Name: "bin/busybox", Mode: 0o755, Size: int64(len(bb))})
	tw.Write(bb)
	tw.WriteHeader(&tar.Header{Name: "bin/sh", Typeflag: tar.TypeSymlink, Linkname: "busybox"})
	tw.Close()
	start := time.Now()
	if out, err := v.run(t, &tarball, "docker import - mayfly-test/busybox:1 >/dev/null"); err != nil {
		t.Fatalf("docker import: %v: %s", err, out)
	}
	// A service on a per-job network, reached by its alias from a second
	// container: bridge, veth, iptables and Docker's DNS all work.
	out, err := v.run(t, nil, `set -e
docker run --rm mayfly-test/busybox:1 /bin/busybox sh -c 'echo in-container; /bin/busybox cat /proc/self/cgroup'
docker network create job-1 >/dev/null
docker run -d --name svc --network job-1 --network-alias db mayfly-test/busybox:1 	/bin/busybox nc -ll -p 5432 -e /bin/busybox echo hello-from-db >/dev/null
for i in 1 2 3 4 5 6 7 8 9 10; do
	if docker run --rm --network job-1 mayfly-test/busybox:1 /bin/busybox nc -w 5 db 5432 </dev/null; then break; fi
	sleep 1
done`)
	t.Logf("containers (%v):\n%s", time.Since(start).Round(time.Millisecond), out)
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	for _, want := range []string{"in-container", "0::/", "hello-from-db"} {
		if !strings.Contains(out, want) {
			t.Errorf("container output lacks %q", want)
		}
	}
}

func slicesContains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}
