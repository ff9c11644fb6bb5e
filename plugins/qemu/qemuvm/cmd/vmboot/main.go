// Command vmboot boots mayfly microVMs one after another and measures
// boot-to-SSH-ready: from qemu's start to the first successful `echo ok`
// over SSH with the host key pinned. It prints each run and the median.
//
//	go run ./plugins/qemu/qemuvm/cmd/vmboot -n 5
//
// With -exec it runs a command in each VM and prints its output instead.
package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/plugins/qemu/qemuvm"
	"github.com/mayfly-ci/mayfly/provisioner/image"
)

var (
	hold     time.Duration
	guestfwd string
)

func main() {
	n := flag.Int("n", 5, "number of sequential boots")
	cache := flag.String("cache", image.DefaultCacheDir, "image cache directory")
	network := flag.String("network", "isolated", "guest network policy: isolated or open")
	command := flag.String("exec", "", "command to run in each VM after the measurement")
	mem := flag.Int("m", qemuvm.DefaultMemoryMB, "memory in MB")
	verbose := flag.Bool("v", false, "log VM lifecycle")
	flag.StringVar(&guestfwd, "guestfwd", "", "GUESTADDR=COMMAND: let the guest connect to GUESTADDR, served by COMMAND on the host")
	flag.DurationVar(&hold, "hold", 0, "keep each VM running this long after the measurement (debugging)")
	flag.Parse()
	level := slog.LevelWarn
	if *verbose {
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
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(n)*3*time.Minute)
	defer cancel()
	img, err := image.Build(ctx, image.Options{CacheDir: cache})
	if err != nil {
		return err
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

	var ready, sshReady []time.Duration
	for i := range n {
		vm, err := qemuvm.Start(ctx, qemuvm.Options{
			Name:           fmt.Sprintf("bench-%d", i),
			StateDir:       filepath.Join(stateRoot, fmt.Sprint(i)),
			Kernel:         img.Kernel,
			Initrd:         img.Initrd,
			AuthorizedKeys: []ssh.PublicKey{signer.PublicKey()},
			MemoryMB:       mem,
			Network:        policy,
			GuestForwards:  fwds,
		})
		if err != nil {
			return err
		}
		out, err := runSSH(ctx, vm, signer, "echo ok")
		if hold > 0 {
			fmt.Printf("holding %s for %v: ssh %s hostkey %s console %s\n", vm.Name, hold, vm.SSHAddr, vm.HostKeyLine, filepath.Join(vm.StateDir, qemuvm.ConsoleFile))
			time.Sleep(hold)
		}
		total := time.Since(vm.StartedAt)
		if err == nil && strings.TrimSpace(out) != "ok" {
			err = fmt.Errorf("echo ok printed %q", out)
		}
		if err == nil && command != "" {
			out, cerr := runSSH(ctx, vm, signer, command)
			fmt.Printf("--- %s: %s (err=%v)\n%s", vm.Name, command, cerr, out)
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
		fmt.Printf("run %d: ready marker %.2fs, ssh echo ok %.2fs (accel %s)\n", i+1, vm.ReadyAfter.Seconds(), total.Seconds(), vm.Accel)
	}
	fmt.Printf("median of %d: ready marker %.2fs, boot-to-SSH-ready %.2fs\n", n, median(ready).Seconds(), median(sshReady).Seconds())
	return nil
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

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
