package buildscript

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/internal/testenv"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
	"github.com/mayfly-ci/mayfly/manager/stagerun"
	"github.com/mayfly-ci/mayfly/vmexec"
)

// localExec runs stage scripts with a real local shell, the script on stdin
// as over SSH, in its own process group so a timeout kills everything.
type localExec struct {
	t       testing.TB
	program []string // shell and its arguments, e.g. /bin/bash -s
	path    string   // PATH for scripts
	home    string
	ran     []string // scripts run, in order
}

// newLocalExec returns an executor for shell (bash, sh via dash, or a given
// program). stubs are small executables put first on PATH (name -> script).
func newLocalExec(t testing.TB, program []string, stubs map[string]string) *localExec {
	t.Helper()
	testenv.LookPath(t, program[0], "make setup installs it")
	bin := t.TempDir()
	for name, body := range stubs {
		if err := os.WriteFile(filepath.Join(bin, name), []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return &localExec{t: t, program: program, path: bin + ":/usr/local/bin:/usr/bin:/bin", home: t.TempDir()}
}

func (e *localExec) Run(ctx context.Context, shell, script string, out io.Writer) (int, error) {
	e.ran = append(e.ran, script)
	cmd := exec.CommandContext(ctx, e.program[0], e.program[1:]...)
	cmd.Stdin = strings.NewReader(script)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = []string{"PATH=" + e.path, "HOME=" + e.home, "LANG=C.UTF-8",
		"GIT_CONFIG_NOSYSTEM=1", "GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@example.com",
		"GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@example.com"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 2 * time.Second
	err := cmd.Run()
	if ctx.Err() != nil {
		return -1, ctx.Err()
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), nil
	}
	if err != nil {
		return -1, err
	}
	return 0, nil
}

// runner returns e as the stage runner Plan.Run takes: each stage attached
// to its command, as over WinRM.
func (e *localExec) runner() *stagerun.Attached {
	return &stagerun.Attached{Exec: localExecutor{e}}
}

// localExecutor is a localExec seen as a vmexec.Executor.
type localExecutor struct{ e *localExec }

func (x localExecutor) Run(ctx context.Context, cmd vmexec.Command) (int, error) {
	env, err := vmexec.ParseEnv(cmd.Env)
	if err != nil {
		return -1, err
	}
	var script strings.Builder
	for _, v := range env {
		script.WriteString("export " + v.Name + "=" + shQuote(v.Value) + "\n")
	}
	script.WriteString(cmd.Script)
	return x.e.Run(ctx, cmd.Shell, script.String(), cmd.Stdout)
}

func (localExecutor) Upload(context.Context, string, []byte, fs.FileMode) error {
	return errors.New("localExecutor: no uploads")
}

func (localExecutor) Close() error { return nil }

// upload writes the plan's files as the lifecycle would before the first stage.
func upload(t testing.TB, p *Plan) {
	t.Helper()
	for _, f := range p.Files {
		if err := os.MkdirAll(filepath.Dir(f.Path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f.Path, f.Content, f.Mode); err != nil {
			t.Fatal(err)
		}
	}
}

// runPlan uploads the files, runs all stages and returns the result and trace.
func runPlan(t testing.TB, ctx context.Context, p *Plan, e *localExec) (Result, string) {
	t.Helper()
	upload(t, p)
	var trace bytes.Buffer
	r := p.Run(ctx, e.runner(), &trace, RunOptions{})
	return r, trace.String()
}

// baseJob is a minimal valid job that needs no git server.
func baseJob(script ...string) *runnerapi.JobResponse {
	return &runnerapi.JobResponse{
		ID:      42,
		Token:   "jt-0123456789",
		JobInfo: runnerapi.JobInfo{Name: "build", Stage: "test", ProjectID: 7, ProjectName: "demo"},
		GitInfo: runnerapi.GitInfo{
			RepoURL: "http://gitlab-ci-token:jt-0123456789@127.0.0.1/grp/demo.git",
			Ref:     "main", Sha: strings.Repeat("a", 40),
		},
		RunnerInfo: runnerapi.RunnerInfo{Timeout: 3600},
		Variables:  []runnerapi.Variable{{Key: "GIT_STRATEGY", Value: "none", Public: true}},
		Steps:      []runnerapi.Step{{Name: "script", Script: script, When: "on_success"}},
	}
}

func bashProgram() []string { return []string{"/bin/bash", "-s"} }

// stage returns the named stage of p.
func stage(t testing.TB, p *Plan, name StageName) Stage {
	t.Helper()
	for _, s := range p.Stages {
		if s.Name == name {
			return s
		}
	}
	t.Fatalf("plan has no stage %s", name)
	return Stage{}
}

// runStage runs one stage of p directly and returns its exit code and output.
func runOne(t testing.TB, p *Plan, e *localExec, name StageName) (int, string) {
	t.Helper()
	var out bytes.Buffer
	code, err := e.Run(context.Background(), p.Shell, p.Script(stage(t, p, name), JobStatusRunning), &out)
	if err != nil {
		t.Fatalf("run %s: %v\n%s", name, err, out.String())
	}
	return code, out.String()
}
