package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
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
	ctx, cancel := context.WithCancel(context.Background())
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		code := runCoordinatorContext(ctx, append([]string{"--listen", "127.0.0.1:0"}, args...), outW, io.Discard)
		outW.Close()
		c.done <- code
	}()
	t.Cleanup(func() { cancel(); <-exited })
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

// The admin API reads every trace and cancels jobs: it needs a token as
// soon as anything beyond this host's loopback (or a job in a VM) can
// reach it (issue 19).
func TestCoordinatorAdminToken(t *testing.T) {
	loop := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 8929}
	wide := &net.TCPAddr{IP: net.IPv4zero, Port: 8929}
	for _, tt := range []struct {
		name          string
		given         string
		listen        net.Addr
		external      string
		wantGenerated bool
		wantOpen      bool
	}{
		{"loopback only: open", "", loop, "", false, true},
		{"given token kept", "tok", wide, "", false, false},
		{"all interfaces: generated", "", wide, "", true, false},
		{"jobs in VMs reach it: generated", "", loop, "http://10.0.2.2:8929", true, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tok, gen, err := adminTokenFor(tt.given, tt.listen, tt.external)
			if err != nil {
				t.Fatal(err)
			}
			if gen != tt.wantGenerated || (tok == "") != tt.wantOpen || (tt.given != "" && tok != tt.given) {
				t.Errorf("token %q generated %v", tok, gen)
			}
		})
	}

	rc := runCoordinatorCmd(t, "--external-url", "http://10.0.2.2:8929", "--registry=false")
	var token string
	deadline := time.After(10 * time.Second)
	for token == "" {
		select {
		case l := <-rc.lines:
			if rest, ok := strings.CutPrefix(l, "admin API token "); ok {
				token, _, _ = strings.Cut(rest, " ")
			}
		case <-deadline:
			t.Fatal("no admin token printed")
		}
	}
	get := func(tok string) int {
		req, _ := http.NewRequest("GET", "http://"+rc.addr+"/-/mayfly/jobs", nil)
		if tok != "" {
			req.Header.Set("Private-Token", tok)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := get(""); code != http.StatusUnauthorized {
		t.Errorf("admin API without the token: %d, want 401", code)
	}
	if code := get(token); code != http.StatusOK {
		t.Errorf("admin API with the printed token: %d, want 200", code)
	}
}

// TestCoordinatorStuckJobTimeout: `mayfly coordinator --stuck-job-timeout`
// fails a job its runner went silent on with stuck_or_timeout_failure, and
// refuses a negative timeout.
func TestCoordinatorStuckJobTimeout(t *testing.T) {
	if code := runCoordinatorContext(context.Background(), []string{"--listen", "127.0.0.1:0", "--stuck-job-timeout", "-1s"}, io.Discard, io.Discard); code != 2 {
		t.Errorf("--stuck-job-timeout -1s: exit %d, want 2", code)
	}
	rc := runCoordinatorCmd(t, "--pipeline", "../../manager/coordinator/testdata/demo-pipeline.yaml",
		"--runner-token", "stuck-test-token", "--registry=false", "--stuck-job-timeout", "1s")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := gitlab.New(gitlab.Config{URL: "http://" + rc.addr, Info: runnerapi.VersionInfo{Name: "mayfly-test"}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	res, err := c.RequestJob(ctx, "stuck-test-token", gitlab.RequestOptions{})
	if err != nil || res.Outcome != gitlab.JobReceived {
		t.Fatalf("RequestJob: %+v, %v", res.Outcome, err)
	}
	// The runner says nothing more: the job is dropped within the timeout and a sweep.
	var rec struct {
		Status        string `json:"status"`
		FailureReason string `json:"failure_reason"`
		Trace         string `json:"trace"`
	}
	for rec.Status != coordinator.StatusFailed {
		select {
		case <-ctx.Done():
			t.Fatalf("job %d still %q", res.Job.ID, rec.Status)
		case <-time.After(100 * time.Millisecond):
		}
		resp, err := http.Get(fmt.Sprintf("http://%s/-/mayfly/jobs/%d", rc.addr, res.Job.ID))
		if err != nil {
			t.Fatal(err)
		}
		err = json.NewDecoder(resp.Body).Decode(&rec)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	if rec.FailureReason != runnerapi.FailureStuckOrTimeout || !strings.Contains(rec.Trace, coordinator.StuckJobMessage) {
		t.Errorf("job %d failed with %q, trace %q; want %q and GitLab's line", res.Job.ID, rec.FailureReason, rec.Trace, runnerapi.FailureStuckOrTimeout)
	}
}
