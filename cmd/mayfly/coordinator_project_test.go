package main

import (
	"context"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/internal/testenv"
	"github.com/mayfly-ci/mayfly/manager/gitlab"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// TestCoordinatorProjectFlag runs `mayfly coordinator --project` on a
// sample project, takes its jobs with the real API client, clones the
// repository with the git CLI at the URL the payload gives (the listen
// address, as no --external-url is set), and checks the pipeline's output.
func TestCoordinatorProjectFlag(t *testing.T) {
	testenv.LookPath(t, "git", "make setup installs it")
	rc := runCoordinatorCmd(t, "--project", "../../testdata/projects/two-stages", "--project", "demo/lib=../../testdata/projects/shared-lib",
		"--runner-token", "cli-project-token", "--exit-when-done")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	client, err := gitlab.New(gitlab.Config{URL: "http://" + rc.addr, Info: runnerapi.VersionInfo{Name: "mayfly-test"}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for attempt := 0; attempt < 200 && len(names) < 2; attempt++ {
		res, err := client.RequestJob(ctx, "cli-project-token", gitlab.RequestOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if res.Outcome != gitlab.JobReceived {
			time.Sleep(20 * time.Millisecond)
			continue
		}
		j := res.Job
		names = append(names, j.JobInfo.Name)
		if !strings.HasPrefix(j.GitInfo.RepoURL, "http://gitlab-ci-token:"+j.Token+"@"+rc.addr+"/root/two-stages.git") {
			t.Errorf("repo_url %s does not use the listen address %s", j.GitInfo.RepoURL, rc.addr)
		}
		dir := filepath.Join(t.TempDir(), "src")
		cmd := exec.CommandContext(ctx, "git", "clone", "-q", "--depth", "1", j.GitInfo.RepoURL, dir)
		cmd.Env = []string{"HOME=" + t.TempDir(), "PATH=" + os.Getenv("PATH"), "GIT_TERMINAL_PROMPT=0", "GIT_CONFIG_NOSYSTEM=1"}
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("clone with the job token: %v\n%s", err, out)
		}
		if _, err := os.Stat(filepath.Join(dir, "greet.sh")); err != nil {
			t.Errorf("cloned tree lacks greet.sh: %v", err)
		}
		tr, err := client.StartJobTrace(ctx, j.ID, j.Token, gitlab.TraceOptions{Interval: 10 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		if err := tr.Finish(ctx, runnerapi.StateSuccess, "", 0); err != nil {
			t.Fatal(err)
		}
	}
	if strings.Join(names, ",") != "build,test" {
		t.Errorf("jobs ran %v, want build then test", names)
	}
	select {
	case code := <-rc.done:
		if code != 0 {
			t.Errorf("exit code %d", code)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("coordinator did not exit when every job finished")
	}
	<-rc.scanned
	out := rc.all.String()
	for _, want := range []string{"project root/two-stages (id 1) from ../../testdata/projects/two-stages: main at", "pipeline 1: 2 jobs",
		"project demo/lib (id 2)", "no pipeline: no .gitlab-ci.yml", "push token "} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

// TestCoordinatorProjectErrors: a bad .gitlab-ci.yml stops the command
// with the file, line and key, and --help lists unsupported keywords.
func TestCoordinatorProjectErrors(t *testing.T) {
	testenv.LookPath(t, "git", "make setup installs it")
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, ".gitlab-ci.yml"), []byte("job:\n  script: [x]\n  stage: nowhere\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	code := run([]string{"coordinator", "--listen", "127.0.0.1:0", "--project", dir}, io.Discard, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), `.gitlab-ci.yml:3: job: stage: "nowhere" is not one of the stages`) {
		t.Errorf("exit %d, stderr %q", code, stderr.String())
	}
	var help strings.Builder
	if code := run([]string{"coordinator", "--help"}, io.Discard, &help); code != 0 || !strings.Contains(help.String(), "rules:changes (matches)") || !strings.Contains(help.String(), "--external-url") {
		t.Errorf("help (exit %d):\n%s", code, help.String())
	}
}
