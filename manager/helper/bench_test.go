package helper

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// benchTree writes size bytes of source-like text (lines of code with
// random names and numbers: it compresses to about a third) as files of
// fileSize each under dir, a megabyte at a time, so that this process stays
// small: a child's peak RSS includes its parent's from before the exec.
func benchTree(b *testing.B, dir string, size, fileSize int) {
	b.Helper()
	r := rand.New(rand.NewPCG(1, 2))
	words := []string{"func", "return", "if", "err", "nil", "for", "range", "value", "config", "manager", "fleet", "job", "trace", "cache"}
	chunk := func(n int) []byte {
		var buf bytes.Buffer
		for buf.Len() < n {
			fmt.Fprintf(&buf, "\t%s %s%d := %s(%d, %q) // %s %x\n", words[r.IntN(len(words))], words[r.IntN(len(words))], r.IntN(1000),
				words[r.IntN(len(words))], r.IntN(1<<20), words[r.IntN(len(words))], words[r.IntN(len(words))], r.Uint64())
		}
		return buf.Bytes()[:n]
	}
	for i := 0; i*fileSize < size; i++ {
		p := filepath.Join(dir, fmt.Sprintf("d%03d", i/500), fmt.Sprintf("f%05d.txt", i))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			b.Fatal(err)
		}
		f, err := os.Create(p)
		if err != nil {
			b.Fatal(err)
		}
		for left := fileSize; left > 0; left -= 1 << 20 {
			if _, err := f.Write(chunk(min(left, 1<<20))); err != nil {
				b.Fatal(err)
			}
		}
		if err := f.Close(); err != nil {
			b.Fatal(err)
		}
	}
}

// scratch is a directory in memory when the machine has /dev/shm, so the
// figures measure the helper, not the disk.
func scratch(b *testing.B) string {
	parent := ""
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		parent = "/dev/shm"
	}
	d, err := os.MkdirTemp(parent, "mayfly-bench-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// BenchmarkArtifactsUpload archives and uploads 200 MB with the real
// helper binary (a separate process, so its peak RSS is its own) to a
// loopback server that reads and drops the body: many small files
// (20 kB each) and one large file. It reports MB/s and the helper's peak
// RSS, which stays flat whatever the size: the archive is streamed.
//
//	go test -run '^$' -bench ArtifactsUpload -benchtime 1x ./manager/helper/
func BenchmarkArtifactsUpload(b *testing.B) {
	bin := filepath.Join(b.TempDir(), "mayfly-helper")
	build := exec.Command("go", "build", "-o", bin, "github.com/mayfly-ci/mayfly/cmd/mayfly-helper")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("build helper: %v\n%s", err, out)
	}
	var received int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		received = n
		w.WriteHeader(http.StatusCreated)
	}))
	defer srv.Close()
	const size = 200 << 20
	for _, tc := range []struct {
		name     string
		fileSize int
	}{{"small-files-20kB", 20 << 10}, {"one-file-200MB", size}} {
		b.Run(tc.name, func(b *testing.B) {
			dir := scratch(b)
			benchTree(b, dir, size, tc.fileSize)
			b.SetBytes(size)
			b.ResetTimer()
			var maxRSS int64
			var elapsed time.Duration
			for range b.N {
				cmd := exec.Command(bin, "artifacts-uploader", "--url", srv.URL, "--id", "1", "--token", "t", "--path", ".")
				cmd.Dir = dir
				start := time.Now()
				if out, err := cmd.CombinedOutput(); err != nil {
					b.Fatalf("helper: %v\n%s", err, out)
				}
				elapsed += time.Since(start)
				if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
					maxRSS = max(maxRSS, ru.Maxrss) // KiB on Linux
				}
			}
			b.ReportMetric(float64(size)*float64(b.N)/1e6/elapsed.Seconds(), "MB/s")
			b.ReportMetric(float64(maxRSS)/1024, "peak-RSS-MiB")
			b.ReportMetric(float64(received)/1e6, "sent-MB")
		})
	}
}
