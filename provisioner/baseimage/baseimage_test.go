package baseimage

import (
	"context"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	ggcrregistry "github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// fakeMmdebstrap stands in for mmdebstrap: it answers --version and writes
// a one-file root file system tar (with tar(1)) to its last argument,
// counting its builds. The real mmdebstrap is run by
// `mayfly image push-debian` (minutes per image).
func fakeMmdebstrap(t *testing.T) (prog, count string) {
	dir := t.TempDir()
	count = filepath.Join(dir, "count")
	prog = filepath.Join(dir, "mmdebstrap")
	script := `#!/bin/sh
if [ "$1" = --version ]; then echo "mmdebstrap 0-test"; exit 0; fi
for a; do out=$a; done
case "$out" in *.tar) ;; *) echo "not a tar: $out" >&2; exit 1;; esac
echo built >> ` + count + `
root=$(mktemp -d) && mkdir -p "$root/etc" && echo 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"' > "$root/etc/os-release" && tar -C "$root" -cf "$out" . && rm -rf "$root"
`
	if err := os.WriteFile(prog, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return prog, count
}

func TestBuildCachesAndPushes(t *testing.T) {
	prog, count := fakeMmdebstrap(t)
	cache := t.TempDir()
	r, _ := RecipeByName("redis")
	ctx := context.Background()
	b, err := Build(ctx, r, Options{CacheDir: cache, Mmdebstrap: prog})
	if err != nil {
		t.Fatal(err)
	}
	again, err := Build(ctx, r, Options{CacheDir: cache, Mmdebstrap: prog})
	if err != nil {
		t.Fatal(err)
	}
	if b.Cached || !again.Cached || b.Hash != again.Hash {
		t.Errorf("first cached %t, second cached %t, hashes %s %s", b.Cached, again.Cached, b.Hash, again.Hash)
	}
	if data, _ := os.ReadFile(count); strings.Count(string(data), "built") != 1 {
		t.Errorf("mmdebstrap ran %d times, want once", strings.Count(string(data), "built"))
	}
	deb, _ := RecipeByName("debian")
	if other, err := Build(ctx, deb, Options{CacheDir: cache, Mmdebstrap: prog}); err != nil || other.Hash == b.Hash {
		t.Errorf("another recipe: %v, hash %s (redis %s)", err, other.Hash, b.Hash)
	}

	reg := httptest.NewServer(ggcrregistry.New(ggcrregistry.Logger(log.New(io.Discard, "", 0))))
	defer reg.Close()
	host := strings.TrimPrefix(reg.URL, "http://")
	ref, err := Push(ctx, host, "token", true, r, b.Image)
	if err != nil {
		t.Fatal(err)
	}
	if ref != host+"/mayfly/redis:bookworm" {
		t.Errorf("pushed as %s", ref)
	}
	tag, _ := name.NewTag(ref, name.Insecure)
	img, err := remote.Image(tag)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cf.Config.Cmd, []string{"redis-server", "--protected-mode", "no"}) || len(cf.Config.ExposedPorts) != 1 || cf.OS != "linux" {
		t.Errorf("config %+v", cf.Config)
	}
	if _, ok := cf.Config.ExposedPorts["6379/tcp"]; !ok {
		t.Errorf("exposed ports %v, want 6379/tcp (services are waited for on it)", cf.Config.ExposedPorts)
	}
	layers, _ := img.Layers()
	if len(layers) != 1 {
		t.Errorf("%d layers, want 1", len(layers))
	}
}
