package main

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
)

// The Makefile (and deploy/container/Containerfile) set these at build
// time, as gitlab-runner's build does:
//
//	-ldflags "-X main.version=1.2.0 -X main.revision=1a2b3c4d -X main.branch=main"
//
// Unset, buildInfo falls back on what the Go toolchain recorded
// (debug.ReadBuildInfo: the module version, vcs.revision).
var (
	version  string
	revision string
	branch   string
)

// build is what mayfly tells about itself: to GitLab as info.version and
// info.revision, in the User-Agent, and in mayfly version.
type build struct {
	Version  string // e.g. "1.2.0"; "dev" when unknown
	Revision string // the commit, 8 hex digits as gitlab-runner sends; "HEAD" when unknown
	Branch   string // "HEAD" when unknown
}

// buildInfo returns this binary's version, revision and branch: the values
// set with -ldflags, else those in the binary's build information.
func buildInfo() build {
	return resolveBuild(version, revision, branch, debug.ReadBuildInfo)
}

func resolveBuild(v, rev, br string, read func() (*debug.BuildInfo, bool)) build {
	if info, ok := read(); ok {
		if v == "" && info.Main.Version != "(devel)" {
			v = info.Main.Version
		}
		for _, s := range info.Settings {
			if s.Key == "vcs.revision" && rev == "" {
				rev = s.Value
			}
		}
	}
	if len(rev) > 8 {
		rev = rev[:8]
	}
	b := build{Version: v, Revision: rev, Branch: br}
	if b.Version == "" {
		b.Version = "dev"
	}
	if b.Revision == "" {
		b.Revision = "HEAD"
	}
	if b.Branch == "" {
		b.Branch = "HEAD"
	}
	return b
}

// versionString is the line mayfly version prints.
func versionString() string {
	b := buildInfo()
	return fmt.Sprintf("mayfly %s (%s) %s/%s %s", b.Version, b.Revision, runtime.GOOS, runtime.GOARCH, runtime.Version())
}

func runVersion(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		if args[0] == "-h" || args[0] == "--help" {
			fmt.Fprintln(stdout, "Usage: mayfly version\n\nPrints the version, revision, platform and Go version.")
			return 0
		}
		fmt.Fprintf(stderr, "mayfly version: unexpected argument %q\n", args[0])
		return 2
	}
	fmt.Fprintln(stdout, versionString())
	return 0
}
