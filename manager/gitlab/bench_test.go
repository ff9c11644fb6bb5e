package gitlab

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// BenchmarkTraceUpload measures trace upload throughput through an httptest
// server: per iteration one job writes 4 MiB in 4 KiB writes while the
// uploader PATCHes every 2 ms, then Finish sends the rest and the final PUT.
// Figures: MB/s (bytes/s of trace) and allocs per job.
func BenchmarkTraceUpload(b *testing.B) {
	var received atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		if r.Method == http.MethodPatch {
			start, _, _ := strings.Cut(r.Header.Get("Content-Range"), "-")
			s, _ := strconv.ParseInt(start, 10, 64)
			received.Store(s + n)
			w.Header().Set("Range", "0-"+strconv.FormatInt(s+n, 10))
			w.WriteHeader(http.StatusAccepted)
			return
		}
		w.WriteHeader(http.StatusOK)
	}))
	defer srv.Close()
	c, err := New(Config{URL: srv.URL, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	defer c.CloseIdleConnections()
	const total, write = DefaultOutputLimit, 4 << 10
	line := []byte(strings.Repeat("x", write-1) + "\n")
	b.SetBytes(total)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		tr, err := c.StartJobTrace(context.Background(), int64(i+1), "jt", TraceOptions{Interval: 2 * time.Millisecond})
		if err != nil {
			b.Fatal(err)
		}
		for range total / write {
			if _, err := tr.Write(line); err != nil {
				b.Fatal(err)
			}
		}
		if err := tr.Finish(context.Background(), runnerapi.StateSuccess, "", 0); err != nil {
			b.Fatal(err)
		}
		if received.Load() != total {
			b.Fatalf("server received %d bytes, want %d", received.Load(), total)
		}
	}
}
