// Package helper is mayfly-helper, the small program that runs in the
// job's environment (the VM's shell) for the runner's stages of a job, as
// gitlab-runner's helper does: it archives and uploads artifacts, downloads
// and extracts the artifacts of dependencies, and restores and saves
// caches. It talks to GitLab with the job token and to the cache store
// through URLs the manager pre-signed, so it holds no cloud credential.
//
// Commands (flags follow gitlab-runner's helper where one exists):
//
//	artifacts-uploader   --url URL --id JOB [--token T] --path GLOB... [--exclude GLOB...] [--untracked]
//	                     [--name NAME] [--expire-in D] [--artifact-format zip|gzip|raw] [--artifact-type TYPE]
//	artifacts-downloader --url URL --id JOB [--token T]
//	cache-extractor      [--key KEY --url SIGNED_GET_URL]... [--file LOCAL.zip]
//	cache-archiver       --key KEY --file LOCAL.zip [--url SIGNED_PUT_URL] [--header "K: V"]... --path GLOB... [--untracked]
//	                     [--max-uploaded-archive-size BYTES]
//	version
//
// --token defaults to $CI_JOB_TOKEN. Everything runs in the current
// directory, the project directory. Network calls are bounded in time and
// retried a bounded number of times; archives stream from and to disk.
package helper

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"
)

// Version is the helper's version, set by the linker (-X) or read from the
// build information.
var Version = ""

// version returns Version, or the VCS revision the binary was built from.
func version() string {
	if Version != "" {
		return Version
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		rev, dirty := "", false
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
		if len(rev) > 12 {
			rev = rev[:12]
		}
		if rev != "" {
			if dirty {
				rev += "-dirty"
			}
			return rev
		}
	}
	return "dev"
}

// Env reads an environment variable.
type Env func(string) string

// command is one subcommand.
type command struct {
	name, summary string
	run           func(ctx context.Context, c *cli, args []string) error
}

var commands = []command{
	{"artifacts-uploader", "archive files and upload them as the job's artifacts", runArtifactsUploader},
	{"artifacts-downloader", "download a job's artifacts and extract them here", runArtifactsDownloader},
	{"cache-extractor", "download the first cache found and extract it here", runCacheExtractor},
	{"cache-archiver", "archive files as a cache and upload it", runCacheArchiver},
	{"version", "print the helper's version", func(_ context.Context, c *cli, _ []string) error {
		fmt.Fprintln(c.stdout, version())
		return nil
	}},
}

// cli is what one run of the helper writes to and reads from.
type cli struct {
	stdout, stderr io.Writer
	env            Env
	// retryWait is the first pause between retries (doubled each time).
	retryWait time.Duration
	// retryBudget bounds the retries of a call to GitLab while it is away
	// (0: GitLabRetryBudget); retryMaxWait caps one pause (0:
	// GitLabMaxRetryWait).
	retryBudget, retryMaxWait time.Duration
}

func (c *cli) logf(format string, args ...any) {
	fmt.Fprintf(c.stdout, strings.TrimRight(format, "\n")+"\n", args...)
}

// Main runs the helper with args (without the program name) and returns
// its exit code. SIGINT and SIGTERM end it.
func Main(args []string, stdout, stderr io.Writer, env Env) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return run(ctx, &cli{stdout: stdout, stderr: stderr, env: env, retryWait: time.Second}, args)
}

func run(ctx context.Context, c *cli, args []string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(c.stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, cmd := range commands {
		if cmd.name != args[0] {
			continue
		}
		err := cmd.run(ctx, c, args[1:])
		switch {
		case err == nil:
			return 0
		case errors.Is(err, flag.ErrHelp):
			return 0
		case errors.Is(err, errUsage):
			return 2
		}
		fmt.Fprintf(c.stdout, "ERROR: %v\n", err)
		return 1
	}
	fmt.Fprintf(c.stderr, "mayfly-helper: unknown command %q\n", args[0])
	usage(c.stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintf(w, "Usage: mayfly-helper COMMAND [FLAGS]\n\nRuns in a job's environment for the runner's stages of the job.\n\nCommands:\n")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-22s %s\n", c.name, c.summary)
	}
}

// errUsage is a flag error already reported.
var errUsage = errors.New("usage")

// strList is a repeatable flag.
type strList []string

func (l *strList) String() string     { return strings.Join(*l, ",") }
func (l *strList) Set(v string) error { *l = append(*l, v); return nil }

// newFlags is a flag set that reports errors on c.stderr.
func newFlags(c *cli, name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(c.stderr)
	return fs
}

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "%s: unexpected arguments %q\n", fs.Name(), fs.Args())
		return errUsage
	}
	return nil
}

// humanBytes formats n as GitLab's runner does in its messages (1.5 GB).
func humanBytes(n int64) string {
	const unit = 1000
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %cB", float64(n)/float64(div), "kMGTPE"[exp])
}
