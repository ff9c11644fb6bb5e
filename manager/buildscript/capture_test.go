package buildscript

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/mask"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// TestReproduceCapturedTraces rebuilds the official runner's traces of the
// captured jobs 1 and 2 byte for byte: the header and prepare_executor lines
// from the helpers, every stage from generated scripts really run by bash
// (the capture machine was named "vm"; the expected trace takes this one's name), masked with the
// plan's secrets, and the final line. Only the section timestamps are taken
// from the capture.
func TestReproduceCapturedTraces(t *testing.T) {
	captureJob := func(id int64, script ...string) *runnerapi.JobResponse {
		return &runnerapi.JobResponse{
			ID: id, Token: "job-token-" + strconv.FormatInt(id, 10),
			Variables: []runnerapi.Variable{
				{Key: "GIT_STRATEGY", Value: "none", Public: true},
				{Key: "SECRET_X", Value: "s3cr3t-value-123", Masked: true},
			},
			Steps: []runnerapi.Step{
				{Name: "script", Script: script, When: "on_success"},
				{Name: "after_script", Script: []string{"echo after"}, When: "always", AllowFailure: true},
			},
		}
	}
	tests := []struct {
		file       string
		job        *runnerapi.JobResponse
		wantResult Result
		// message: the shell executor of the capture says "exit status N";
		// Decide says "exit code N" like the docker/VM executors.
		finalMessage string
	}{
		{"job-1.trace", captureJob(1, "echo hello from $CI_JOB_ID", "echo masked=$SECRET_X", "uname -s"),
			Result{State: runnerapi.StateSuccess}, ""},
		{"job-2.trace", captureJob(2, "echo about to fail", "exit 3"),
			Result{State: runnerapi.StateFailed, FailureReason: runnerapi.FailureScriptFailure, ExitCode: 3, Message: "exit code 3"},
			"exit status 3"},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			want, err := os.ReadFile(filepath.Join("..", "..", "testdata", "gitlab-capture", tt.file))
			if err != nil {
				t.Fatal(err)
			}
			// The scripts read the kernel's host name; the capture machine's was "vm".
			if host, err := os.ReadFile("/proc/sys/kernel/hostname"); err == nil {
				want = bytes.Replace(want, []byte("Running on vm..."), []byte("Running on "+strings.TrimSpace(string(host))+"..."), 1)
			}
			var stamps []time.Time
			for _, m := range regexp.MustCompile(`section_(?:start|end):(\d+):`).FindAllSubmatch(want, -1) {
				n, _ := strconv.ParseInt(string(m[1]), 10, 64)
				stamps = append(stamps, time.Unix(n, 0))
			}
			next := func() time.Time { s := stamps[0]; stamps = stamps[1:]; return s }

			p, err := Generate(tt.job, Options{BuildsDir: t.TempDir()})
			if err != nil {
				t.Fatal(err)
			}
			e := newLocalExec(t, bashProgram(), map[string]string{"hostname": "echo vm"})
			upload(t, p)

			var got bytes.Buffer
			m := mask.NewWriter(&got, p.Secrets)
			m.Write([]byte(Header("gitlab-runner development version (HEAD)", "", "runner-t")))
			m.Write([]byte(SectionStart(next(), "prepare_executor", `Preparing the "shell" executor`)))
			m.Write([]byte(LogLine("Using Shell executor...")))
			m.Write([]byte(SectionEnd(next(), "prepare_executor")))
			r := p.Run(context.Background(), e.runner(), m, RunOptions{Now: next})
			if r.State != tt.wantResult.State || r.FailureReason != tt.wantResult.FailureReason ||
				r.ExitCode != tt.wantResult.ExitCode || r.Message != tt.wantResult.Message {
				t.Errorf("result %+v, want %+v", r, tt.wantResult)
			}
			if tt.finalMessage != "" {
				r.Message = tt.finalMessage
			}
			m.Write([]byte(FinalLine(r)))
			m.Close()
			if !bytes.Equal(got.Bytes(), want) {
				t.Fatalf("trace differs from the capture\n got: %q\nwant: %q", got.Bytes(), want)
			}
		})
	}
}
