package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/coordinator"
	"github.com/mayfly-ci/mayfly/manager/gitlab"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// TestCoordinatorCommand runs `mayfly coordinator` with the demo pipeline and
// a preregistered runner token, drives every job through the real API client,
// and checks that --exit-when-done ends the command by itself.
func TestCoordinatorCommand(t *testing.T) {
	outR, outW := io.Pipe()
	done := make(chan int, 1)
	go func() {
		code := run([]string{"coordinator", "--listen", "127.0.0.1:0",
			"--pipeline", "../../manager/coordinator/testdata/demo-pipeline.yaml",
			"--runner-token", "cli-test-token", "--exit-when-done", "--progress"}, outW, io.Discard)
		outW.Close()
		done <- code
	}()
	// Every output line goes to lines (never blocking the command) and to all.
	lines := make(chan string, 1024)
	var all strings.Builder
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		defer close(lines)
		sc := bufio.NewScanner(outR)
		for sc.Scan() {
			all.WriteString(sc.Text() + "\n")
			select {
			case lines <- sc.Text():
			default:
			}
		}
	}()
	var addr string
	deadline := time.After(10 * time.Second)
	for addr == "" {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("coordinator exited early with %d", <-done)
			}
			if rest, found := strings.CutPrefix(l, "coordinator on http://"); found {
				addr, _, _ = strings.Cut(rest, " ")
			}
		case <-deadline:
			t.Fatal("coordinator did not print its address")
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := gitlab.New(gitlab.Config{URL: "http://" + addr, Info: runnerapi.VersionInfo{Name: "mayfly-test"}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ran := 0
	for attempt := 0; attempt < 100 && ran < 5; attempt++ {
		res, err := c.RequestJob(ctx, "cli-test-token", gitlab.RequestOptions{})
		if err != nil {
			t.Fatalf("RequestJob: %v", err)
		}
		if res.Outcome != gitlab.JobReceived {
			time.Sleep(20 * time.Millisecond)
			continue
		}
		tr, err := c.StartJobTrace(ctx, res.Job.ID, res.Job.Token, gitlab.TraceOptions{Interval: 10 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(tr, "job %s ran\n", res.Job.JobInfo.Name)
		if err := tr.Finish(ctx, runnerapi.StateSuccess, "", 0); err != nil {
			t.Fatalf("Finish job %d: %v", res.Job.ID, err)
		}
		ran++
	}
	if ran != 5 {
		t.Fatalf("ran %d jobs, want the demo pipeline's 5", ran)
	}
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("coordinator exited with %d", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("coordinator did not exit after every job finished")
	}
	<-scanned
	out := all.String()
	for _, want := range []string{"queue: 0 pending, 0 running", "demo/web/build: success", "demo/api/slow: success", "JOB  PROJECT/NAME", "every job has finished"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

// The pipeline make run enqueues must stay valid.
func TestDemoPipelineParses(t *testing.T) {
	f, err := coordinator.LoadPipelineFile("../../testdata/pipelines/demo.yaml")
	if err != nil {
		t.Fatal(err)
	}
	jobs := 0
	for _, p := range f.Projects {
		for _, pl := range p.Pipelines {
			jobs += len(pl.Jobs)
		}
	}
	if len(f.Projects) < 2 || jobs < 6 {
		t.Errorf("demo pipeline has %d projects and %d jobs, want at least 2 and 6", len(f.Projects), jobs)
	}
}
