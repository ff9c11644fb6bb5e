package host_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers/host"
)

// BenchmarkStart measures starting the fake plugin process through the
// handshake.
func BenchmarkStart(b *testing.B) {
	for b.Loop() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		p, err := host.Start(ctx, host.Config{Name: "fake", Path: pluginBinary, Logger: slog.New(slog.DiscardHandler)})
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		_ = p.Close()
	}
}

// BenchmarkListRoundTrip measures one List call through the host with 100
// instances.
func BenchmarkListRoundTrip(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	p, err := host.Start(ctx, host.Config{Name: "fake", Path: pluginBinary, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	if _, err := p.Init(ctx, nil); err != nil {
		b.Fatal(err)
	}
	if _, err := p.Create(ctx, 100, map[string]string{"mayfly-manager": "bench"}); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := p.List(ctx); err != nil {
			b.Fatal(err)
		}
	}
}
