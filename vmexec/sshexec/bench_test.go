package sshexec_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/vmexec"
	"github.com/mayfly-ci/mayfly/vmexec/sshexec"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

// reportQuantiles adds the median and 90th percentile of the samples.
func reportQuantiles(b *testing.B, d []time.Duration) {
	if len(d) == 0 {
		return
	}
	slices.Sort(d)
	b.ReportMetric(float64(d[len(d)/2].Nanoseconds()), "median-ns/op")
	b.ReportMetric(float64(d[len(d)*9/10].Nanoseconds()), "p90-ns/op")
}

// BenchmarkRun measures the per-command overhead on a warm connection: a new
// session, the setsid wrapper, the marker, "true", and the exit status.
func BenchmarkRun(b *testing.B) {
	for _, k := range kinds {
		b.Run(string(k), func(b *testing.B) {
			srv := sshtest.Run(b, k)
			c, err := sshexec.Dial(context.Background(), srv.Target())
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			ctx := context.Background()
			var samples []time.Duration
			for b.Loop() {
				start := time.Now()
				code, err := c.Run(ctx, vmexec.Command{Script: "true"})
				samples = append(samples, time.Since(start))
				if err != nil || code != 0 {
					b.Fatalf("Run: %d %v", code, err)
				}
			}
			reportQuantiles(b, samples)
		})
	}
}

// BenchmarkDial measures connection setup: TCP, key exchange, host key check,
// public key authentication.
func BenchmarkDial(b *testing.B) {
	for _, k := range kinds {
		b.Run(string(k), func(b *testing.B) {
			srv := sshtest.Run(b, k)
			tg := srv.Target()
			var samples []time.Duration
			for b.Loop() {
				start := time.Now()
				c, err := sshexec.Dial(context.Background(), tg)
				samples = append(samples, time.Since(start))
				if err != nil {
					b.Fatal(err)
				}
				c.Close()
			}
			reportQuantiles(b, samples)
		})
	}
}
