package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/mayfly-ci/mayfly/fleet"
	"github.com/mayfly-ci/mayfly/manager/config"
)

func runFleet(args []string, stdout, stderr io.Writer) int {
	if code, ok := verb(args, "status", "mayfly fleet status [--config FILE | --addr HOST:PORT] [--json]", "Shows the fleets of a running manager.", stdout, stderr); !ok {
		return code
	}
	fs := flag.NewFlagSet("fleet status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "config.toml", "config whose listen_address the manager serves on")
	addr := fs.String("addr", "", "the manager's listen_address (overrides --config)")
	asJSON := fs.Bool("json", false, "print the status as JSON, with every instance")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: mayfly fleet status [--config FILE | --addr HOST:PORT] [--json]\n\nAsks a running manager (mayfly run) for its fleets: instances by state,\nthe idle target and policy in force, and each instance.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *addr == "" {
		cfg, err := config.Load(*path)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		if cfg.ListenAddress == "" {
			fmt.Fprintf(stderr, "mayfly fleet status: %s has no listen_address, so the manager serves no status\n", *path)
			return 1
		}
		*addr = cfg.ListenAddress
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+*addr+"/fleet/status", nil)
	if err != nil {
		fmt.Fprintf(stderr, "mayfly fleet status: %v\n", err)
		return 1
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintf(stderr, "mayfly fleet status: is mayfly run serving on %s? %v\n", *addr, err)
		return 1
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(stderr, "mayfly fleet status: %s answered %s\n", *addr, resp.Status)
		return 1
	}
	var sts []fleet.Status
	if err := json.NewDecoder(resp.Body).Decode(&sts); err != nil {
		fmt.Fprintf(stderr, "mayfly fleet status: bad answer from %s: %v\n", *addr, err)
		return 1
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(sts)
		return 0
	}
	for _, st := range sts {
		fmt.Fprintln(stdout, statusLine(st))
		for _, in := range st.Instances {
			fmt.Fprintf(stdout, "  %-28s %-12s since %s uses %d %s\n", in.ID, in.State, in.Since.Format(time.RFC3339), in.Uses, in.Reason)
		}
	}
	return 0
}
