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
	if code, ok := verb(args, "build", "mayfly image build [flags]", "Builds the microVM image (kernel + initramfs) from Debian packages.", stdout, stderr); !ok {
		return code
	}
	fs := flag.NewFlagSet("image build", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cacheDir := fs.String("cache-dir", image.DefaultCacheDir, "where the kernel .deb is found (debs/) and images are cached (images/<hash>/)")
	kernelDeb := fs.String("kernel-deb", "", "the linux-image-*-amd64 .deb to use (default: the newest in CACHE-DIR/debs; scripts/setup-vm.sh downloads it)")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	timeout := fs.Duration("timeout", 10*time.Minute, "give up after this long")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: mayfly image build [flags]\n\nBuilds the microVM image from Debian packages only: a Debian kernel unpacked\nwith dpkg -x (never installed), and an initramfs with busybox, dropbear and\nthe virtio modules. Holds no keys: each VM gets its own at boot. Cached by a\nhash of its inputs, so a second build does nothing.\n\nFlags:\n")
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
	img, err := image.Build(ctx, image.Options{CacheDir: *cacheDir, KernelDeb: *kernelDeb, Logger: slog.New(slog.NewTextHandler(stderr, nil))})
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
	fmt.Fprintf(stdout, "image %s (%s in %s)\n  kernel  %s (%s)\n  initrd  %s\n", img.Hash, how, time.Since(start).Round(time.Millisecond), img.Kernel, img.KernelVersion, img.Initrd)
	return 0
}
