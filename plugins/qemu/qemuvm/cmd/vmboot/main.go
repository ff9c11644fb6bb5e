// Command vmboot boots mayfly microVMs one after another and measures
// boot-to-SSH-ready: from qemu's start to the first successful `echo ok`
// over SSH with the host key pinned; with the debian-docker profile also
// boot-to-Docker-ready, to the first answer to `docker info`'s API call
// (GET /info through the SSH connection, as the manager reaches Docker). It prints
// each run and the medians, with the CPU time qemu used until then: under
// software emulation on a loaded machine wall time inflates, CPU time much
// less.
//
//	go run ./plugins/qemu/qemuvm/cmd/vmboot -n 5
//	go run ./plugins/qemu/qemuvm/cmd/vmboot -n 5 -profile debian-docker -m 1024
//
// With -exec it runs a command in each VM and prints its output instead.
package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/plugins/qemu/qemuvm"
	"github.com/mayfly-ci/mayfly/provisioner/image"
)

var (
	hold     time.Duration
	guestfwd string
	profile  string
	egress   string

	diskOverride   string
	showConsole    bool
	verbose        bool
	kernelArgs     string
	kernelOverride string
)

func main() {
	n := flag.Int("n", 5, "number of sequential boots")
	cache := flag.String("cache", image.DefaultCacheDir, "image cache directory")
	network := flag.String("network", "isolated", "guest network policy: isolated or open")
	command := flag.String("exec", "", "command to run in each VM after the measurement")
	mem := flag.Int("m", qemuvm.DefaultMemoryMB, "memory in MB")
	flag.BoolVar(&verbose, "v", false, "log VM lifecycle")
	flag.StringVar(&guestfwd, "guestfwd", "", "GUESTADDR=COMMAND: let the guest connect to GUESTADDR, served by COMMAND on the host")
	flag.BoolVar(&showConsole, "console", false, "print each VM's console log")
	flag.DurationVar(&hold, "hold", 0, "keep each VM running this long after the measurement (debugging)")
	flag.StringVar(&profile, "profile", "busybox", "image profile: busybox, debian or debian-docker")
	flag.StringVar(&kernelOverride, "kernel", "", "boot this kernel instead of the image's (experiments)")
	flag.StringVar(&kernelArgs, "append", "", "more kernel command line arguments (experiments)")
	flag.StringVar(&diskOverride, "disk", "", "boot this disk image instead of the profile's (experiments)")
	flag.StringVar(&egress, "egress-allow", "", "comma-separated host IP:PORT endpoints the guest reaches at 10.0.2.2:PORT")
	flag.Parse()
	level := slog.LevelWarn
	if verbose {
		level = slog.LevelInfo
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})))
	if err := run(*n, *cache, *network, *command, *mem); err != nil {
		fmt.Fprintln(os.Stderr, "vmboot:", err)
		os.Exit(1)
	}
}

func run(n int, cache, network, command string, mem int) error {
	if n < 1 || n > 50 {
		return fmt.Errorf("-n %d: want 1..50", n)
	}
	var policy qemuvm.Network
	switch network {
	case "isolated":
		policy = qemuvm.NetworkIsolated
	case "open":
		policy = qemuvm.NetworkOpen
	default:
		return fmt.Errorf("-network %q: want isolated or open", network)
	}
	var fwds []qemuvm.GuestForward
	if guestfwd != "" {
		addr, command, ok := strings.Cut(guestfwd, "=")
		if !ok {
			return fmt.Errorf("-guestfwd %q: want GUESTADDR=COMMAND", guestfwd)
		}
		fwds = append(fwds, qemuvm.GuestForward{GuestAddr: addr, Command: command})
	}
	var allow []netip.AddrPort
	for _, a := range strings.Split(egress, ",") {
		if a == "" {
			continue
		}
		ap, err := netip.ParseAddrPort(a)
		if err != nil {
			return fmt.Errorf("-egress-allow %q: %w", a, err)
		}
		allow = append(allow, ap)
	}
	prof, err := image.ParseProfile(profile)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute+time.Duration(n)*3*time.Minute)
	defer cancel()
	img, err := image.Build(ctx, image.Options{CacheDir: cache, Profile: prof})
	if err != nil {
		return err
	}
	if kernelOverride != "" {
		img.Kernel = kernelOverride
	}
	if diskOverride != "" {
		img.Disk = diskOverride
	}
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	signer, err := ssh.NewSignerFromKey(key)
	if err != nil {
		return err
	}

	stateRoot, err := os.MkdirTemp("", "vmboot-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(stateRoot)

	var ready, sshReady, dockerReady, sshCPUs, dockerCPUs []time.Duration
	for i := range n {
		vm, err := qemuvm.Start(ctx, qemuvm.Options{
			Name:           fmt.Sprintf("bench-%d", i),
			StateDir:       filepath.Join(stateRoot, fmt.Sprint(i)),
			Kernel:         img.Kernel,
			Initrd:         img.Initrd,
			Disk:           img.Disk,
			EgressAllow:    allow,
			KernelArgs:     kernelArgs,
			AuthorizedKeys: []ssh.PublicKey{signer.PublicKey()},
			MemoryMB:       mem,
			Network:        policy,
			GuestForwards:  fwds,
		})
		if err != nil {
			return err
		}
		out, err := runSSH(ctx, vm, signer, "echo ok")
		sshCPU := cpuTime(vm.PID)
		if hold > 0 {
			fmt.Printf("holding %s for %v: ssh %s hostkey %s console %s\n", vm.Name, hold, vm.SSHAddr, vm.HostKeyLine, filepath.Join(vm.StateDir, qemuvm.ConsoleFile))
			time.Sleep(hold)
		}
		total := time.Since(vm.StartedAt)
		if err == nil && strings.TrimSpace(out) != "ok" {
			err = fmt.Errorf("echo ok printed %q", out)
		}
		var docker, dockerCPU time.Duration
		if err == nil && img.Profile.HasDocker() {
			out, err = dockerInfo(ctx, vm, signer)
			docker = time.Since(vm.StartedAt)
			dockerCPU = cpuTime(vm.PID)
			if err != nil {
				err = fmt.Errorf("docker info: %w", err)
			} else if verbose {
				fmt.Printf("docker info: %s\n", out)
			}
		}
		if err == nil && command != "" {
			out, cerr := runSSH(ctx, vm, signer, command)
			fmt.Printf("--- %s: %s (err=%v)\n%s", vm.Name, command, cerr, out)
		}
		if showConsole {
			b, _ := os.ReadFile(filepath.Join(vm.StateDir, qemuvm.ConsoleFile))
			fmt.Printf("--- %s console:\n%s", vm.Name, b)
		}
		stopCtx, stopCancel := context.WithTimeout(context.Background(), 10*time.Second)
		serr := vm.Stop(stopCtx)
		stopCancel()
		if err != nil {
			return fmt.Errorf("vm %s: %w", vm.Name, err)
		}
		if serr != nil {
			return serr
		}
		ready = append(ready, vm.ReadyAfter)
		sshReady = append(sshReady, total)
		sshCPUs = append(sshCPUs, sshCPU)
		line := fmt.Sprintf("run %d: ready marker %.2fs, ssh echo ok %.2fs (qemu CPU %.2fs)", i+1, vm.ReadyAfter.Seconds(), total.Seconds(), sshCPU.Seconds())
		if docker > 0 {
			dockerReady = append(dockerReady, docker)
			dockerCPUs = append(dockerCPUs, dockerCPU)
			line += fmt.Sprintf(", docker info %.2fs (qemu CPU %.2fs)", docker.Seconds(), dockerCPU.Seconds())
		}
		fmt.Printf("%s (profile %s, accel %s, %s)\n", line, img.Profile, vm.Accel, load())
	}
	fmt.Printf("median of %d: ready marker %.2fs, boot-to-SSH-ready %.2fs (qemu CPU %.2fs)", n,
		median(ready).Seconds(), median(sshReady).Seconds(), median(sshCPUs).Seconds())
	if len(dockerReady) > 0 {
		fmt.Printf(", boot-to-docker-info %.2fs (qemu CPU %.2fs)", median(dockerReady).Seconds(), median(dockerCPUs).Seconds())
	}
	fmt.Println()
	return nil
}

// dockerInfo asks the VM's Docker Engine for GET /info, as `docker info`
// does, through the SSH connection (direct-streamlocal to its socket), the
// way the manager drives it; the CLI in the VM would add its own start-up.
func dockerInfo(ctx context.Context, vm *qemuvm.VM, signer ssh.Signer) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	client, err := ssh.Dial("tcp", vm.SSHAddr, vm.SSHConfig(signer, 10*time.Second))
	if err != nil {
		return "", err
	}
	defer client.Close()
	httpc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return client.DialContext(ctx, "unix", image.GuestDockerSocket)
	}}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker/info", nil)
	if err != nil {
		return "", err
	}
	resp, err := httpc.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var info struct{ ServerVersion, Driver, CgroupVersion string }
	if err := json.NewDecoder(resp.Body).Decode(&info); err != nil || resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET /info: %s: %v", resp.Status, err)
	}
	return fmt.Sprintf("%s %s cgroup v%s", info.ServerVersion, info.Driver, info.CgroupVersion), nil
}

// runSSH runs one command over SSH with the VM's host key pinned.
func runSSH(ctx context.Context, vm *qemuvm.VM, signer ssh.Signer, command string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	client, err := ssh.Dial("tcp", vm.SSHAddr, vm.SSHConfig(signer, 10*time.Second))
	if err != nil {
		return "", err
	}
	defer client.Close()
	stop := context.AfterFunc(ctx, func() { client.Close() })
	defer stop()
	sess, err := client.NewSession()
	if err != nil {
		return "", err
	}
	defer sess.Close()
	// CombinedOutput serialises the stdout and stderr copiers; one shared
	// bytes.Buffer for both would race and can lose the output.
	out, err := sess.CombinedOutput(command)
	return string(out), err
}

// cpuTime returns the CPU time (user and system) process pid has used: under
// software emulation, what a boot costs whatever else loads the machine.
func cpuTime(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	_, after, _ := strings.Cut(string(b), ") ")
	f := strings.Fields(after)
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * time.Second / 100 // USER_HZ
}

// load returns the host's load averages, to judge how noisy a figure is.
func load() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "load unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "load unknown"
	}
	return "load " + strings.Join(f[:3], " ")
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
