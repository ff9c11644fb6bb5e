package registry

import (
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// BenchmarkPushPull pushes a 64 MB image (4 layers) with the admin
// credential and pulls every layer back with a job token over 127.0.0.1;
// bytes/s is the pull throughput.
func BenchmarkPushPull(b *testing.B) {
	img, err := random.Image(16<<20, 4)
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		b.StopTimer()
		dir := b.TempDir()
		reg, host := serveB(b, dir)
		r := refB(b, host, "mayfly/bench:1")
		if err := remote.Write(r, img, admin); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		got, err := remote.Image(r, job)
		if err != nil {
			b.Fatal(err)
		}
		if err := checkLayers(got); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		reg.Close()
		b.StartTimer()
	}
	b.SetBytes(64 << 20)
}
