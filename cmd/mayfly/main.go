// Command mayfly is an autoscaling fleet controller for GitLab CI that runs
// every job in a fresh VM. See the README for the subcommands.
package main

import (
	"fmt"
	"io"
	"os"

	_ "time/tzdata" // timezones in config work on hosts without tzdata
)

// command is one subcommand: it parses its own flags and returns the exit code.
type command struct {
	name, summary string
	run           func(args []string, stdout, stderr io.Writer) int
}

func commands() []command {
	return []command{
		{"coordinator", "serve an in-memory GitLab (runner API) for tests and the local demo", runCoordinator},
		{"fleet", "show the fleets of a running manager (fleet status)", runFleet},
		{"image", "build the microVM image (image build), or container images pushed to a registry (image push-debian), from Debian packages", runImage},
		{"run", "run the runner manager: jobs from GitLab, each in a fresh VM", runRun},
		{"simulate", "replay a job-arrival trace through fleet policies and report latency and cost", runSimulate},
		{"verify", "load a config, check it and print each runner's fleet and idle policy", runVerify},
		{"version", "print the version", runVersion},
	}
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stdout)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(args[1:], stdout, stderr)
		}
	}
	fmt.Fprintf(stderr, "mayfly: unknown command %q\n\n", args[0])
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintf(w, "mayfly runs each GitLab CI job in its own fresh VM.\n\nUsage: mayfly <command> [flags]\n\nCommands:\n")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "\nRun 'mayfly <command> --help' for a command's flags.\n")
}

// verb checks that a command with one sub-verb (such as "image build") was
// given it. It returns the exit code to use when it was not, with ok false.
func verb(args []string, want, usage, summary string, stdout, stderr io.Writer) (code int, ok bool) {
	switch {
	case len(args) > 0 && args[0] == want:
		return 0, true
	case len(args) > 0 && (args[0] == "-h" || args[0] == "--help"):
		fmt.Fprintf(stdout, "Usage: %s\n\n%s\n", usage, summary)
		return 0, false
	}
	fmt.Fprintf(stderr, "Usage: %s\n", usage)
	return 2, false
}
