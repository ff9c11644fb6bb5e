package buildscript

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// nastyValues are variable values that break naive quoting.
var nastyValues = []string{
	"",
	"plain",
	"with space",
	"it's",
	`double "quoted"`,
	`'\''`,
	`$HOME`,
	`${HOME}`,
	"$(touch pwned)",
	"`touch pwned`",
	`back\slash\\ and \n literal`,
	"line1\nline2\n",
	"crlf\r\nline",
	"tab\there",
	"trailing backslash\\",
	"-n",
	"-e \\x41",
	"%s%d%%",
	"*",
	"!bang !! history",
	"; rm -rf / #",
	"unicode: żółć 日本語 🚀",
	"\x1b[31mansi\x1b[0m",
	"}\n{ oops",
	"EOF\nEOF",
}

// posixShells are the shells the POSIX generator is executed with.
func posixShells() []struct {
	shell   string
	program []string
} {
	return []struct {
		shell   string
		program []string
	}{
		{ShellBash, bashProgram()},
		{ShellSh, []string{"dash", "-s"}},
		{ShellSh, []string{"busybox", "sh", "-s"}},
	}
}

// TestVariablesExported runs a generated step with real shells and checks each
// variable arrives byte for byte: raw values with no expansion at all, file
// variables as a path to a file holding the value.
func TestVariablesExported(t *testing.T) {
	for _, sh := range posixShells() {
		t.Run(sh.shell+"/"+sh.program[0], func(t *testing.T) {
			e := newLocalExec(t, sh.program, nil)
			outDir := t.TempDir()
			job := baseJob()
			var script []string
			for i, v := range nastyValues {
				k := fmt.Sprintf("V%d", i)
				job.Variables = append(job.Variables,
					runnerapi.Variable{Key: k, Value: v, Raw: true},
					runnerapi.Variable{Key: "F" + k, Value: v, File: true, Raw: true})
				script = append(script,
					fmt.Sprintf(`printf '%%s' "$%s" > %s/%s`, k, outDir, k),
					fmt.Sprintf(`cp "$F%s" %s/F%s`, k, outDir, k),
					fmt.Sprintf(`printf '%%s' "$F%s" > %s/P%s`, k, outDir, k))
			}
			job.Steps[0].Script = script
			p, err := Generate(job, Options{Shell: sh.shell, BuildsDir: t.TempDir()})
			if err != nil {
				t.Fatal(err)
			}
			upload(t, p)
			if code, out := runOne(t, p, e, StageGetSources); code != 0 {
				t.Fatalf("get_sources: exit %d\n%s", code, out)
			}
			if code, out := runOne(t, p, e, StageStepScript); code != 0 {
				t.Fatalf("step_script: exit %d\n%s", code, out)
			}
			for i, want := range nastyValues {
				k := fmt.Sprintf("V%d", i)
				for _, f := range []struct{ file, want string }{
					{k, want},
					{"F" + k, want},
					{"P" + k, filepath.Join(p.TmpDir, "F"+k)},
				} {
					got, err := os.ReadFile(filepath.Join(outDir, f.file))
					if err != nil {
						t.Fatal(err)
					}
					if string(got) != f.want {
						t.Errorf("%s (value %q): got %q, want %q", f.file, want, got, f.want)
					}
				}
			}
			if _, err := os.Stat(filepath.Join(p.ProjectDir, "pwned")); err == nil {
				t.Error("a variable value was executed")
			}
		})
	}
}

// TestVariableExpansion checks gitlab-runner's expansion of non-raw values:
// one level, against the job's own variables, file variables as their path.
func TestVariableExpansion(t *testing.T) {
	e := newLocalExec(t, bashProgram(), nil)
	out := t.TempDir()
	job := baseJob(
		`printf '%s|' "$A" "$B" "$C" "$D" "$E" "$R" > ` + out + `/vals`,
	)
	job.Variables = append(job.Variables,
		runnerapi.Variable{Key: "BASE", Value: "base"},
		runnerapi.Variable{Key: "A", Value: "$BASE/x"},
		runnerapi.Variable{Key: "B", Value: "${A}-y"},      // one level: sees A unexpanded
		runnerapi.Variable{Key: "C", Value: "$UNDEFINED."}, // not a job variable: empty
		runnerapi.Variable{Key: "D", Value: "cost $$5"},
		runnerapi.Variable{Key: "FV", Value: "content", File: true},
		runnerapi.Variable{Key: "E", Value: "$FV"},
		runnerapi.Variable{Key: "R", Value: "$BASE", Raw: true},
	)
	p, err := Generate(job, Options{BuildsDir: t.TempDir(), Environment: []string{"BASE=from-config", "CFG=1"}})
	if err != nil {
		t.Fatal(err)
	}
	upload(t, p)
	runOne(t, p, e, StageGetSources)
	if code, o := runOne(t, p, e, StageStepScript); code != 0 {
		t.Fatalf("exit %d\n%s", code, o)
	}
	got, _ := os.ReadFile(filepath.Join(out, "vals"))
	want := "base/x|$BASE/x-y|.|cost $5|" + filepath.Join(p.TmpDir, "FV") + "|$BASE|"
	if string(got) != want {
		t.Fatalf("got %q\nwant %q", got, want)
	}
}

// TestBuiltinVariables checks the runner's own variables and that job
// variables override config environment, which overrides builtins.
func TestBuiltinVariables(t *testing.T) {
	e := newLocalExec(t, bashProgram(), nil)
	job := baseJob(`printf '%s\n' "CI=$CI" "JOB=$CI_JOB_ID" "DIR=$CI_PROJECT_DIR" "BUILDS=$CI_BUILDS_DIR" "PWD=$PWD" "STATUS=$CI_JOB_STATUS" "X=$X" "Y=$Y" "SHA=$CI_COMMIT_SHORT_SHA"`)
	job.Variables = append(job.Variables, runnerapi.Variable{Key: "X", Value: "job"})
	builds := t.TempDir()
	p, err := Generate(job, Options{BuildsDir: builds, Environment: []string{"X=config", "Y=config"}})
	if err != nil {
		t.Fatal(err)
	}
	if p.ProjectDir != builds+"/grp/demo" || p.TmpDir != builds+"/grp/demo.tmp" {
		t.Fatalf("ProjectDir %q TmpDir %q", p.ProjectDir, p.TmpDir)
	}
	runOne(t, p, e, StageGetSources)
	_, out := runOne(t, p, e, StageStepScript)
	for _, want := range []string{
		"CI=true", "JOB=42", "DIR=" + p.ProjectDir, "BUILDS=" + builds, "PWD=" + p.ProjectDir,
		"STATUS=running", "X=job", "Y=config", "SHA=aaaaaaaa",
	} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

// TestStopsAtFirstFailure checks errexit and pipefail: the stage stops at the
// first failing command and exits with its code.
func TestStopsAtFirstFailure(t *testing.T) {
	tests := []struct {
		name     string
		script   []string
		wantCode int
		seen     []string
		notSeen  []string
	}{
		{"exit 3", []string{"echo one", "exit 3", "echo never"}, 3, []string{"one\n", "$ exit 3"}, []string{"never", "$ echo never"}},
		{"false", []string{"false", "echo never"}, 1, nil, []string{"never"}},
		{"child code", []string{"sh -c 'exit 7'", "echo never"}, 7, nil, []string{"never"}},
		{"pipefail", []string{"false | cat", "echo never"}, 1, nil, []string{"never"}},
		{"missing command", []string{"no-such-command-xyz", "echo never"}, 127, nil, []string{"never"}},
		{"multi-line", []string{"echo a\necho b\nexit 4", "echo never"}, 4, []string{"$ echo a # collapsed multi-line command", "a\nb\n"}, []string{"never"}},
		{"all good", []string{"echo a", "true"}, 0, []string{"a\n"}, nil},
		{"stdin is empty", []string{"cat", "echo after-cat"}, 0, []string{"after-cat"}, nil},
	}
	for _, sh := range posixShells() {
		for _, tt := range tests {
			t.Run(sh.program[0]+"/"+tt.name, func(t *testing.T) {
				e := newLocalExec(t, sh.program, nil)
				p, err := Generate(baseJob(tt.script...), Options{Shell: sh.shell, BuildsDir: t.TempDir()})
				if err != nil {
					t.Fatal(err)
				}
				runOne(t, p, e, StageGetSources)
				code, out := runOne(t, p, e, StageStepScript)
				if tt.name == "pipefail" && !hasPipefail(sh.program) {
					// dash has no pipefail; the sh script enables it only where it exists.
					tt.wantCode, tt.notSeen = 0, nil
				}
				if code != tt.wantCode {
					t.Fatalf("exit code %d, want %d\n%s", code, tt.wantCode, out)
				}
				for _, s := range tt.seen {
					if !strings.Contains(out, s) {
						t.Errorf("output lacks %q:\n%s", s, out)
					}
				}
				for _, s := range tt.notSeen {
					if strings.Contains(out, s) {
						t.Errorf("output has %q:\n%s", s, out)
					}
				}
			})
		}
	}
}

// hasPipefail reports whether the shell knows set -o pipefail.
func hasPipefail(program []string) bool {
	args := append(append([]string{}, program[:len(program)-1]...), "-c", "set -o pipefail")
	return exec.Command(args[0], args[1:]...).Run() == nil
}

// TestAfterScriptAfterFailure runs whole plans: after_script runs after a
// failed script, sees CI_JOB_STATUS, and its own failure changes nothing.
func TestAfterScriptAfterFailure(t *testing.T) {
	tests := []struct {
		name      string
		script    []string
		after     []string
		wantState string
		wantCode  int
		wantOut   []string
	}{
		{"script fails, after ok", []string{"exit 3"}, []string{"echo after:$CI_JOB_STATUS"}, "failed", 3,
			[]string{"after:failed"}},
		{"script fails, after fails", []string{"exit 3"}, []string{"echo after:$CI_JOB_STATUS", "exit 5"}, "failed", 3,
			[]string{"after:failed", "WARNING: after_script failed, but job will continue unaffected: exit code 5"}},
		{"script ok, after fails", []string{"true"}, []string{"echo after:$CI_JOB_STATUS", "exit 9"}, "success", 0,
			[]string{"after:success", "WARNING: after_script failed"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newLocalExec(t, bashProgram(), nil)
			job := baseJob(tt.script...)
			job.Steps = append(job.Steps, runnerapi.Step{Name: "after_script", Script: tt.after, When: "always", AllowFailure: true})
			p, err := Generate(job, Options{BuildsDir: t.TempDir()})
			if err != nil {
				t.Fatal(err)
			}
			r, trace := runPlan(t, context.Background(), p, e)
			if r.State != tt.wantState || r.ExitCode != tt.wantCode {
				t.Fatalf("result %+v, want %s exit %d\n%s", r, tt.wantState, tt.wantCode, trace)
			}
			if tt.wantState == "failed" && r.FailureReason != runnerapi.FailureScriptFailure {
				t.Errorf("failure reason %q", r.FailureReason)
			}
			for _, s := range tt.wantOut {
				if !strings.Contains(trace, s) {
					t.Errorf("trace lacks %q:\n%s", s, trace)
				}
			}
			if !strings.Contains(trace, "section_start:") || !strings.Contains(trace, ":after_script\r\x1b[0K") {
				t.Errorf("trace has no after_script section:\n%q", trace)
			}
		})
	}
}

// TestPrePostBuildScript checks gitlab-runner's order: pre_build_script, the
// script, post_build_script (only when the script succeeded), all in
// step_script, then after_script in its own stage.
func TestPrePostBuildScript(t *testing.T) {
	for _, fail := range []bool{false, true} {
		t.Run(fmt.Sprintf("scriptFails=%v", fail), func(t *testing.T) {
			e := newLocalExec(t, bashProgram(), nil)
			last := "echo SCRIPT"
			if fail {
				last = "echo SCRIPT; exit 2"
			}
			job := baseJob(last)
			job.Steps = append(job.Steps, runnerapi.Step{Name: "after_script", Script: []string{"echo AFTER"}})
			p, err := Generate(job, Options{BuildsDir: t.TempDir(),
				PreCloneScript: "echo PRECLONE", PreBuildScript: "echo PREBUILD", PostBuildScript: "echo POSTBUILD"})
			if err != nil {
				t.Fatal(err)
			}
			_, trace := runPlan(t, context.Background(), p, e)
			var order []string
			for _, l := range strings.Split(trace, "\n") {
				switch l {
				case "PRECLONE", "PREBUILD", "SCRIPT", "POSTBUILD", "AFTER":
					order = append(order, l)
				}
			}
			want := "PREBUILD SCRIPT POSTBUILD AFTER" // no PRECLONE: GIT_STRATEGY=none
			if fail {
				want = "PREBUILD SCRIPT AFTER"
			}
			if got := strings.Join(order, " "); got != want {
				t.Fatalf("order %q, want %q\n%s", got, want, trace)
			}
			step := stage(t, p, StageStepScript).Script
			if !(strings.Index(step, "PREBUILD") < strings.Index(step, "SCRIPT") && strings.Index(step, "SCRIPT") < strings.Index(step, "POSTBUILD")) {
				t.Fatalf("step_script order wrong:\n%s", step)
			}
		})
	}
}

// TestGitStrategyNone: no git at all (a git on PATH that would fail is never
// called), the project directory exists, pre_clone_script does not run.
func TestGitStrategyNone(t *testing.T) {
	marker := filepath.Join(t.TempDir(), "git-called")
	e := newLocalExec(t, bashProgram(), map[string]string{"git": "touch " + marker + "; exit 99"})
	job := baseJob("pwd")
	job.GitInfo = runnerapi.GitInfo{} // nothing needed with none
	p, err := Generate(job, Options{BuildsDir: t.TempDir(), PreCloneScript: "echo PRECLONE"})
	if err != nil {
		t.Fatal(err)
	}
	r, trace := runPlan(t, context.Background(), p, e)
	if r.State != runnerapi.StateSuccess {
		t.Fatalf("result %+v\n%s", r, trace)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("git was called with GIT_STRATEGY=none")
	}
	if strings.Contains(trace, "PRECLONE") {
		t.Fatal("pre_clone_script ran with GIT_STRATEGY=none")
	}
	if !strings.HasSuffix(p.ProjectDir, "/project-7") || !strings.Contains(trace, p.ProjectDir+"\n") {
		t.Fatalf("project dir %q not created/used:\n%s", p.ProjectDir, trace)
	}
}

// TestStageTimeouts: after_script's own timeout ends it without failing the
// job; the job timeout ends the job as job_execution_timeout and after_script
// does not run (gitlab-runner v14 behaviour).
func TestStageTimeouts(t *testing.T) {
	t.Run("after_script", func(t *testing.T) {
		e := newLocalExec(t, bashProgram(), nil)
		job := baseJob("echo ok")
		job.Variables = append(job.Variables, runnerapi.Variable{Key: "RUNNER_AFTER_SCRIPT_TIMEOUT", Value: "1s"})
		job.Steps = append(job.Steps, runnerapi.Step{Name: "after_script", Script: []string{"sleep 30"}})
		p, err := Generate(job, Options{BuildsDir: t.TempDir()})
		if err != nil {
			t.Fatal(err)
		}
		if got := stage(t, p, StageAfterScript).Timeout; got != time.Second {
			t.Fatalf("after_script timeout %v", got)
		}
		start := time.Now()
		r, trace := runPlan(t, context.Background(), p, e)
		if r.State != runnerapi.StateSuccess || time.Since(start) > 15*time.Second {
			t.Fatalf("result %+v after %v\n%s", r, time.Since(start), trace)
		}
		if o := r.Outcomes[len(r.Outcomes)-1]; o.Stage != StageAfterScript || !o.TimedOut {
			t.Fatalf("last outcome %+v", o)
		}
		if !strings.Contains(trace, "after_script failed, but job will continue unaffected: timed out after 1s") {
			t.Fatalf("no warning:\n%s", trace)
		}
	})
	t.Run("job", func(t *testing.T) {
		e := newLocalExec(t, bashProgram(), nil)
		job := baseJob("echo started", "sleep 30")
		job.Steps = append(job.Steps, runnerapi.Step{Name: "after_script", Script: []string{"echo AFTER"}})
		p, err := Generate(job, Options{BuildsDir: t.TempDir()})
		if err != nil {
			t.Fatal(err)
		}
		// Long enough for "echo started" to come out on a loaded machine
		// (1.5s was not: preparing took 1.9s under CI load).
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		r, trace := runPlan(t, ctx, p, e)
		if r.State != runnerapi.StateFailed || r.FailureReason != runnerapi.FailureJobExecutionTimeout {
			t.Fatalf("result %+v\n%s", r, trace)
		}
		if strings.Contains(trace, "AFTER") || !strings.Contains(trace, "started") {
			t.Fatalf("trace:\n%s", trace)
		}
		if got := FinalLine(r); got != "\x1b[31;1mERROR: Job failed: execution took longer than 1h0m0s seconds\n\x1b[0;m\n" {
			t.Fatalf("final line %q", got)
		}
	})
	t.Run("canceled", func(t *testing.T) {
		e := newLocalExec(t, bashProgram(), nil)
		p, err := Generate(baseJob("sleep 30"), Options{BuildsDir: t.TempDir()})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		time.AfterFunc(500*time.Millisecond, cancel)
		r, _ := runPlan(t, ctx, p, e)
		if r.State != runnerapi.StateFailed || r.FailureReason != runnerapi.FailureUnknownFailure || r.Message != "canceled" {
			t.Fatalf("result %+v", r)
		}
	})
}

// TestRunStageOrder checks which stages Run starts (onStage) for a failing
// script, and that a failing get_sources skips the user steps and
// after_script but still runs the on_failure upload.
func TestRunStageOrder(t *testing.T) {
	tests := []struct {
		name     string
		strategy string
		script   string
		want     string
	}{
		{"script fails", "none", "exit 1", "prepare_script get_sources step_script after_script upload_artifacts_on_failure"},
		{"script ok", "none", "true", "prepare_script get_sources step_script after_script upload_artifacts_on_success"},
		{"get_sources fails", "clone", "true", "prepare_script get_sources upload_artifacts_on_failure"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newLocalExec(t, bashProgram(), map[string]string{"git": "exit 128"})
			job := baseJob(tt.script)
			job.Variables[0].Value = tt.strategy
			job.Steps = append(job.Steps, runnerapi.Step{Name: "after_script", Script: []string{"true"}})
			job.Artifacts = []runnerapi.Artifact{{Paths: []string{"out"}, When: "always"}}
			p, err := Generate(job, Options{BuildsDir: t.TempDir()})
			if err != nil {
				t.Fatal(err)
			}
			upload(t, p)
			var started []string
			var trace strings.Builder
			p.Run(context.Background(), e.runner(), &trace, RunOptions{OnStage: func(s Stage) { started = append(started, string(s.Name)) }})
			if got := strings.Join(started, " "); got != tt.want {
				t.Fatalf("stages %q, want %q\n%s", got, tt.want, trace.String())
			}
		})
	}
}
