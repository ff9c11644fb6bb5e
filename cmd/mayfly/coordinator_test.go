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

// runningCoordinator is `mayfly coordinator` running in the test.
type runningCoordinator struct {
	addr    string
	lines   chan string      // output lines (dropped when nobody reads)
	done    chan int         // exit code
	scanned chan struct{}    // closed when the output ended
	all     *strings.Builder // every output line, once scanned is closed
}

// runCoordinatorCmd runs `mayfly coordinator --listen 127.0.0.1:0 args…` and
// waits for its address.
func runCoordinatorCmd(t *testing.T, args ...string) *runningCoordinator {
	t.Helper()
	outR, outW := io.Pipe()
	c := &runningCoordinator{lines: make(chan string, 1024), done: make(chan int, 1), scanned: make(chan struct{}), all: &strings.Builder{}}
	go func() {
		code := run(append([]string{"coordinator", "--listen", "127.0.0.1:0"}, args...), outW, io.Discard)
		outW.Close()
		c.done <- code
	}()
	go func() {
		defer close(c.scanned)
		defer close(c.lines)
		sc := bufio.NewScanner(outR)
		for sc.Scan() {
			c.all.WriteString(sc.Text() + "\n")
			select {
			case c.lines <- sc.Text():
			default:
			}
		}
	}()
	deadline := time.After(30 * time.Second)
	for c.addr == "" {
		select {
		case l, ok := <-c.lines:
			if !ok {
				t.Fatalf("coordinator exited early with %d", <-c.done)
			}
			if rest, found := strings.CutPrefix(l, "coordinator on http://"); found {
				c.addr, _, _ = strings.Cut(rest, " ")
			}
		case <-deadline:
			t.Fatal("coordinator did not print its address")
		}
	}
	return c
}

// TestCoordinatorCommand runs `mayfly coordinator` with the demo pipeline and
// a preregistered runner token, drives every job through the real API client,
// and checks that --exit-when-done ends the command by itself.
func TestCoordinatorCommand(t *testing.T) {
	rc := runCoordinatorCmd(t, "--pipeline", "../../manager/coordinator/testdata/demo-pipeline.yaml",
		"--runner-token", "cli-test-token", "--exit-when-done", "--progress")
	addr, done, scanned, all := rc.addr, rc.done, rc.scanned, rc.all

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
