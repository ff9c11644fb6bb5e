package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
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
	"github.com/mayfly-ci/mayfly/providers"
)

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

func runCoordinator(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return runCoordinatorContext(ctx, args, stdout, stderr)
}

// runCoordinatorContext is runCoordinator until ctx ends (SIGINT or SIGTERM
// for the command).
func runCoordinatorContext(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("coordinator", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:8929", "address to serve the GitLab runner API on")
	regToken := fs.String("registration-token", "", "instance registration token (random when empty)")
	var runnerTokens, pipelines, projects stringList
	fs.Var(&runnerTokens, "runner-token", "register an instance runner (untagged jobs) with this authentication token; repeatable")
	fs.Var(&pipelines, "pipeline", "enqueue the pipelines of this YAML or JSON file at start; repeatable")
	fs.Var(&projects, "project", "serve `DIR` (a git repository, or a plain directory committed as is) as project root/<dir name>, or NAMESPACE/NAME=DIR, and run the pipeline of its .gitlab-ci.yml; repeatable")
	externalURL := fs.String("external-url", "", "the coordinator's URL as jobs in VMs see it (git, API, registry); default: the listen address")
	stateDir := fs.String("state-dir", "", "directory for the served repositories; default: a temporary directory removed at exit")
	adminToken := fs.String("admin-token", "", "token the admin API (/-/mayfly/: traces, cancel, pipelines) requires in the Private-Token header; required, and generated and printed when empty, whenever the coordinator listens beyond loopback or jobs in VMs reach it (--external-url)")
	pushToken := fs.String("push-token", "", "the administrator's access token (git read of every project, registry push, pipelines through the API); random when empty")
	withRegistry := fs.Bool("registry", true, "serve a container registry at <external-url>/v2/ (CI_REGISTRY), stored under --state-dir")
	registryMax := fs.Int64("registry-max-bytes", 10<<30, "bound on the registry's disk use")
	anonPull := fs.Bool("registry-anonymous-pull", false, "let the registry serve pulls without credentials")
	maxArtifact := fs.Int64("max-artifact-bytes", coordinator.DefaultMaxArtifactBytes, "largest artifact file a job may upload (stored under --state-dir)")
	longPoll := fs.Duration("long-poll", 0, "hold job requests this long while no job is queued (0 = off)")
	stuckTimeout := fs.Duration("stuck-job-timeout", coordinator.DefaultStuckJobTimeout, "fail a running job no runner call (trace upload, running update) touched for this long with stuck_or_timeout_failure, as GitLab's stuck-job clean-up (0 = never)")
	exitWhenDone := fs.Bool("exit-when-done", false, "exit once every enqueued job has finished")
	progress := fs.Bool("progress", false, "print each job's outcome as it finishes, the queue, and a summary at exit")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: mayfly coordinator [--listen ADDR] [--external-url URL] [--project DIR]... [--pipeline FILE]... [--runner-token TOKEN]...\n\nServes an in-memory GitLab that speaks the runner API (/api/v4/...), for\ntests and the local demo, and an admin API under /-/mayfly/ to enqueue\npipelines, cancel jobs and read traces. Stops on SIGINT or SIGTERM.\n\nWith --project it also serves each project's repository over git's smart HTTP\n(<external-url>/<namespace>/<name>.git, read with gitlab-ci-token:<job token>\nwhile the job runs) and runs the pipeline of its .gitlab-ci.yml. A new pipeline\nof the directory as it is now: POST /api/v4/projects/<id>/pipeline?ref=<branch>\nwith the header PRIVATE-TOKEN: <push token>.\n\nThe admin API reads every trace and cancels jobs: it requires --admin-token\nwhenever the coordinator listens on a non-loopback address or jobs in VMs\nreach it (--external-url); without the flag a token is generated and printed.\n\nFlags:\n")
		fs.PrintDefaults()
		fmt.Fprint(fs.Output(), unsupportedKeywordsHelp)
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{ReplaceAttr: providers.RedactAttr}))
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(stderr, "mayfly coordinator: %v\n", err)
		return 1
	}
	defer ln.Close()
	ext := *externalURL
	if ext == "" {
		ext = "http://" + ln.Addr().String()
	}
	state := *stateDir
	if state == "" {
		tmp, err := os.MkdirTemp("", "mayfly-coordinator-")
		if err != nil {
			fmt.Fprintf(stderr, "mayfly coordinator: %v\n", err)
			return 1
		}
		defer os.RemoveAll(tmp)
		state = tmp
	}
	admin, generated, err := adminTokenFor(*adminToken, ln.Addr(), *externalURL)
	if err != nil {
		fmt.Fprintf(stderr, "mayfly coordinator: %v\n", err)
		return 1
	}
	cfg := coordinator.Config{
		AdminToken:        admin,
		RegistrationToken: *regToken,
		ExternalURL:       ext,
		LongPoll:          *longPoll,
		Logger:            log,
		StateDir:          state,
		PushToken:         *pushToken,
		MaxArtifactBytes:  *maxArtifact,
		StuckJobTimeout:   *stuckTimeout,
	}
	if *stuckTimeout == 0 {
		cfg.StuckJobTimeout = -1
	} else if *stuckTimeout < 0 {
		fmt.Fprintf(stderr, "mayfly coordinator: --stuck-job-timeout %s: must not be negative (0 turns the clean-up off)\n", *stuckTimeout)
		return 2
	}
	if *withRegistry {
		cfg.Registry = &coordinator.RegistryConfig{MaxBytes: *registryMax, AnonymousPull: *anonPull}
	}
	srv, err := coordinator.New(cfg)
	if err != nil {
		fmt.Fprintf(stderr, "mayfly coordinator: %v\n", err)
		return 1
	}
	defer srv.Close()
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
	if len(projects) > 0 {
		if err := addProjects(ctx, stdout, srv, projects); err != nil {
			fmt.Fprintf(stderr, "mayfly coordinator: %v\n", err)
			return 1
		}
	}
	fmt.Fprintf(stdout, "coordinator on http://%s (registration token %s)\n", ln.Addr(), srv.RegistrationToken())
	if generated {
		fmt.Fprintf(stdout, "admin API token %s (Private-Token header; generated: the admin API is reachable beyond this host's loopback)\n", admin)
	}
	if ext != "http://"+ln.Addr().String() {
		fmt.Fprintf(stdout, "jobs see it at %s\n", ext)
	}
	if *withRegistry {
		fmt.Fprintf(stdout, "registry at %s (push: any user name, password = the push token %s)\n", strings.TrimPrefix(strings.TrimPrefix(ext, "http://"), "https://"), srv.PushToken())
	}
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

// addProjects serves the --project directories and prints what was made of each.
func addProjects(ctx context.Context, w io.Writer, srv *coordinator.Server, args []string) error {
	srcs := make([]coordinator.ProjectSource, len(args))
	for i, a := range args {
		srcs[i] = coordinator.ProjectSource{Dir: a}
		if p, dir, ok := strings.Cut(a, "="); ok && strings.Contains(p, "/") && !strings.HasPrefix(p, ".") && !strings.HasPrefix(p, "/") {
			srcs[i] = coordinator.ProjectSource{Path: p, Dir: dir}
		}
	}
	res, err := srv.AddProjects(ctx, srcs)
	if err != nil {
		return err
	}
	for i, r := range res {
		fmt.Fprintf(w, "project %s (id %d) from %s: %s at %.8s, git %s\n", r.Project.Path, r.Project.ID, srcs[i].Dir, r.Branch, r.Commit, r.RepoURL)
		if r.Dirty {
			fmt.Fprintf(w, "  note: uncommitted changes in the work tree are not served\n")
		}
		switch {
		case r.Pipeline != nil:
			fmt.Fprintf(w, "  pipeline %d: %d jobs\n", r.Pipeline.ID, len(r.Pipeline.JobIDs))
			for _, warn := range r.Pipeline.Warnings {
				fmt.Fprintf(w, "  warning: %s\n", warn)
			}
		default:
			fmt.Fprintf(w, "  no pipeline: %s\n", r.NoPipeline)
		}
	}
	fmt.Fprintf(w, "push token %s (git over HTTP with any user name; PRIVATE-TOKEN for POST /api/v4/projects/<id>/pipeline)\n", srv.PushToken())
	return nil
}

// unsupportedKeywordsHelp lists what .gitlab-ci.yml support leaves out.
const unsupportedKeywordsHelp = `
.gitlab-ci.yml keywords read but not implemented (one warning line each; the
job runs without them): environment, coverage, interruptible, resource_group,
release, pages, secrets, id_tokens, identity, dast_configuration,
manual_confirmation, start_in and when: delayed (starts at once),
rules:changes (matches), rules:needs, only/except:changes and kubernetes,
needs from other projects or pipelines, artifacts:expose_as/public/access,
image and services docker:/kubernetes:/ports:, cache:key:files_commits,
workflow:auto_cancel, spec:inputs, include: other than local. Jobs with
trigger: or run: are skipped with a warning. Manual jobs never run.
`

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

// adminTokenFor returns the admin API's token: the one given, or, when the
// API is reachable from beyond this host's loopback (a non-loopback listen
// address, or jobs in VMs reaching it through --external-url), a random one
// (generated reports that). On loopback alone with no token the API is open.
func adminTokenFor(given string, listen net.Addr, externalURL string) (token string, generated bool, err error) {
	if given != "" {
		return given, false, nil
	}
	exposed := externalURL != ""
	if tcp, ok := listen.(*net.TCPAddr); ok && !tcp.IP.IsLoopback() {
		exposed = true
	}
	if !exposed {
		return "", false, nil
	}
	b := make([]byte, 20)
	if _, err := rand.Read(b); err != nil {
		return "", false, fmt.Errorf("admin token: %w", err)
	}
	return "mfa-" + hex.EncodeToString(b), true, nil
}
