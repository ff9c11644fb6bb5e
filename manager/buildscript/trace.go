package buildscript

import (
	"fmt"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// The trace lines below reproduce, byte for byte, what gitlab-runner v14.10
// writes (see testdata/gitlab-capture/job-*.trace).

// SectionStart returns the marker that opens a collapsible trace section and
// its bold cyan header line.
func SectionStart(t time.Time, name, title string) string {
	return fmt.Sprintf("section_start:%d:%s\r%s", t.Unix(), name, ansiClear) +
		LogLine(ansiBoldCyan+title+ansiReset)
}

// SectionEnd returns the marker that closes a trace section. It has no line
// break: the next line follows it directly.
func SectionEnd(t time.Time, name string) string {
	return fmt.Sprintf("section_end:%d:%s\r%s", t.Unix(), name, ansiClear)
}

// LogLine returns a line of the runner's own log, such as "Using Shell executor...".
func LogLine(text string) string {
	return ansiClear + text + ansiReset + "\n"
}

// Header returns the first two lines of a trace: "Running with <version>" and
// "  on <runner name> <short token>".
func Header(version, runnerName, shortToken string) string {
	return LogLine("Running with "+version) + LogLine("  on "+runnerName+" "+shortToken)
}

// ShortToken returns the first 8 characters of a runner token, as shown in the
// header ("glrt-" prefixed tokens skip the prefix, as newer runners do).
func ShortToken(token string) string {
	token = strings.TrimPrefix(token, "glrt-")
	return token[:min(8, len(token))]
}

// JobSucceeded returns the trace's last line for a successful job.
func JobSucceeded() string {
	return ansiBoldGreen + "Job succeeded" + ansiReset + "\n"
}

// JobFailed returns the trace's last line for a failed job; message is, for
// example, "exit code 3" or "canceled".
func JobFailed(message string) string {
	return ErrorLine("Job failed: " + message)
}

// ErrorLine returns a red "ERROR: " line as the runner writes it.
func ErrorLine(text string) string {
	return ansiBoldRed + "ERROR: " + text + "\n" + ansiReset + "\n"
}

// WarningLine returns a yellow "WARNING: " line in the same shape as ErrorLine.
func WarningLine(text string) string {
	return ansiYellow + "WARNING: " + text + "\n" + ansiReset + "\n"
}

// FinalLine returns JobSucceeded or JobFailed for r.
func FinalLine(r Result) string {
	if r.State == runnerapi.StateSuccess {
		return JobSucceeded()
	}
	return JobFailed(r.Message)
}
