package buildscript

import (
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// TestMalformedPayload: bad payloads and options fail with an error naming
// the field at fault.
func TestMalformedPayload(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(j *runnerapi.JobResponse, o *Options)
		want   string
	}{
		{"nil job", nil, "job payload: missing"},
		{"no steps", func(j *runnerapi.JobResponse, o *Options) { j.Steps = nil }, "steps: empty"},
		{"only after_script", func(j *runnerapi.JobResponse, o *Options) {
			j.Steps = []runnerapi.Step{{Name: "after_script", Script: []string{"x"}}}
		}, `steps: no "script" step`},
		{"step without name", func(j *runnerapi.JobResponse, o *Options) { j.Steps[0].Name = "" }, "steps[0].name: empty"},
		{"step with odd name", func(j *runnerapi.JobResponse, o *Options) { j.Steps[0].Name = "a b" }, `steps[0].name "a b"`},
		{"NUL in command", func(j *runnerapi.JobResponse, o *Options) { j.Steps[0].Script = []string{"a\x00b"} }, "steps[0].script[0]: contains a NUL"},
		{"short sha", func(j *runnerapi.JobResponse, o *Options) { j.Variables = nil; j.GitInfo.Sha = "abc123" }, `git_info.sha "abc123": want at least 8 hex digits`},
		{"non-hex sha", func(j *runnerapi.JobResponse, o *Options) { j.Variables = nil; j.GitInfo.Sha = "zzzzzzzzzz" }, `git_info.sha "zzzzzzzzzz"`},
		{"no repo url", func(j *runnerapi.JobResponse, o *Options) { j.Variables = nil; j.GitInfo.RepoURL = "" }, "git_info.repo_url: empty"},
		{"bad submodule strategy", func(j *runnerapi.JobResponse, o *Options) {
			j.Variables = append(j.Variables, runnerapi.Variable{Key: "GIT_SUBMODULE_STRATEGY", Value: "all"})
		}, `variable GIT_SUBMODULE_STRATEGY "all"`},
		{"bad shell", func(j *runnerapi.JobResponse, o *Options) { o.Shell = "zsh" }, `shell "zsh": want bash, sh, pwsh or powershell`},
		{"relative builds_dir", func(j *runnerapi.JobResponse, o *Options) { o.BuildsDir = "builds" }, `builds_dir "builds": want an absolute path`},
		{"bad environment", func(j *runnerapi.JobResponse, o *Options) { o.Environment = []string{"NOEQUALS"} }, `environment[0] "NOEQUALS": want KEY=VALUE`},
		{"no job id", func(j *runnerapi.JobResponse, o *Options) { j.ID = 0 }, "id 0"},
		{"no token", func(j *runnerapi.JobResponse, o *Options) { j.Token = "" }, "token: empty"},
		{"empty variable key", func(j *runnerapi.JobResponse, o *Options) {
			j.Variables = append(j.Variables, runnerapi.Variable{Value: "x"})
		}, "variables[1].key: empty"},
		{"NUL in variable", func(j *runnerapi.JobResponse, o *Options) {
			j.Variables = append(j.Variables, runnerapi.Variable{Key: "K", Value: "a\x00"})
		}, "variables[1] (K).value: contains a NUL"},
		{"negative depth", func(j *runnerapi.JobResponse, o *Options) { j.GitInfo.Depth = -1 }, "git_info.depth -1"},
		{"bad refspec", func(j *runnerapi.JobResponse, o *Options) { j.GitInfo.Refspecs = []string{"a\nb"} }, "git_info.refspecs[0]"},
		{"option as refspec", func(j *runnerapi.JobResponse, o *Options) {
			j.GitInfo.Refspecs = []string{"+refs/heads/*:refs/remotes/origin/*", "--upload-pack=touch /tmp/x"}
		}, "git_info.refspecs[1]"},
		{"option as repo_url", func(j *runnerapi.JobResponse, o *Options) { j.Variables = nil; j.GitInfo.RepoURL = "--upload-pack=x" }, "git_info.repo_url: starts with -"},
		{"submodule exclusion", func(j *runnerapi.JobResponse, o *Options) {
			j.Variables = []runnerapi.Variable{{Key: "GIT_SUBMODULE_STRATEGY", Value: "normal"}, {Key: "GIT_SUBMODULE_PATHS", Value: ":(exclude) sub"}}
		}, "GIT_SUBMODULE_PATHS"},
		{"NUL in post_clone_script", func(j *runnerapi.JobResponse, o *Options) { o.PostCloneScript = "a\x00" }, "post_clone_script: contains a NUL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var j *runnerapi.JobResponse
			var o Options
			if tt.mutate != nil {
				j = baseJob("true")
				tt.mutate(j, &o)
			}
			_, err := Generate(j, o)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err %v, want it to contain %q", err, tt.want)
			}
		})
	}
}

// TestNoneNeedsNoGitInfo: with GIT_STRATEGY=none, sha and repo_url are not needed.
func TestNoneNeedsNoGitInfo(t *testing.T) {
	j := baseJob("true")
	j.GitInfo = runnerapi.GitInfo{Sha: "short"}
	if _, err := Generate(j, Options{}); err != nil {
		t.Fatal(err)
	}
}

// TestDefaultGitStrategy: allow_git_fetch picks fetch, else clone.
func TestDefaultGitStrategy(t *testing.T) {
	for _, fetch := range []bool{false, true} {
		j := baseJob("true")
		j.Variables = nil
		j.AllowGitFetch = fetch
		p, err := Generate(j, Options{})
		if err != nil {
			t.Fatal(err)
		}
		want := map[bool]string{false: "clone", true: "fetch"}[fetch]
		if p.GitStrategy != want {
			t.Errorf("allow_git_fetch %v: strategy %s, want %s", fetch, p.GitStrategy, want)
		}
	}
}

// TestStagesLayout checks which stages exist, their order, when they run,
// their timeouts, the secrets and the warnings.
func TestStagesLayout(t *testing.T) {
	j := baseJob("make")
	j.Steps = append(j.Steps,
		runnerapi.Step{Name: "release", Script: []string{"release-cli"}},
		runnerapi.Step{Name: "after_script", Script: []string{"echo bye"}, AllowFailure: true})
	j.Cache = []runnerapi.Cache{{Key: "k", Paths: []string{"vendor/"}}}
	j.Artifacts = []runnerapi.Artifact{{Paths: []string{"out/"}, When: "always"}}
	j.Dependencies = []runnerapi.Dependency{{ID: 1, Token: "t", ArtifactsFile: runnerapi.ArtifactsFile{Filename: "a.zip"}}}
	j.Variables = append(j.Variables,
		runnerapi.Variable{Key: "PASS", Value: "p@ss word", Masked: true},
		runnerapi.Variable{Key: "bad-name", Value: "hidden-but-masked", Masked: true},
		runnerapi.Variable{Key: "RUNNER_AFTER_SCRIPT_TIMEOUT", Value: "soon"},
		runnerapi.Variable{Key: "GET_SOURCES_ATTEMPTS", Value: "3"},
	)
	j.RunnerInfo.Timeout = 0
	p, err := Generate(j, Options{})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, s := range p.Stages {
		got = append(got, fmt.Sprintf("%s/%s/%v/%v", s.Name, s.When, s.AllowFailure, s.User))
	}
	want := []string{
		"prepare_script/on_success/false/false",
		"get_sources/on_success/false/false",
		"restore_cache/on_success/false/false",
		"download_artifacts/on_success/false/false",
		"step_script/on_success/false/true",
		"step_release/on_success/false/true",
		"after_script/always/true/false",
		"archive_cache/on_success/true/false",
		"upload_artifacts_on_success/on_success/false/false",
		"upload_artifacts_on_failure/on_failure/false/false",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("stages:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if d := stage(t, p, StageAfterScript).Timeout; d != DefaultAfterScriptTimeout {
		t.Errorf("after_script timeout %v", d)
	}
	if n := stage(t, p, StageGetSources).Attempts; n != 3 {
		t.Errorf("get_sources attempts %d", n)
	}
	if p.JobTimeout != 2*time.Hour {
		t.Errorf("job timeout %v", p.JobTimeout)
	}
	if stage(t, p, "step_release").Title != `Executing "step_release" stage of the job script` {
		t.Errorf("title %q", stage(t, p, "step_release").Title)
	}
	secrets := strings.Join(p.Secrets, "|")
	if secrets != "p@ss word|hidden-but-masked|jt-0123456789" {
		t.Errorf("secrets %q", secrets)
	}
	warnings := strings.Join(p.Warnings, "\n")
	for _, w := range []string{`"bad-name"`, `RUNNER_AFTER_SCRIPT_TIMEOUT "soon"`} {
		if !strings.Contains(warnings, w) {
			t.Errorf("warnings lack %s:\n%s", w, warnings)
		}
	}
	if strings.Contains(stage(t, p, StageStepScript).Script, "bad-name") {
		t.Error("an invalid variable name was exported")
	}
}

// TestPowerShellQuoting checks the PowerShell text: pwsh is not installed
// here, so these scripts are not executed; the expected fragments follow
// PowerShell's single-quoted string rules (only ' and the typographic single
// quotes are special, each written twice; newlines stay literal).
func TestPowerShellQuoting(t *testing.T) {
	if _, err := exec.LookPath("pwsh"); err == nil {
		t.Log("pwsh is installed but this test still only checks the text")
	}
	quotes := []struct{ in, want string }{
		{"", `''`},
		{"plain", `'plain'`},
		{"it's", `'it''s'`},
		{`double "quoted"`, `'double "quoted"'`},
		{"$env:PATH $(Get-Date) `n", "'$env:PATH $(Get-Date) `n'"},
		{"‘smart’ ‚low‛", "'‘‘smart’’ ‚‚low‛‛'"},
		{"line1\nline2", "'line1\nline2'"},
		{`C:\path\with\backslash\`, `'C:\path\with\backslash\'`},
		{"unicode żółć 🚀", "'unicode żółć 🚀'"},
		{"#not a comment", "'#not a comment'"},
	}
	for _, q := range quotes {
		if got := psQuote(q.in); got != q.want {
			t.Errorf("psQuote(%q) = %q, want %q", q.in, got, q.want)
		}
	}

	j := baseJob("Write-Output $env:V0", "exit 3")
	j.Steps = append(j.Steps, runnerapi.Step{Name: "after_script", Script: []string{"echo after"}})
	for i, q := range quotes {
		j.Variables = append(j.Variables, runnerapi.Variable{Key: fmt.Sprintf("V%d", i), Value: q.in, Raw: true})
	}
	j.Variables = append(j.Variables, runnerapi.Variable{Key: "FILEVAR", Value: "secret content", File: true})
	for _, shell := range []string{ShellPwsh, ShellPowerShell} {
		t.Run(shell, func(t *testing.T) {
			p, err := Generate(j, Options{Shell: shell, BuildsDir: `C:\builds`})
			if err != nil {
				t.Fatal(err)
			}
			eol := "\n"
			if shell == ShellPowerShell {
				eol = "\r\n"
			}
			if p.ProjectDir != `C:\builds\grp\demo` || p.TmpDir != `C:\builds\grp\demo.tmp` {
				t.Fatalf("dirs %q %q", p.ProjectDir, p.TmpDir)
			}
			if len(p.Files) != 1 || p.Files[0].Path != `C:\builds\grp\demo.tmp\FILEVAR` || string(p.Files[0].Content) != "secret content" {
				t.Fatalf("files %+v", p.Files)
			}
			step := p.Script(stage(t, p, StageStepScript), JobStatusRunning)
			frags := []string{
				"$env:CI_JOB_STATUS = 'running'" + eol + "& {" + eol + `$ErrorActionPreference = "Stop"` + eol,
				"$env:CI_PROJECT_DIR = 'C:\\builds\\grp\\demo'" + eol,
				"$env:FILEVAR = 'C:\\builds\\grp\\demo.tmp\\FILEVAR'" + eol,
				"Set-Location -LiteralPath 'C:\\builds\\grp\\demo'" + eol + psCheck + eol,
				"Write-Output ($__mayfly_esc + '[32;1m' + '$ Write-Output $env:V0' + $__mayfly_esc + '[0;m')" + eol +
					"Write-Output $env:V0" + eol + psCheck + eol,
				"exit 3" + eol + psCheck + eol,
			}
			for i, q := range quotes {
				frags = append(frags, fmt.Sprintf("$env:V%d = %s%s", i, q.want, eol))
			}
			for _, f := range frags {
				if !strings.Contains(step, f) {
					t.Errorf("step_script lacks %q", f)
				}
			}
			if strings.Contains(step, "secret content") {
				t.Error("file variable content is in the script; it belongs in Plan.Files")
			}
			if !strings.HasSuffix(step, "}"+eol) {
				t.Errorf("script does not end the block: %q", step[len(step)-20:])
			}
			if shell == ShellPowerShell && strings.Contains(strings.ReplaceAll(step, "\r\n", ""), "\n") {
				// The only bare LF allowed is inside the multi-line value.
				if strings.Count(step, "\n")-strings.Count(step, "\r\n") != 1 {
					t.Error("powershell script has LF line ends outside values")
				}
			}
			after := p.Script(stage(t, p, StageAfterScript), JobStatusFailed)
			if !strings.HasPrefix(after, "$env:CI_JOB_STATUS = 'failed'"+eol) {
				t.Errorf("after_script status prefix: %q", after[:40])
			}
		})
	}
}

// TestPowerShellGetSources checks the git commands in PowerShell text.
func TestPowerShellGetSources(t *testing.T) {
	j := baseJob("true")
	j.Variables = nil
	j.GitInfo.Refspecs = []string{"+refs/heads/main:refs/remotes/origin/main"}
	j.GitInfo.Depth = 5
	p, err := Generate(j, Options{Shell: ShellPwsh, BuildsDir: `C:\b`})
	if err != nil {
		t.Fatal(err)
	}
	s := stage(t, p, StageGetSources).Script
	for _, f := range []string{
		"& 'git' 'init' 'C:\\b\\grp\\demo' '--template' 'C:\\b\\grp\\demo.tmp\\git-template'\n" + psCheck,
		"try { & 'git' 'remote' 'add' 'origin' 'http://127.0.0.1/grp/demo.git' 2>$null | Out-Null;",
		"& 'git' 'config' '--replace-all' 'credential.http://127.0.0.1.helper' $__mayfly_empty\n" + psCheck,
		"& 'git' 'config' '--add' 'credential.http://127.0.0.1.helper' '" + credentialHelper + "'\n" + psCheck,
		"& 'git' 'fetch' 'origin' '--no-recurse-submodules' '+refs/heads/main:refs/remotes/origin/main' '--depth' '5' '--prune' '--quiet'\n" + psCheck,
		"& 'git' '-c' 'submodule.recurse=false' 'checkout' '-f' '-q' '" + strings.Repeat("a", 40) + "'\n" + psCheck,
		"$__mayfly_empty = if ([Version]$PSVersionTable.PSVersion -lt [Version]'7.3') { '\"\"' } else { '' }\n",
		"if (Test-Path -LiteralPath 'C:\\b\\grp\\demo') { Remove-Item -LiteralPath 'C:\\b\\grp\\demo' -Recurse -Force }",
	} {
		if !strings.Contains(s, f) {
			t.Errorf("get_sources lacks %q\n%s", f, s)
		}
	}
}

// TestDecide is the result decision table.
func TestDecide(t *testing.T) {
	ok := func(n StageName) Outcome { return Outcome{Stage: n} }
	exit := func(n StageName, c int) Outcome { return Outcome{Stage: n, ExitCode: c} }
	after := func(c int) Outcome { return Outcome{Stage: StageAfterScript, AllowFailure: true, ExitCode: c} }
	sysErr := errors.New("ssh: connection lost")
	tests := []struct {
		name     string
		outcomes []Outcome
		end      JobEnd
		want     Result
	}{
		{"all ok", []Outcome{ok(StagePrepare), ok(StageGetSources), ok(StageStepScript), after(0)}, JobEnd{},
			Result{State: "success"}},
		{"script exit 3", []Outcome{ok(StageGetSources), exit(StageStepScript, 3), after(0)}, JobEnd{},
			Result{State: "failed", FailureReason: "script_failure", ExitCode: 3, Message: "exit code 3"}},
		{"after_script fails, job ok", []Outcome{ok(StageStepScript), after(1)}, JobEnd{},
			Result{State: "success"}},
		{"after_script fails, job failed: script code kept", []Outcome{exit(StageStepScript, 2), after(9)}, JobEnd{},
			Result{State: "failed", FailureReason: "script_failure", ExitCode: 2, Message: "exit code 2"}},
		{"after_script timed out", []Outcome{ok(StageStepScript), {Stage: StageAfterScript, AllowFailure: true, TimedOut: true}}, JobEnd{},
			Result{State: "success"}},
		{"allow_failure step", []Outcome{{Stage: StageStepScript, AllowFailure: true, ExitCode: 1}}, JobEnd{},
			Result{State: "success"}},
		{"git fails", []Outcome{exit(StageGetSources, 128)}, JobEnd{},
			Result{State: "failed", FailureReason: "script_failure", ExitCode: 128, Message: "exit code 128"}},
		{"system failure", []Outcome{ok(StagePrepare), {Stage: StageStepScript, Err: sysErr}}, JobEnd{},
			Result{State: "failed", FailureReason: "runner_system_failure", Message: "ssh: connection lost"}},
		{"stage timeout", []Outcome{{Stage: StageStepScript, TimedOut: true, Timeout: time.Minute}}, JobEnd{},
			Result{State: "failed", FailureReason: "job_execution_timeout", Message: "step_script took longer than 1m0s"}},
		{"job timeout wins", []Outcome{{Stage: StageStepScript, Err: sysErr}}, JobEnd{TimedOut: true, Timeout: time.Hour},
			Result{State: "failed", FailureReason: "job_execution_timeout", Message: "execution took longer than 1h0m0s seconds"}},
		{"canceled, reason not accepted", []Outcome{{Stage: StageStepScript, Err: sysErr}}, JobEnd{Canceled: true},
			Result{State: "failed", FailureReason: "unknown_failure", Message: "canceled"}},
		{"canceled, reason accepted", nil, JobEnd{Canceled: true, FailureReasons: []string{"job_canceled"}},
			Result{State: "failed", FailureReason: "job_canceled", Message: "canceled"}},
		{"first failure decides", []Outcome{exit(StageStepScript, 4), exit(StageUploadArtifactsOnFailure, 1)}, JobEnd{},
			Result{State: "failed", FailureReason: "script_failure", ExitCode: 4, Message: "exit code 4"}},
		{"nothing ran", nil, JobEnd{}, Result{State: "success"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Decide(tt.outcomes, tt.end)
			if got.State != tt.want.State || got.FailureReason != tt.want.FailureReason ||
				got.ExitCode != tt.want.ExitCode || got.Message != tt.want.Message || len(got.Outcomes) != len(tt.outcomes) {
				t.Fatalf("Decide = %+v, want %+v", got, tt.want)
			}
		})
	}
}

// TestTraceLines checks the helpers against lines of the captured traces.
func TestTraceLines(t *testing.T) {
	ts := time.Unix(1795417517, 0)
	tests := []struct{ got, want string }{
		{SectionStart(ts, "prepare_script", "Preparing environment"),
			"section_start:1795417517:prepare_script\r\x1b[0K\x1b[0K\x1b[36;1mPreparing environment\x1b[0;m\x1b[0;m\n"},
		{SectionEnd(ts, "get_sources"), "section_end:1795417517:get_sources\r\x1b[0K"},
		{Header("gitlab-runner development version (HEAD)", "", "runner-t"),
			"\x1b[0KRunning with gitlab-runner development version (HEAD)\x1b[0;m\n\x1b[0K  on  runner-t\x1b[0;m\n"},
		{JobSucceeded(), "\x1b[32;1mJob succeeded\x1b[0;m\n"},
		{JobFailed("canceled"), "\x1b[31;1mERROR: Job failed: canceled\n\x1b[0;m\n"},
		{FinalLine(Result{State: "failed", Message: "exit code 3"}), "\x1b[31;1mERROR: Job failed: exit code 3\n\x1b[0;m\n"},
		{ShortToken("glrt-abcdefghijkl"), "abcdefgh"},
		{ShortToken("abc"), "abc"},
		{Title(StageStepScript), `Executing "step_script" stage of the job script`},
		{Title(StageAfterScript), "Running after_script"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
}
