package main

import (
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/mayfly-ci/mayfly/manager/config"
)

func runVerify(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("verify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "config.toml", "config file (gitlab-runner config.toml format)")
	at := fs.String("at", "", "evaluate the idle policy at this RFC 3339 time instead of now")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: mayfly verify --config FILE [--at TIME]\n\nLoads and checks a config, then prints each runner, its provider and the\nidle policy in force now and after the next period change. Exits 1 when\nthe config has errors, naming file, line and key.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "mayfly verify: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	now := time.Now()
	if *at != "" {
		t, err := time.Parse(time.RFC3339, *at)
		if err != nil {
			fmt.Fprintf(stderr, "mayfly verify: --at: want an RFC 3339 time such as 2026-11-21T03:45:00Z: %v\n", err)
			return 2
		}
		now = t
	}
	cfg, err := config.Load(*path)
	if err != nil {
		fmt.Fprintf(stderr, "%v\n", err)
		return 1
	}
	if err := config.WriteSummary(stdout, cfg, now); err != nil {
		fmt.Fprintf(stderr, "mayfly verify: %v\n", err)
		return 1
	}
	return 0
}
