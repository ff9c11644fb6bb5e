package dockertest

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"

	"github.com/docker/docker/client"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// BusyboxOSRelease is the /etc/os-release of BusyboxImage, by which a test
// tells the image's files from the machine's.
const BusyboxOSRelease = "PRETTY_NAME=\"mayfly test busybox\"\nID=mayfly-busybox\n"

var (
	busyboxOnce sync.Once
	busyboxImg  v1.Image
	busyboxErr  error
)

// BusyboxImage is a small image built from the machine's static busybox
// (Debian's busybox-static): /bin/busybox and a link per applet, an
// /etc/os-release of its own and /tmp. Built once per process.
func BusyboxImage() (v1.Image, error) {
	busyboxOnce.Do(func() { busyboxImg, busyboxErr = buildBusybox() })
	return busyboxImg, busyboxErr
}

func buildBusybox() (v1.Image, error) {
	bb, err := os.ReadFile("/usr/bin/busybox")
	if err != nil {
		return nil, fmt.Errorf("busybox image: %w (Debian package busybox-static)", err)
	}
	list, err := exec.Command("/usr/bin/busybox", "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("busybox --list: %w", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dir := func(name string, mode int64) {
		_ = tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode})
	}
	file := func(name string, mode int64, data []byte) {
		_ = tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data))})
		_, _ = tw.Write(data)
	}
	dir("bin/", 0o755)
	dir("etc/", 0o755)
	dir("tmp/", 0o1777)
	file("bin/busybox", 0o755, bb)
	for _, applet := range strings.Fields(string(list)) {
		if applet == "busybox" {
			continue
		}
		_ = tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/" + applet, Linkname: "busybox", Mode: 0o777})
	}
	file("etc/os-release", 0o644, []byte(BusyboxOSRelease))
	file("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n"))
	file("etc/group", 0o644, []byte("root:x:0:\n"))
	if err := tw.Close(); err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(buf.Bytes())), nil
	})
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
	cf.Config.Env = []string{"PATH=/bin"}
	cf.Config.Cmd = []string{"sh"}
	return mutate.ConfigFile(img, cf)
}

// Load loads img into the daemon as ref (for example "busybox:test"),
// as `docker load` does.
func Load(ctx context.Context, c *client.Client, img v1.Image, ref string) error {
	tag, err := name.NewTag(ref)
	if err != nil {
		return err
	}
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(tarball.Write(tag, img, pw)) }() // ends when the write or the load ends
	resp, err := c.ImageLoad(ctx, pr)
	if err != nil {
		pr.CloseWithError(err)
		return fmt.Errorf("load %s: %w", ref, err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	pr.Close()
	if bytes.Contains(out, []byte(`"error"`)) {
		return fmt.Errorf("load %s: %s", ref, out)
	}
	return nil
}
