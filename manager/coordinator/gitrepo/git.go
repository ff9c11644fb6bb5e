// Package gitrepo keeps the bare git repositories the coordinator serves
// and serves them over git's smart HTTP protocol with Debian's
// `git http-backend` (through net/http/cgi), read-only.
//
// A project comes from a directory: a git work tree or bare repository
// (cloned as it is, its current branch becoming the default branch), or a
// plain directory, committed into a repository the store owns without
// touching the directory. A plain directory's .gitmodules may name other
// projects of the store by relative URL (url = ../lib.git); the store
// links them as submodules at those projects' current commits.
package gitrepo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// gitTimeout bounds each git command the store runs.
const gitTimeout = 2 * time.Minute

// runner runs git with a clean, predictable environment.
type runner struct {
	git  string // path of the git binary
	home string // HOME for git: no user configuration, no hooks
}

// env is the environment of every git command: no system or global
// configuration, no prompts.
func (g *runner) env(extra ...string) []string {
	env := []string{
		"HOME=" + g.home,
		"PATH=" + os.Getenv("PATH"),
		"GIT_CONFIG_NOSYSTEM=1",
		"GIT_CONFIG_GLOBAL=/dev/null",
		"GIT_TERMINAL_PROMPT=0",
		"LC_ALL=C",
	}
	return append(env, extra...)
}

// run runs git args in dir (the git dir or work tree) and returns stdout.
func (g *runner) run(ctx context.Context, dir string, extraEnv []string, stdin []byte, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, gitTimeout)
	defer cancel()
	full := append([]string{"-c", "safe.directory=*", "-c", "core.hooksPath=/dev/null"}, args...)
	cmd := exec.CommandContext(ctx, g.git, full...)
	cmd.Dir = dir
	cmd.Env = g.env(extraEnv...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if len(msg) > 2000 {
			msg = msg[:2000] + "…"
		}
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%v)", ctx.Err(), err)
		}
		return nil, fmt.Errorf("git %s: %w: %s", strings.Join(args, " "), err, msg)
	}
	return stdout.Bytes(), nil
}

// trimmed runs git and returns its output without the trailing newline.
func (g *runner) trimmed(ctx context.Context, dir string, args ...string) (string, error) {
	out, err := g.run(ctx, dir, nil, nil, args...)
	return strings.TrimSpace(string(out)), err
}

// ErrNoGit is returned when no git binary is found.
var ErrNoGit = errors.New("git is not installed (Debian package git; scripts/setup.sh installs it)")

func findGit() (string, error) {
	p, err := exec.LookPath("git")
	if err != nil {
		return "", ErrNoGit
	}
	return p, nil
}
