package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/mayfly-ci/mayfly/provisioner/image"
)

func runImage(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "push-debian" {
		return runImagePushDebian(args[1:], stdout, stderr)
	}
	if code, ok := verb(args, "build", "mayfly image build [flags]", "Builds a microVM image (busybox, debian or debian-docker) from Debian packages.", stdout, stderr); !ok {
		return code
	}
	fs := flag.NewFlagSet("image build", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cacheDir := fs.String("cache-dir", image.DefaultCacheDir, "where the kernel .deb is found (debs/) and images are cached (images/<hash>/)")
	kernelDeb := fs.String("kernel-deb", "", "the linux-image-*-amd64 .deb to use (default: the newest in CACHE-DIR/debs; scripts/setup-vm.sh downloads it)")
	profile := fs.String("profile", string(image.ProfileBusybox), "what the image holds: busybox, debian or debian-docker (the qemu plugin's \"image\" setting)")
	diskSize := fs.Int64("disk-gb", image.DefaultDiskSize>>30, "size of the debian profiles' disk in GiB (a sparse file)")
	workDir := fs.String("work-dir", "", "where the debian rootfs is assembled (default $TMPDIR; a tmpfs is faster)")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	timeout := fs.Duration("timeout", 30*time.Minute, "give up after this long")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: mayfly image build [flags]

Builds a microVM image from Debian packages only. Profiles:
  busybox        (default) a Debian kernel unpacked with dpkg -x (never
                 installed) and an initramfs with busybox, dropbear and the
                 virtio modules; boots fastest.
  debian         a Debian rootfs made by mmdebstrap from this machine's apt
                 sources (bash, git, curl, ca-certificates, OpenSSH's sshd) on
                 an ext4 disk image, with a tiny init and no systemd. Needs root.
  debian-docker  debian plus Docker Engine (docker.io, containerd, runc),
                 started at boot. Needs root.
Images hold no keys: each VM gets its own at boot. Cached by a hash of their
inputs, so a second build does nothing.

Flags:
`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	start := time.Now()
	p, err := image.ParseProfile(*profile)
	if err != nil {
		fmt.Fprintf(stderr, "mayfly image build: -profile: %v\n", err)
		return 2
	}
	img, err := image.Build(ctx, image.Options{CacheDir: *cacheDir, KernelDeb: *kernelDeb, Profile: p,
		DiskSize: *diskSize << 30, WorkDir: *workDir, Logger: slog.New(slog.NewTextHandler(stderr, nil))})
	if err != nil {
		fmt.Fprintf(stderr, "mayfly image build: %v\n", err)
		return 1
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(img)
		return 0
	}
	how := "built"
	if img.Cached {
		how = "cached"
	}
	fmt.Fprintf(stdout, "image %s, profile %s (%s in %s)\n  kernel  %s (%s)\n  initrd  %s\n", img.Hash, img.Profile, how, time.Since(start).Round(time.Millisecond), img.Kernel, img.KernelVersion, img.Initrd)
	if img.Disk != "" {
		fmt.Fprintf(stdout, "  disk    %s (%d GiB, %d MiB allocated, %d Debian packages of %s)\n", img.Disk, img.DiskSize>>30, img.DiskAllocated>>20, len(img.Packages), img.Suite)
	}
	return 0
}
