package vmexec

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
)

func TestParseEnv(t *testing.T) {
	tests := []struct {
		env  []string
		want []EnvVar
		err  string
	}{
		{env: nil, want: []EnvVar{}},
		{env: []string{"A=1", "_B=", "C_2=x=y"}, want: []EnvVar{{"A", "1"}, {"_B", ""}, {"C_2", "x=y"}}},
		{env: []string{"A=1", "NOEQUALS"}, err: "env[1]"},
		{env: []string{"1A=x"}, err: `invalid variable name "1A"`},
		{env: []string{"A-B=x"}, err: `invalid variable name "A-B"`},
		{env: []string{"=x"}, err: `invalid variable name ""`},
		{env: []string{"A=x\x00y"}, err: "env[0] A: value contains a NUL byte"},
	}
	for _, tt := range tests {
		got, err := ParseEnv(tt.env)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("ParseEnv(%q) error %v, want it to contain %q", tt.env, err, tt.err)
			}
			continue
		}
		if err != nil || fmt.Sprint(got) != fmt.Sprint(tt.want) {
			t.Errorf("ParseEnv(%q) = %v, %v; want %v", tt.env, got, err, tt.want)
		}
	}
}

func TestErrorClassification(t *testing.T) {
	aborted := &AbortedError{Cause: context.DeadlineExceeded, Killed: true}
	system := &SystemError{Op: "run", Err: errors.New("connection reset")}
	tests := []struct {
		name             string
		err              error
		isSystem, isAbrt bool
		isDeadline       bool
		msg              string
	}{
		{"aborted", aborted, false, true, true, "command aborted: context deadline exceeded"},
		{"wrapped aborted", fmt.Errorf("job 7: %w", aborted), false, true, true, "job 7: command aborted"},
		{"kill failed", &AbortedError{Cause: context.Canceled, KillErr: errors.New("no pid")}, false, true, false, "remote processes may survive: no pid"},
		{"system", system, true, false, false, "run: connection reset"},
		{"wrapped system", fmt.Errorf("job 7: %w", system), true, false, false, "job 7: run: connection reset"},
		{"plain", errors.New("x"), false, false, false, "x"},
		{"nil", nil, false, false, false, ""},
	}
	for _, tt := range tests {
		if IsSystemFailure(tt.err) != tt.isSystem || IsAborted(tt.err) != tt.isAbrt || errors.Is(tt.err, context.DeadlineExceeded) != tt.isDeadline {
			t.Errorf("%s: system %v aborted %v deadline %v", tt.name, IsSystemFailure(tt.err), IsAborted(tt.err), errors.Is(tt.err, context.DeadlineExceeded))
		}
		if tt.err != nil && !strings.Contains(tt.err.Error(), tt.msg) {
			t.Errorf("%s: message %q, want %q", tt.name, tt.err.Error(), tt.msg)
		}
	}
}
