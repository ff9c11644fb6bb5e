package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/mayfly-ci/mayfly/provisioner/baseimage"
	"github.com/mayfly-ci/mayfly/provisioner/image"
)

// runImagePushDebian is `mayfly image push-debian`.
func runImagePushDebian(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("image push-debian", flag.ContinueOnError)
	fs.SetOutput(stderr)
	registry := fs.String("registry", "127.0.0.1:8929", "the registry's host:port (the coordinator's; CI_REGISTRY)")
	token := fs.String("push-token", "", "the coordinator's push token (mayfly coordinator --push-token; printed at its start)")
	insecure := fs.Bool("insecure", true, "plain HTTP, as the coordinator serves it")
	names := fs.String("images", "debian,golang,redis", "which images to build and push")
	cacheDir := fs.String("cache-dir", image.DefaultCacheDir, "where built layers are cached (baseimages/<hash>.tar)")
	timeout := fs.Duration("timeout", 30*time.Minute, "give up after this long")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: mayfly image push-debian --registry HOST:PORT --push-token TOKEN [flags]

Builds small container images from Debian %s packages with mmdebstrap (from
this machine's apt sources; no Docker Hub) and pushes them to a registry as
HOST:PORT/mayfly/<name>:%s, the images the sample projects in
testdata/projects name as $CI_REGISTRY/mayfly/<name>:%s:
`, baseimage.Suite, baseimage.Suite, baseimage.Suite)
		for _, r := range baseimage.Recipes {
			fmt.Fprintf(fs.Output(), "  %-8s %s\n", r.Name, strings.Join(r.Packages, " "))
		}
		fmt.Fprint(fs.Output(), "Each layer is cached by a hash of its inputs; a second run only pushes.\nNeeds root (mmdebstrap).\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	var recipes []baseimage.Recipe
	for _, n := range strings.Split(*names, ",") {
		r, ok := baseimage.RecipeByName(strings.TrimSpace(n))
		if !ok {
			fmt.Fprintf(stderr, "mayfly image push-debian: -images: no image %q\n", n)
			return 2
		}
		recipes = append(recipes, r)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	log := slog.New(slog.NewTextHandler(stderr, nil))
	for _, r := range recipes {
		start := time.Now()
		b, err := baseimage.Build(ctx, r, baseimage.Options{CacheDir: *cacheDir, Logger: log})
		if err != nil {
			fmt.Fprintf(stderr, "mayfly image push-debian: %v\n", err)
			return 1
		}
		built := time.Since(start)
		ref, err := baseimage.Push(ctx, *registry, *token, *insecure, r, b.Image)
		if err != nil {
			fmt.Fprintf(stderr, "mayfly image push-debian: %v\n", err)
			return 1
		}
		how := "built"
		if b.Cached {
			how = "cached"
		}
		digest, _ := b.Image.Digest()
		fmt.Fprintf(stdout, "%s %s (layer %s %s in %s, pushed in %s)\n", ref, digest, b.Hash, how, built.Round(time.Millisecond), (time.Since(start) - built).Round(time.Millisecond))
	}
	return 0
}
