package qemu_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
)

// BenchmarkBootToSSH measures boot-to-SSH-ready through the plugin binary
// and the plugin host, one VM at a time: from Create(1) until the instance
// is listed running and `echo ok` over SSH (ConnectInfo's key, pinned host
// key) succeeds. Delete is not timed. It reports the median as s/boot.
//
//	go test ./plugins/qemu -run '^$' -bench BootToSSH -benchtime 5x
func BenchmarkBootToSSH(b *testing.B) {
	img := baseImage(b)
	p := startPlugin(b)
	ctx := context.Background()
	if _, err := p.Init(ctx, settingsJSON(b, map[string]any{
		"state_dir": stateDir(b), "kernel": img.Kernel, "initrd": img.Initrd, "boot_timeout": bootTimeout.String(),
	})); err != nil {
		b.Fatal(err)
	}
	var took []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		ids, err := p.Create(ctx, 1, map[string]string{providers.LabelManager: "bench"})
		if err != nil {
			b.Fatal(err)
		}
		waitListEvery(b, p, 50*time.Millisecond, ids[0])
		ci, err := p.ConnectInfo(ctx, ids[0])
		if err != nil {
			b.Fatal(err)
		}
		if out, err := sshRun(b, ci, "echo ok"); err != nil || out != "ok\n" {
			b.Fatalf("echo ok = %q, %v", out, err)
		}
		d := time.Since(start)
		took = append(took, d)
		b.StopTimer()
		if _, err := p.Delete(ctx, ids); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		b.Logf("boot %d: %v", i+1, d.Round(time.Millisecond))
	}
	slices.Sort(took)
	b.ReportMetric(took[len(took)/2].Seconds(), "s-median/boot")
	b.Logf("boot-to-SSH through the plugin, %d runs: %v; median %v", len(took), took, took[len(took)/2].Round(time.Millisecond))
}

// waitListEvery polls List every interval until id is running.
func waitListEvery(b *testing.B, p providers.Provider, interval time.Duration, id string) {
	deadline := time.Now().Add(bootTimeout + 15*time.Second)
	for {
		list, err := p.List(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		for _, in := range list {
			if in.ID != id {
				continue
			}
			switch in.State {
			case providers.StateRunning:
				return
			case providers.StateFailed:
				b.Fatalf("%s failed: %s", id, in.Reason)
			}
		}
		if time.Now().After(deadline) {
			b.Fatal(fmt.Errorf("%s not running after %v", id, bootTimeout))
		}
		time.Sleep(interval)
	}
}
