// Package baseimage builds small container images from Debian's packages,
// without Docker Hub: a Debian root file system made by mmdebstrap from
// the machine's own apt sources, as one layer, with an image config of
// its own. The images are what jobs' image: and services: name in the
// coordinator's registry ($CI_REGISTRY/mayfly/<name>:bookworm); Push puts
// them there with go-containerregistry.
//
// A built layer is cached by a hash of everything that makes it (the
// recipe, the suite, the package list, mmdebstrap's version and the apt
// sources), so a second build of the same image reads the cache.
package baseimage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Recipe is one image: Debian packages on top of minbase, and its config.
type Recipe struct {
	// Name is the repository under the registry's "mayfly/" namespace.
	Name string
	// Packages are installed on top of mmdebstrap's minbase variant.
	Packages []string
	// Cmd, Env and ExposedPorts ("6379/tcp") go into the image config.
	Cmd          []string
	Env          []string
	ExposedPorts []string
}

// recipeVersion changes when the way a layer is made changes.
const recipeVersion = "1"

// Suite is the Debian release the images are made of, and their tag.
const Suite = "bookworm"

// Recipes are the images of testdata/projects: a debian:bookworm-like
// image with what jobs usually need, one with Go, and a Redis service.
var Recipes = []Recipe{
	{Name: "debian", Packages: []string{"bash", "ca-certificates", "curl", "git"}, Cmd: []string{"bash"}},
	{Name: "golang", Packages: []string{"bash", "ca-certificates", "curl", "git", "golang-go"}, Cmd: []string{"bash"}},
	{Name: "redis", Packages: []string{"redis-server"}, Cmd: []string{"redis-server", "--protected-mode", "no"}, ExposedPorts: []string{"6379/tcp"}},
}

// RecipeByName returns the recipe called name.
func RecipeByName(name string) (Recipe, bool) {
	for _, r := range Recipes {
		if r.Name == name {
			return r, true
		}
	}
	return Recipe{}, false
}

// Options configure Build.
type Options struct {
	// CacheDir holds built layers (baseimages/<hash>.tar).
	CacheDir string
	// Mmdebstrap is the program (default "mmdebstrap").
	Mmdebstrap string
	// Logger gets progress.
	Logger *slog.Logger
}

// Built is an image made (or read from the cache) by Build.
type Built struct {
	Recipe Recipe
	Image  v1.Image
	// Hash is the cache key of the layer; Cached says it was read back.
	Hash   string
	Cached bool
	Layer  string // the layer's file
}

// pathExcludes trims what no job needs: documentation, manuals, locales.
var pathExcludes = []string{
	"/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
	"/usr/share/lintian/*", "/usr/share/linda/*",
}

// Build makes the image of r, from the cache when it has the layer.
func Build(ctx context.Context, r Recipe, o Options) (*Built, error) {
	if o.Mmdebstrap == "" {
		o.Mmdebstrap = "mmdebstrap"
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	hash, err := cacheKey(r, o.Mmdebstrap)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(o.CacheDir, "baseimages")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	layerPath := filepath.Join(dir, hash+".tar")
	b := &Built{Recipe: r, Hash: hash, Layer: layerPath}
	if _, err := os.Stat(layerPath); err == nil {
		b.Cached = true
	} else {
		start := time.Now()
		o.Logger.Info("building image layer with mmdebstrap", "image", r.Name, "packages", strings.Join(r.Packages, ","))
		if err := mmdebstrap(ctx, o.Mmdebstrap, r, layerPath); err != nil {
			return nil, fmt.Errorf("image %s: %w", r.Name, err)
		}
		o.Logger.Info("built image layer", "image", r.Name, "took", time.Since(start).Round(time.Second))
	}
	img, err := image(r, layerPath)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", r.Name, err)
	}
	b.Image = img
	return b, nil
}

// cacheKey hashes what makes a layer.
func cacheKey(r Recipe, prog string) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "recipe %s\nsuite %s\n", recipeVersion, Suite)
	pkgs := append([]string(nil), r.Packages...)
	sort.Strings(pkgs)
	fmt.Fprintf(h, "packages %s\nexcludes %s\n", strings.Join(pkgs, ","), strings.Join(pathExcludes, ","))
	out, err := exec.Command(prog, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w (Debian package mmdebstrap)", prog, err)
	}
	h.Write(out)
	// The machine's apt sources decide which package versions come in.
	var sources []string
	if m, _ := filepath.Glob("/etc/apt/sources.list.d/*"); m != nil {
		sources = m
	}
	for _, f := range append([]string{"/etc/apt/sources.list"}, sources...) {
		if data, err := os.ReadFile(f); err == nil {
			fmt.Fprintf(h, "%s\n", f)
			h.Write(data)
		}
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// mmdebstrap makes the root file system as a tar at out (atomically).
func mmdebstrap(ctx context.Context, prog string, r Recipe, out string) error {
	tmp := strings.TrimSuffix(out, ".tar") + ".partial.tar" // mmdebstrap picks the format by the extension
	args := []string{"--variant=minbase", "--quiet", "--include=" + strings.Join(r.Packages, ",")}
	for _, p := range pathExcludes {
		args = append(args, "--dpkgopt=path-exclude="+p)
	}
	// Keep the copyright files, as Debian asks.
	args = append(args, "--dpkgopt=path-include=/usr/share/doc/*/copyright",
		"--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*",
		Suite, tmp)
	cmd := exec.CommandContext(ctx, prog, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("mmdebstrap: %w: %s", err, tail(stderr.String(), 2000))
	}
	return os.Rename(tmp, out)
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// image wraps the layer in an image with the recipe's config.
func image(r Recipe, layerPath string) (v1.Image, error) {
	layer, err := tarball.LayerFromFile(layerPath)
	if err != nil {
		return nil, err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Config.Env = append([]string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, r.Env...)
	cf.Config.Cmd = r.Cmd
	if len(r.ExposedPorts) > 0 {
		cf.Config.ExposedPorts = map[string]struct{}{}
		for _, p := range r.ExposedPorts {
			cf.Config.ExposedPorts[p] = struct{}{}
		}
	}
	cf.Config.Labels = map[string]string{"org.opencontainers.image.description": "mayfly " + r.Name + ": Debian " + Suite + " with " + strings.Join(r.Packages, ", ")}
	return mutate.ConfigFile(img, cf)
}

// basicAuth adds HTTP basic credentials to every request.
type basicAuth struct {
	user, password string
	next           http.RoundTripper
}

func (b basicAuth) RoundTrip(req *http.Request) (*http.Response, error) {
	req = req.Clone(req.Context())
	req.SetBasicAuth(b.user, b.password)
	return b.next.RoundTrip(req)
}

// Push pushes img as <registry>/mayfly/<name>:<Suite> with the push token
// (any user name, as the coordinator's registry takes it). insecure uses
// plain HTTP. It returns the reference.
func Push(ctx context.Context, registry, token string, insecure bool, r Recipe, img v1.Image) (string, error) {
	if registry == "" {
		return "", errors.New("no registry")
	}
	ref := registry + "/mayfly/" + r.Name + ":" + Suite
	var opts []name.Option
	if insecure {
		opts = append(opts, name.Insecure)
	}
	tag, err := name.NewTag(ref, opts...)
	if err != nil {
		return "", err
	}
	// The credentials go with every request: the coordinator checks them
	// directly, and its token realm is its external URL, which only its
	// VMs may reach (http://10.0.2.2:PORT for the local fleet).
	var rt http.RoundTripper = remote.DefaultTransport
	if token != "" {
		rt = basicAuth{user: "mayfly", password: token, next: rt}
	}
	if err := remote.Write(tag, img, remote.WithAuth(authn.Anonymous), remote.WithTransport(rt), remote.WithContext(ctx)); err != nil {
		return "", fmt.Errorf("push %s: %w", ref, err)
	}
	return ref, nil
}
