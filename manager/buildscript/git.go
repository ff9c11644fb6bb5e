package buildscript

import (
	"errors"
	"fmt"
	"net/url"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// Git strategies, the values of GIT_STRATEGY.
const (
	GitClone = "clone" // a new repository in an emptied project dir
	GitFetch = "fetch" // reuse the project dir's repository when there is one
	GitNone  = "none"  // no git at all; the project dir is made if missing
	GitEmpty = "empty" // no git; the project dir is emptied
)

// Defaults of the GIT_* variables (gitlab-runner's).
var (
	defaultCleanFlags = []string{"-ffdx"}
	defaultFetchFlags = []string{"--prune", "--quiet"}
)

// hookPostGetSourcesScript is the payload hook run after get_sources
// (gitlab-runner knows it; GitLab sends only the pre hook so far).
const hookPostGetSourcesScript = "post_get_sources_script"

// CredentialUser is the user name GitLab takes the job token with.
const CredentialUser = "gitlab-ci-token"

// credentialHelper is the git credential helper get_sources configures: it
// answers "get" with the job token from the environment, so the token is
// never written to .git/config nor given to another helper to store. It has
// no double quote, which PowerShell before 7.3 would mangle.
const credentialHelper = `!f(){ case $1 in get) echo password=$CI_JOB_TOKEN;; esac; }; f`

// gitLockFiles are left behind in .git by a git that was stopped, and make
// the next fetch fail.
var gitLockFiles = []string{"index.lock", "shallow.lock", "HEAD.lock", "hooks/post-checkout", "config.lock"}

// gitConfig is what git_info and the GIT_* variables ask of get_sources.
type gitConfig struct {
	checkout       bool
	cleanFlags     []string // GIT_CLEAN_FLAGS; empty: no git clean
	fetchFlags     []string // GIT_FETCH_EXTRA_FLAGS
	submodules     string   // none, normal or recursive
	submoduleFlags []string // GIT_SUBMODULE_UPDATE_FLAGS
	submodulePaths []string // GIT_SUBMODULE_PATHS
	depth          int      // git_info.depth, else GIT_DEPTH; 0 = full history
	submoduleDepth int      // GIT_SUBMODULE_DEPTH, else depth
	// remote is repo_url without credentials: what .git/config keeps.
	remote string
	// credHost is scheme://host[:port] of an HTTP(S) remote, the scope the
	// job token is given to (submodules on the same server included); empty
	// for other remotes.
	credHost, credUser string
}

// gitSettings reads GIT_STRATEGY and friends and checks git_info against
// them. Like gitlab-runner, unusable optional values fall back to their
// default with a warning; an unknown GIT_SUBMODULE_STRATEGY fails the job.
func (g *generator) gitSettings() error {
	j, p := g.job, g.plan
	c := &g.git
	gi := j.GitInfo
	if gi.Depth < 0 {
		return fmt.Errorf("job payload: git_info.depth %d: want >= 0", gi.Depth)
	}
	for i, r := range gi.Refspecs {
		if r == "" || strings.ContainsAny(r, "\x00\r\n") || strings.HasPrefix(r, "-") {
			return fmt.Errorf("job payload: git_info.refspecs[%d] %q: empty, starts with -, or contains NUL or a line break", i, r)
		}
	}

	def := GitClone
	if j.AllowGitFetch {
		def = GitFetch
	}
	switch s := g.value("GIT_STRATEGY"); s {
	case "":
		p.GitStrategy = def
	case GitClone, GitFetch, GitNone, GitEmpty:
		p.GitStrategy = s
	default:
		p.GitStrategy = def
		g.warnf("variable GIT_STRATEGY %q: want clone, fetch, none or empty; using %s", s, def)
	}
	switch s := g.value("GIT_SUBMODULE_STRATEGY"); s {
	case "":
		c.submodules = "none"
	case "none", "normal", "recursive":
		c.submodules = s
	default:
		return fmt.Errorf("variable GIT_SUBMODULE_STRATEGY %q: want none, normal or recursive", s)
	}
	c.submodulePaths = strings.Fields(g.value("GIT_SUBMODULE_PATHS"))
	if slices.Contains(c.submodulePaths, ":(exclude)") {
		return fmt.Errorf("variable GIT_SUBMODULE_PATHS %q: write an exclusion as :(exclude)path, with no space", g.value("GIT_SUBMODULE_PATHS"))
	}
	c.submoduleFlags = strings.Fields(g.value("GIT_SUBMODULE_UPDATE_FLAGS"))
	c.cleanFlags = g.flags("GIT_CLEAN_FLAGS", defaultCleanFlags)
	c.fetchFlags = g.flags("GIT_FETCH_EXTRA_FLAGS", defaultFetchFlags)

	c.checkout = true
	if s := g.value("GIT_CHECKOUT"); s != "" {
		b, err := strconv.ParseBool(s)
		if err != nil {
			g.warnf("variable GIT_CHECKOUT %q: want true or false; using true", s)
			b = true
		}
		c.checkout = b
	}
	// GitLab turns GIT_DEPTH into git_info.depth; the variable counts only
	// when the payload has no depth.
	c.depth = gi.Depth
	if c.depth == 0 {
		c.depth = g.nonNegative("GIT_DEPTH", 0)
	}
	c.submoduleDepth = g.nonNegative("GIT_SUBMODULE_DEPTH", c.depth)

	if p.GitStrategy == GitNone || p.GitStrategy == GitEmpty {
		c.checkout, c.submodules = false, "none"
		return nil
	}
	sha := gi.Sha
	if len(sha) < 8 || !hexRE.MatchString(sha) {
		return fmt.Errorf("job payload: git_info.sha %q: want at least 8 hex digits (GIT_STRATEGY is %s)", sha, p.GitStrategy)
	}
	if gi.RepoURL == "" {
		return fmt.Errorf("job payload: git_info.repo_url: empty (GIT_STRATEGY is %s)", p.GitStrategy)
	}
	if strings.ContainsAny(gi.RepoURL, "\x00\r\n") || strings.HasPrefix(gi.RepoURL, "-") {
		return errors.New("job payload: git_info.repo_url: starts with - or contains NUL or a line break")
	}
	if strings.ContainsAny(gi.Ref, "\x00\r\n") {
		return errors.New("job payload: git_info.ref: contains NUL or a line break")
	}
	if f := gi.RepoObjectFormat; f != "" && !objectFormatRE.MatchString(f) {
		return fmt.Errorf("job payload: git_info.repo_object_format %q: want sha1 or sha256", f)
	}
	for i, h := range j.Hooks {
		for k, c := range h.Script {
			if strings.ContainsRune(c, 0) {
				return fmt.Errorf("job payload: hooks[%d] (%s).script[%d]: contains a NUL byte", i, h.Name, k)
			}
		}
	}
	c.remote, c.credHost, c.credUser = splitRepoURL(gi.RepoURL)
	if u, err := url.Parse(gi.RepoURL); err == nil && c.credHost != "" {
		if pw, ok := u.User.Password(); ok && pw != g.value("CI_JOB_TOKEN") {
			g.warnf("git_info.repo_url carries a password that is not CI_JOB_TOKEN; git authenticates with CI_JOB_TOKEN")
		}
	}
	return nil
}

var objectFormatRE = regexp.MustCompile(`^[a-z0-9]+$`)

// hookScript returns the commands of the payload's hooks called name.
func (g *generator) hookScript(name string) []string {
	var cmds []string
	for _, h := range g.job.Hooks {
		if h.Name == name {
			cmds = append(cmds, h.Script...)
		}
	}
	return cmds
}

// splitRepoURL returns repo_url without its user and password, and for an
// HTTP(S) URL the scheme://host[:port] and user to give the job token to
// (gitlab-ci-token unless the URL names another user).
func splitRepoURL(repoURL string) (remote, credHost, user string) {
	u, err := url.Parse(repoURL)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return repoURL, "", ""
	}
	user = CredentialUser
	if u.User != nil && u.User.Username() != "" {
		user = u.User.Username()
	}
	u.User = nil
	return u.String(), u.Scheme + "://" + u.Host, user
}

// flags reads a flags variable: unset is def, "none" is no flags, else its
// words.
func (g *generator) flags(key string, def []string) []string {
	switch s := g.value(key); s {
	case "":
		return def
	case "none":
		return nil
	default:
		return strings.Fields(s)
	}
}

// nonNegative reads an integer variable >= 0; unset or unusable is def.
func (g *generator) nonNegative(key string, def int) int {
	s := g.value(key)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		g.warnf("variable %s %q: want a whole number >= 0; using %d", key, s, def)
		return def
	}
	return n
}

func (g *generator) warnf(format string, args ...any) {
	g.plan.Warnings = append(g.plan.Warnings, fmt.Sprintf(format, args...))
}

// getSources writes the get_sources stage after the exports: the
// repository at exactly git_info.sha, as gitlab-runner sets it up. The job
// token reaches git only through the credential helper, so neither the
// script's output nor .git/config ever holds it. With retries, each retry
// first empties the worktree (gitlab-runner's clear_worktree stage): a
// marker file tells a retry from the first attempt.
func (g *generator) getSources(w shellWriter, retries bool) {
	p, c := g.plan, &g.git
	w.export("GIT_TERMINAL_PROMPT", "0")
	w.export("GCM_INTERACTIVE", "Never")
	switch p.GitStrategy {
	case GitNone:
		w.notice("Skipping Git repository setup")
		w.mkdir(p.ProjectDir)
		w.notice("Skipping Git checkout")
		w.notice("Skipping Git submodules setup")
		return
	case GitEmpty:
		w.notice("Skipping Git repository setup and creating an empty build directory")
		w.rmdir(p.ProjectDir)
		w.mkdir(p.ProjectDir)
		w.notice("Skipping Git checkout")
		w.notice("Skipping Git submodules setup")
		return
	}
	var marker string
	if retries {
		marker = g.join(p.TmpDir, fmt.Sprintf("get_sources.%d.attempted", g.job.ID))
		w.ifFile(marker)
		w.notice("Deleting tracked and untracked files...")
		w.ifDir(g.join(p.ProjectDir, ".git"))
		w.run("git", "-C", p.ProjectDir, "rm", "-rf", "--ignore-unmatch", "--quiet", ".")
		w.run("git", "-C", p.ProjectDir, "clean", "-ffdx", "-q")
		w.endIf()
		w.orElse()
		w.mkdir(p.TmpDir)
		w.touch(marker)
		w.endIf()
	}
	// config.toml's pre_get_sources_script, then the job's hooks:
	// pre_get_sources_script; after the sources the other way round.
	if g.opts.PreCloneScript != "" {
		w.userCommand(g.opts.PreCloneScript)
	}
	for _, c := range g.hookScript(runnerapi.HookPreGetSourcesScript) {
		w.userCommand(c)
	}
	g.fetch(w)
	if c.checkout {
		sha := g.job.GitInfo.Sha
		w.notice(fmt.Sprintf("Checking out %s as detached HEAD (ref is %s)...", sha[:8], g.job.GitInfo.Ref))
		w.run("git", "-c", "submodule.recurse=false", "checkout", "-f", "-q", sha)
		if len(c.cleanFlags) > 0 {
			w.run("git", append([]string{"clean"}, c.cleanFlags...)...)
		}
	} else {
		w.notice("Skipping Git checkout")
	}
	g.submodules(w)
	for _, c := range g.hookScript(hookPostGetSourcesScript) {
		w.userCommand(c)
	}
	if g.opts.PostCloneScript != "" {
		w.userCommand(g.opts.PostCloneScript)
	}
	if marker != "" {
		w.rmfile(marker)
	}
}

// fetch writes the repository's set-up and the fetch of the refspecs; the
// script is left in the project dir.
func (g *generator) fetch(w shellWriter) {
	p, c := g.plan, &g.git
	dir := p.ProjectDir
	if p.GitStrategy == GitFetch {
		for _, f := range gitLockFiles {
			w.rmfile(g.join(dir, ".git", f))
			if c.submodules != "none" {
				w.rmFilesMatching(g.join(dir, ".git", "modules"), path.Base(f))
			}
		}
		w.rmFilesMatching(g.join(dir, ".git", "refs"), "*.lock")
	}
	tmpl := g.join(p.TmpDir, "git-template")
	w.mkdir(tmpl)
	for _, kv := range [][2]string{
		{"init.defaultBranch", "none"},
		{"fetch.recurseSubmodules", "false"},
		{"credential.interactive", "never"},
		{"gc.autoDetach", "false"},
	} {
		w.run("git", "config", "-f", g.join(tmpl, "config"), kv[0], kv[1])
	}
	if p.GitStrategy == GitClone {
		w.rmdir(dir)
	}
	if c.depth > 0 {
		w.notice(fmt.Sprintf("Fetching changes with git depth set to %d...", c.depth))
	} else {
		w.notice("Fetching changes...")
	}
	if f := g.job.GitInfo.RepoObjectFormat; f != "" && f != "sha1" {
		w.run("git", "init", dir, "--template", tmpl, "--object-format", f)
	} else {
		w.run("git", "init", dir, "--template", tmpl)
	}
	w.cd(dir)
	w.ifCmd("git", "remote", "add", "origin", c.remote)
	w.notice("Created fresh repository.")
	w.orElse()
	w.run("git", "remote", "set-url", "origin", c.remote)
	w.endIf()
	if c.credHost != "" {
		helper, user := "credential."+c.credHost+".helper", "credential."+c.credHost+".username"
		// The empty value drops helpers configured before (a global
		// "store" would otherwise keep the token on disk).
		w.run("git", "config", "--replace-all", helper, "")
		w.run("git", "config", "--add", helper, credentialHelper)
		w.run("git", "config", user, c.credUser)
	}

	args := []string{"fetch", "origin", "--no-recurse-submodules"}
	args = append(args, g.job.GitInfo.Refspecs...)
	if c.depth > 0 {
		args = append(args, "--depth", strconv.Itoa(c.depth))
	}
	args = append(args, c.fetchFlags...)
	if c.depth > 0 {
		w.run("git", args...)
		return
	}
	// A full fetch into a shallow repository (an earlier job's depth)
	// must also deepen it.
	w.ifFile(g.join(dir, ".git", "shallow"))
	w.run("git", append(args, "--unshallow")...)
	w.orElse()
	w.run("git", args...)
	w.endIf()
}

// credentialArgs are -c options that give the job token to git commands
// that do not read the project's .git/config (submodule clones).
func (g *generator) credentialArgs() []string {
	c := &g.git
	if c.credHost == "" {
		return nil
	}
	helper := "credential." + c.credHost + ".helper="
	return []string{"-c", helper, "-c", helper + credentialHelper, "-c", "credential." + c.credHost + ".username=" + c.credUser}
}

// submodules writes GIT_SUBMODULE_STRATEGY's set-up of the submodules.
// Relative submodule URLs resolve against origin, which has no
// credentials: the credential helper, scoped to the server, serves them.
func (g *generator) submodules(w shellWriter) {
	c := &g.git
	if c.submodules == "none" {
		w.notice("Skipping Git submodules setup")
		return
	}
	recursive := c.submodules == "recursive"
	msg := "Updating/initializing submodules"
	if recursive {
		msg += " recursively"
	}
	if c.submoduleDepth > 0 {
		msg += fmt.Sprintf(" with git depth set to %d", c.submoduleDepth)
	}
	w.notice(msg + "...")

	var paths []string
	if len(c.submodulePaths) > 0 {
		paths = append([]string{"--"}, c.submodulePaths...)
	}
	sync := []string{"submodule", "sync"}
	update := append(g.credentialArgs(), "submodule", "update", "--init")
	foreach := []string{"submodule", "foreach"}
	if recursive {
		sync = append(sync, "--recursive")
		update = append(update, "--recursive")
		foreach = append(foreach, "--recursive")
	}
	sync = append(sync, paths...)
	if c.submoduleDepth > 0 {
		update = append(update, "--depth", strconv.Itoa(c.submoduleDepth))
	}
	update = append(update, c.submoduleFlags...)
	update = append(update, paths...)
	cleanFlags := c.cleanFlags
	if len(cleanFlags) == 0 {
		cleanFlags = defaultCleanFlags
	}
	clean := append(append(slices.Clip(foreach), "git", "clean"), cleanFlags...)
	reset := append(slices.Clip(foreach), "git", "reset", "--hard")

	w.run("git", "submodule", "init")
	w.run("git", sync...)
	w.run("git", clean...)
	w.run("git", reset...)
	w.ifCmdShown("git", update...)
	w.notice("Updated submodules")
	w.run("git", sync...)
	w.orElse()
	w.warning("Updating submodules failed. Retrying...")
	w.run("git", sync...)
	w.run("git", update...)
	w.run("git", reset...)
	w.endIf()
	w.run("git", clean...)

	if c.credHost != "" {
		// So that git in a submodule (cd sub && git fetch) finds the token
		// too. One foreach, whose single argument git runs with sh.
		w.notice("Configuring submodules to use parent git credentials...")
		helper := "credential." + c.credHost + ".helper"
		cfg := strings.Join([]string{
			posixCommand("git", []string{"config", "--replace-all", helper, ""}),
			posixCommand("git", []string{"config", "--add", helper, credentialHelper}),
			posixCommand("git", []string{"config", "credential." + c.credHost + ".username", c.credUser}),
		}, " && ")
		w.run("git", "submodule", "foreach", "--recursive", cfg)
	}
}
