package buildscript

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// recordingGit is a git stub that writes each call's arguments, NUL
// separated, to a file of its own in dir, makes the directory "git init"
// names, and succeeds.
func recordingGit(dir string) string {
	return `for a in "$@"; do printf '%s\0' "$a"; done > ` + shQuote(dir) + `/"$$"
if [ "$1" = init ]; then mkdir -p "$2"; fi
exit 0`
}

// recordedCalls reads the argument lists recordingGit wrote.
func recordedCalls(t testing.TB, dir string) [][]string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var calls [][]string
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		calls = append(calls, strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00"))
	}
	return calls
}

// findCall returns the call whose arguments start with prefix.
func findCall(calls [][]string, prefix ...string) []string {
	for _, c := range calls {
		if len(c) >= len(prefix) && slices.Equal(c[:len(prefix)], prefix) {
			return c
		}
	}
	return nil
}

// wantFlags applies gitlab-runner's rule for a flags variable.
func wantFlags(v string, def ...string) []string {
	switch v {
	case "":
		return def
	case "none":
		return nil
	}
	return strings.Fields(v)
}

// checkGitArgv generates get_sources with the given user-controlled values,
// runs it with dash against recordingGit, and checks that git received each
// value exactly: refspecs as single arguments, flags split on white space
// only, paths whole; and that nothing in them ran as shell code.
func checkGitArgv(t *testing.T, refspec, fetchFlags, cleanFlags, subFlags, dirName, ref string) {
	rec := t.TempDir()
	e := newLocalExec(t, []string{"dash", "-s"}, map[string]string{"git": recordingGit(rec)})
	dirName = strings.Map(func(r rune) rune {
		if r == '/' || r == 0 || r == '\r' || r == '\n' {
			return '_'
		}
		return r
	}, dirName)
	if dirName == "" || dirName == "." || dirName == ".." {
		dirName = "x"
	}
	builds := filepath.Join(t.TempDir(), dirName)
	job := baseJob("true")
	job.GitInfo.Refspecs = []string{"+refs/heads/main:refs/remotes/origin/main", refspec}
	job.GitInfo.Ref = ref
	job.Variables = []runnerapi.Variable{
		{Key: "GIT_STRATEGY", Value: "fetch"},
		{Key: "GIT_SUBMODULE_STRATEGY", Value: "recursive"},
		{Key: "GIT_FETCH_EXTRA_FLAGS", Value: fetchFlags, Raw: true},
		{Key: "GIT_CLEAN_FLAGS", Value: cleanFlags, Raw: true},
		{Key: "GIT_SUBMODULE_UPDATE_FLAGS", Value: subFlags, Raw: true},
		{Key: "GIT_SUBMODULE_PATHS", Value: " sub  :(exclude)sub/deep "},
	}
	p, err := Generate(job, Options{Shell: ShellSh, BuildsDir: builds})
	if err != nil {
		if strings.Contains(err.Error(), "refspecs[1]") || strings.Contains(err.Error(), "git_info.ref") ||
			strings.ContainsAny(fetchFlags+cleanFlags+subFlags, "\x00") {
			return // refused with a clear error
		}
		t.Fatalf("Generate: %v", err)
	}
	code, out := runOne(t, p, e, StageGetSources)
	if code != 0 {
		t.Fatalf("get_sources exit %d\n%s", code, out)
	}
	calls := recordedCalls(t, rec)
	sha := job.GitInfo.Sha
	helper := "credential.http://127.0.0.1.helper"
	clean := wantFlags(cleanFlags, "-ffdx")
	subClean := clean
	if len(subClean) == 0 {
		subClean = []string{"-ffdx"}
	}
	want := [][]string{
		{"init", p.ProjectDir, "--template", p.TmpDir + "/git-template"},
		append([]string{"fetch", "origin", "--no-recurse-submodules", "+refs/heads/main:refs/remotes/origin/main", refspec},
			wantFlags(fetchFlags, "--prune", "--quiet")...),
		{"-c", "submodule.recurse=false", "checkout", "-f", "-q", sha},
		append([]string{"submodule", "foreach", "--recursive", "git", "clean"}, subClean...),
		append([]string{"-c", helper + "=", "-c", helper + "=" + credentialHelper, "-c", "credential.http://127.0.0.1.username=gitlab-ci-token",
			"submodule", "update", "--init", "--recursive"}, append(wantFlags(subFlags), "--", "sub", ":(exclude)sub/deep")...),
		{"submodule", "sync", "--recursive", "--", "sub", ":(exclude)sub/deep"},
		{"submodule", "foreach", "--recursive", "'git' 'config' '--replace-all' 'credential.http://127.0.0.1.helper' '' && " +
			"'git' 'config' '--add' 'credential.http://127.0.0.1.helper' '" + credentialHelper + "' && " +
			"'git' 'config' 'credential.http://127.0.0.1.username' 'gitlab-ci-token'"},
	}
	if len(clean) > 0 {
		want = append(want, append([]string{"clean"}, clean...))
	}
	for _, w := range want {
		got := findCall(calls, w[:min(len(w), 5)]...)
		if !slices.Equal(got, w) {
			t.Errorf("git call\n got %q\nwant %q", got, w)
		}
	}
	// 4 template configs, init, remote add, 3 credential configs, fetch,
	// checkout, clean?, submodule init, sync x2, foreach clean x2, foreach
	// reset, update, foreach config.
	n := 19
	if len(clean) > 0 {
		n++
	}
	if len(calls) != n {
		t.Errorf("%d git calls, want %d: %q", len(calls), n, calls)
	}
	if notice := "Checking out " + sha[:8] + " as detached HEAD (ref is " + ref + ")...\x1b[0;m\n"; !strings.Contains(out, notice) {
		t.Errorf("output lacks %q:\n%s", notice, out)
	}
	filepath.WalkDir(filepath.Dir(builds), func(path string, d os.DirEntry, err error) error {
		if err == nil && d.Name() == "pwned" {
			t.Errorf("a value ran as shell code: %s exists", path)
		}
		return nil
	})
}

// FuzzGitArgv feeds user-controlled values (a refspec, the flags variables,
// a builds_dir and the ref) into get_sources and checks git sees them
// exactly; the seeds are the package's nasty values.
func FuzzGitArgv(f *testing.F) {
	for _, v := range nastyValues {
		f.Add(v, v, v, v, v, v)
	}
	f.Add("+refs/pipelines/1:refs/pipelines/1", "--prune --depth=3", "-ffdx -e '*.log'", "--remote --jobs 4", "with space", "feature/x")
	f.Add("$(touch pwned)", "; touch pwned", "`touch pwned`", "&& touch pwned", "$(touch pwned)", "'; touch pwned; '")
	f.Fuzz(checkGitArgv)
}

// TestPowerShellGitText checks the PowerShell forms that differ from a
// plain command: empty arguments, conditions, the unshallow branch.
func TestPowerShellGitText(t *testing.T) {
	j := baseJob("true")
	j.Variables = []runnerapi.Variable{{Key: "GIT_STRATEGY", Value: "fetch"}, {Key: "GIT_SUBMODULE_STRATEGY", Value: "normal"}}
	p, err := Generate(j, Options{Shell: ShellPowerShell, BuildsDir: `C:\b`})
	if err != nil {
		t.Fatal(err)
	}
	s := stage(t, p, StageGetSources).Script
	for _, f := range []string{
		"$__mayfly_empty = if ([Version]$PSVersionTable.PSVersion -lt [Version]'7.3') { '\"\"' } else { '' }\r\n",
		"if (Test-Path -LiteralPath 'C:\\b\\grp\\demo\\.git\\shallow' -PathType Leaf) {\r\n& 'git' 'fetch' 'origin' '--no-recurse-submodules' '--prune' '--quiet' '--unshallow'\r\n",
		"} else {\r\n& 'git' 'fetch' 'origin' '--no-recurse-submodules' '--prune' '--quiet'\r\n",
		"if (Test-Path -LiteralPath 'C:\\b\\grp\\demo\\.git\\modules' -PathType Container) { Get-ChildItem -LiteralPath 'C:\\b\\grp\\demo\\.git\\modules' -Recurse -Force -File | Where-Object { $_.Name -like 'index.lock' } | Remove-Item -Force }\r\n",
		"try { & 'git' '-c' 'credential.http://127.0.0.1.helper=' '-c' 'credential.http://127.0.0.1.helper=" + credentialHelper + "' '-c' 'credential.http://127.0.0.1.username=gitlab-ci-token' 'submodule' 'update' '--init'; $__mayfly_ok = ($LASTEXITCODE -eq 0) } catch { }\r\nif ($__mayfly_ok) {\r\n",
		"Write-Output ($__mayfly_esc + '[0;33m' + 'Updating submodules failed. Retrying...' + $__mayfly_esc + '[0;m')",
	} {
		if !strings.Contains(s, f) {
			t.Errorf("get_sources lacks %q\n%s", f, s)
		}
	}
}

// TestGitSettings: unusable optional values fall back to gitlab-runner's
// defaults with a warning the trace shows; GIT_DEPTH counts when the
// payload has no depth.
func TestGitSettings(t *testing.T) {
	for _, tt := range []struct {
		name     string
		vars     []runnerapi.Variable
		mutate   func(*runnerapi.JobResponse)
		strategy string
		attempts int
		warning  string // "" = none
		inScript string
	}{
		{"defaults", nil, nil, "clone", 1, "", "'fetch' 'origin' '--no-recurse-submodules' '--prune' '--quiet'\n"},
		{"allow_git_fetch", nil, func(j *runnerapi.JobResponse) { j.AllowGitFetch = true }, "fetch", 1, "", "'rm' '-f' '/builds/grp/demo/.git/index.lock'\n"},
		{"unknown strategy", []runnerapi.Variable{{Key: "GIT_STRATEGY", Value: "rsync"}}, nil, "clone", 1, `GIT_STRATEGY "rsync": want clone, fetch, none or empty; using clone`, ""},
		{"bad checkout", []runnerapi.Variable{{Key: "GIT_CHECKOUT", Value: "maybe"}}, nil, "clone", 1, `GIT_CHECKOUT "maybe"`, "'checkout' '-f' '-q'"},
		{"checkout 0", []runnerapi.Variable{{Key: "GIT_CHECKOUT", Value: "0"}}, nil, "clone", 1, "", "Skipping Git checkout"},
		{"GIT_DEPTH", []runnerapi.Variable{{Key: "GIT_DEPTH", Value: "3"}}, nil, "clone", 1, "", "'--depth' '3' '--prune' '--quiet'\n"},
		{"payload depth wins", []runnerapi.Variable{{Key: "GIT_DEPTH", Value: "3"}}, func(j *runnerapi.JobResponse) { j.GitInfo.Depth = 7 }, "clone", 1, "", "'--depth' '7' '--prune'"},
		{"negative GIT_DEPTH", []runnerapi.Variable{{Key: "GIT_DEPTH", Value: "-1"}}, nil, "clone", 1, `GIT_DEPTH "-1"`, "'--unshallow'"},
		{"attempts clamped", []runnerapi.Variable{{Key: "GET_SOURCES_ATTEMPTS", Value: "20"}}, nil, "clone", 10, `GET_SOURCES_ATTEMPTS "20": want a number from 1 to 10; using 10`, "get_sources.42.attempted"},
		{"attempts not a number", []runnerapi.Variable{{Key: "GET_SOURCES_ATTEMPTS", Value: "x"}}, nil, "clone", 1, `GET_SOURCES_ATTEMPTS "x"`, ""},
		{"other password", nil, func(j *runnerapi.JobResponse) { j.GitInfo.RepoURL = "https://gitlab-ci-token:other@h.example/g/p.git" }, "clone", 1,
			"password that is not CI_JOB_TOKEN", "'remote' 'add' 'origin' 'https://h.example/g/p.git'"},
		{"ssh remote", nil, func(j *runnerapi.JobResponse) { j.GitInfo.RepoURL = "git@h.example:g/p.git" }, "clone", 1, "", "'remote' 'add' 'origin' 'git@h.example:g/p.git'"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			j := baseJob("true")
			j.Variables = tt.vars
			if tt.mutate != nil {
				tt.mutate(j)
			}
			p, err := Generate(j, Options{})
			if err != nil {
				t.Fatal(err)
			}
			gs := stage(t, p, StageGetSources)
			if p.GitStrategy != tt.strategy || gs.Attempts != tt.attempts {
				t.Errorf("strategy %s attempts %d, want %s %d", p.GitStrategy, gs.Attempts, tt.strategy, tt.attempts)
			}
			switch {
			case tt.warning == "" && len(p.Warnings) > 0:
				t.Errorf("warnings %q", p.Warnings)
			case tt.warning != "" && (len(p.Warnings) != 1 || !strings.Contains(p.Warnings[0], tt.warning)):
				t.Errorf("warnings %q, want one with %q", p.Warnings, tt.warning)
			}
			if !strings.Contains(gs.Script, tt.inScript) {
				t.Errorf("get_sources lacks %q:\n%s", tt.inScript, gs.Script)
			}
			if strings.Contains(gs.Script, "credential.https://h.example.helper") != strings.HasPrefix(j.GitInfo.RepoURL, "https://") {
				t.Error("credential helper for the wrong remote")
			}
		})
	}
}
