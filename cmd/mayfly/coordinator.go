package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/mayfly-ci/mayfly/manager/coordinator"
)

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

func runCoordinator(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("coordinator", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:8929", "address to serve the GitLab runner API on")
	regToken := fs.String("registration-token", "", "instance registration token (random when empty)")
	var runnerTokens, pipelines stringList
	fs.Var(&runnerTokens, "runner-token", "register an instance runner (untagged jobs) with this authentication token; repeatable")
	fs.Var(&pipelines, "pipeline", "enqueue the pipelines of this YAML or JSON file at start; repeatable")
	longPoll := fs.Duration("long-poll", 0, "hold job requests this long while no job is queued (0 = off)")
	exitWhenDone := fs.Bool("exit-when-done", false, "exit once every enqueued job has finished")
	progress := fs.Bool("progress", false, "print each job's outcome as it finishes, the queue, and a summary at exit")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: mayfly coordinator [--listen ADDR] [--pipeline FILE]... [--runner-token TOKEN]...\n\nServes an in-memory GitLab that speaks the runner API (/api/v4/...), for\ntests and the local demo, and an admin API under /-/mayfly/ to enqueue\npipelines, cancel jobs and read traces. Stops on SIGINT or SIGTERM.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	srv, err := coordinator.New(coordinator.Config{
		RegistrationToken: *regToken,
		ExternalURL:       "http://" + *listen,
		LongPoll:          *longPoll,
		Logger:            log,
	})
	if err != nil {
		fmt.Fprintf(stderr, "mayfly coordinator: %v\n", err)
		return 1
	}
	for _, tok := range runnerTokens {
		if _, err := srv.RegisterRunner(coordinator.RunnerOptions{RegistrationToken: srv.RegistrationToken(), RunUntagged: true, Description: "preregistered", Token: tok}); err != nil {
			fmt.Fprintf(stderr, "mayfly coordinator: --runner-token: %v\n", err)
			return 1
		}
	}
	for _, p := range pipelines {
		res, err := srv.ApplyFile(p)
		if err != nil {
			fmt.Fprintf(stderr, "mayfly coordinator: %v\n", err)
			return 1
		}
		fmt.Fprintf(stdout, "enqueued %d pipelines from %s\n", len(res.Pipelines), p)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(stderr, "mayfly coordinator: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "coordinator on http://%s (registration token %s)\n", ln.Addr(), srv.RegistrationToken())
	if *progress {
		progressDone := make(chan struct{})
		progressCtx, stopProgress := context.WithCancel(ctx)
		go func() { defer close(progressDone); printProgress(progressCtx, stdout, srv) }()
		defer func() {
			stopProgress()
			<-progressDone
			printSummary(stdout, srv.Jobs())
		}()
	}
	if *exitWhenDone {
		serveCtx, cancel := context.WithCancel(ctx)
		defer cancel()
		go func() {
			defer cancel()
			if err := srv.WaitAllFinished(serveCtx); err == nil {
				fmt.Fprintln(stdout, "every job has finished")
				// Give the runner a moment to read its last answers.
				select {
				case <-time.After(time.Second):
				case <-serveCtx.Done():
				}
			}
		}()
		ctx = serveCtx
	}
	if err := srv.Serve(ctx, ln); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintf(stderr, "mayfly coordinator: %v\n", err)
		return 1
	}
	return 0
}

// printProgress prints each job as it finishes and the queue when it
// changes, until ctx ends.
func printProgress(ctx context.Context, w io.Writer, srv *coordinator.Server) {
	reported := map[int64]bool{}
	lastQueue := ""
	scan := func() {
		pending, running := 0, 0
		for _, j := range srv.Jobs() {
			switch {
			case coordinator.IsFinal(j.Status) && !reported[j.ID]:
				reported[j.ID] = true
				fmt.Fprintf(w, "%s job %d %s/%s: %s\n", time.Now().Format("15:04:05"), j.ID, j.ProjectPath, j.Name, outcome(j))
			case j.Status == "pending":
				pending++
			case j.Status == "running" || j.Status == "canceling":
				running++
			}
		}
		if q := fmt.Sprintf("%d pending, %d running", pending, running); q != lastQueue {
			fmt.Fprintf(w, "%s queue: %s\n", time.Now().Format("15:04:05"), q)
			lastQueue = q
		}
	}
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		scan()
		select {
		case <-ctx.Done():
			scan() // what finished since the last tick
			return
		case <-t.C:
		}
	}
}

func outcome(j coordinator.JobRecord) string {
	s := j.Status
	if j.FailureReason != "" {
		s += " (" + j.FailureReason
		if j.ExitCode != 0 {
			s += fmt.Sprintf(", exit code %d", j.ExitCode)
		}
		s += ")"
	}
	if j.AllowFailure && j.Status == "failed" {
		s += ", allowed to fail"
	}
	return s
}

// printSummary prints one line per job.
func printSummary(w io.Writer, jobs []coordinator.JobRecord) {
	fmt.Fprintf(w, "\n%-4s %-22s %-10s %s\n", "JOB", "PROJECT/NAME", "DURATION", "OUTCOME")
	for _, j := range jobs {
		d := "-"
		if !j.StartedAt.IsZero() && !j.FinishedAt.IsZero() {
			d = j.FinishedAt.Sub(j.StartedAt).Round(100 * time.Millisecond).String()
		}
		fmt.Fprintf(w, "%-4d %-22s %-10s %s\n", j.ID, j.ProjectPath+"/"+j.Name, d, outcome(j))
	}
}
