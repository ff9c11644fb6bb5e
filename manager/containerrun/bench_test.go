package containerrun_test

import (
	"context"
	"io"
	"sort"
	"testing"
	"time"

	"github.com/docker/docker/api/types/image"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/containerrun"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
	"github.com/mayfly-ci/mayfly/manager/stagerun"
)

// BenchmarkImageJobStart measures what an image: job adds before its
// script starts, on a machine with nothing pulled yet: prepare_script
// (pull from the registry with the job token, the job's network, one
// service started and waited for, the prepare container), get_sources in
// the shell, and the start of the step_script container until the script's
// first output. It reports the median as s/start (and the prepare part as
// s/prepare). Run: go test -run NONE -bench ImageJobStart -benchtime 5x ./manager/containerrun
func BenchmarkImageJobStart(b *testing.B) {
	e := newEnv(b)
	e.push(b, busybox(b), "mayfly/busybox:test")
	e.push(b, serviceImage(b, 6379, "nc", "-ll", "-p", "6379", "-e", "echo", "PONG"), "mayfly/pong:test")
	var starts, prepares []float64
	for i := 0; i < b.N; i++ {
		// Each round is a fresh "VM": the images are removed first.
		e.removeImages(b)
		job := payload(e, "$CI_REGISTRY/mayfly/busybox:test", []string{"echo started"}, nil,
			runnerapi.Image{Name: "$CI_REGISTRY/mayfly/pong:test", Alias: "db"})
		plan, err := buildscript.Generate(job, buildscript.Options{Shell: "bash", BuildsDir: e.builds})
		if err != nil {
			b.Fatal(err)
		}
		r := e.newRunner(b, containerrun.Options{Job: job, Docker: dockerConfig()})
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		start := time.Now()
		var prepared time.Duration
		for j, st := range plan.Stages {
			w := io.Discard
			var ww *waitWriter
			if st.Name == buildscript.StageStepScript {
				ww = &waitWriter{want: "started\n", seen: make(chan struct{})}
				w = ww
			}
			code, err := r.Run(ctx, stagerun.Stage{ID: stagerun.StageID(j, string(st.Name), 1), Script: st.Script}, w)
			if err != nil || code != 0 {
				b.Fatalf("%s: %d %v", st.Name, code, err)
			}
			if st.Name == buildscript.StagePrepare {
				prepared = time.Since(start)
			}
			if ww != nil {
				<-ww.seen
				break
			}
		}
		starts = append(starts, time.Since(start).Seconds())
		prepares = append(prepares, prepared.Seconds())
		cancel()
		_ = r.Close(context.Background(), true)
	}
	b.ReportMetric(median(starts), "s/start")
	b.ReportMetric(median(prepares), "s/prepare")
}

// removeImages removes the test images from the engine, as on a new VM.
func (e *env) removeImages(b *testing.B) {
	for _, ref := range []string{e.registry + "/mayfly/busybox:test", e.registry + "/mayfly/pong:test"} {
		_, _ = e.docker.ImageRemove(context.Background(), ref, image.RemoveOptions{Force: true, PruneChildren: true})
	}
}

func median(v []float64) float64 {
	sort.Float64s(v)
	if len(v) == 0 {
		return 0
	}
	return v[len(v)/2]
}
