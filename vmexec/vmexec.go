// Package vmexec runs scripts on a job's virtual machine and copies files to it.
//
// The transports live in subpackages (sshexec for SSH, winrm for WinRM); the job
// lifecycle only sees the Executor interface and the error types defined here.
//
// Run reports three distinct outcomes:
//   - the script ran to completion: its exit code and a nil error, whatever the code;
//   - the context ended first: an *AbortedError (errors.Is with context.Canceled or
//     context.DeadlineExceeded tells which), after the remote processes were killed;
//   - the transport or the remote system failed: a *SystemError, which the job
//     lifecycle reports as runner_system_failure.
package vmexec

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"regexp"
	"strings"
)

// Executor runs commands on one machine over one connection.
type Executor interface {
	// Run runs cmd.Script and returns its exit code. See the package doc for errors.
	Run(ctx context.Context, cmd Command) (exitCode int, err error)
	// Upload writes content to the absolute path on the machine with the given
	// permission bits, replacing any existing file.
	Upload(ctx context.Context, path string, content []byte, mode fs.FileMode) error
	// Close releases the connection. Runs in progress fail with a *SystemError.
	Close() error
}

// Streamer is an Executor that can also run a command that takes care of
// its own end more cheaply: Stream runs it without a process group of its
// own, and when ctx ends it only stops reading (the command dies at its
// next write). Errors are as for Run.
type Streamer interface {
	Stream(ctx context.Context, cmd Command) (exitCode int, err error)
}

// Command is one script to run.
type Command struct {
	// Script is the program text given to Shell.
	Script string
	// Shell is the interpreter: a program name or absolute path such as "sh",
	// "bash" or "/bin/bash" for SSH, "powershell" or "pwsh" for WinRM. Empty means
	// the transport's default.
	Shell string
	// Env holds "NAME=value" pairs exported to the script.
	Env []string
	// Stdout and Stderr receive the script's output as it arrives; nil discards it.
	// Writes to the two are serialized, so they may share one writer.
	Stdout, Stderr io.Writer
}

// AbortedError reports that a command was stopped because its context ended.
type AbortedError struct {
	// Cause is context.Cause of the ended context.
	Cause error
	// Killed reports whether the remote processes are known to be gone.
	Killed bool
	// KillErr says why they could not be confirmed gone, when Killed is false.
	KillErr error
}

// Error implements error.
func (e *AbortedError) Error() string {
	s := "command aborted: " + errString(e.Cause)
	if !e.Killed && e.KillErr != nil {
		s += " (remote processes may survive: " + e.KillErr.Error() + ")"
	}
	return s
}

// Unwrap returns the context cause.
func (e *AbortedError) Unwrap() error { return e.Cause }

// SystemError reports a failure of the transport or of the remote system rather
// than of the script: the connection broke, the shell could not start, an upload
// could not be written.
type SystemError struct {
	// Op names what was being done, such as "run" or "upload /builds/x".
	Op string
	// Err is the underlying failure.
	Err error
}

// Error implements error.
func (e *SystemError) Error() string { return e.Op + ": " + errString(e.Err) }

// Unwrap returns the underlying failure.
func (e *SystemError) Unwrap() error { return e.Err }

// IsSystemFailure reports whether err is or wraps a *SystemError.
func IsSystemFailure(err error) bool {
	var se *SystemError
	return errors.As(err, &se)
}

// IsAborted reports whether err is or wraps an *AbortedError.
func IsAborted(err error) bool {
	var ae *AbortedError
	return errors.As(err, &ae)
}

func errString(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}

var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// EnvVar is one parsed entry of Command.Env.
type EnvVar struct {
	Name, Value string
}

// ParseEnv splits "NAME=value" entries and checks each name is a valid shell
// variable name and each value is free of NUL bytes.
func ParseEnv(env []string) ([]EnvVar, error) {
	out := make([]EnvVar, 0, len(env))
	for i, kv := range env {
		name, value, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("env[%d] %q: want NAME=value", i, truncate(kv, 40))
		}
		if !envName.MatchString(name) {
			return nil, fmt.Errorf("env[%d]: invalid variable name %q", i, truncate(name, 40))
		}
		if strings.ContainsRune(value, 0) {
			return nil, fmt.Errorf("env[%d] %s: value contains a NUL byte", i, name)
		}
		out = append(out, EnvVar{Name: name, Value: value})
	}
	return out, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
