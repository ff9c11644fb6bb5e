package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func runCLI(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestVerifyHosted(t *testing.T) {
	code, out, errOut := runCLI("verify", "--config", "../../testdata/hosted-gcp-linux.toml", "--at", "2026-11-24T03:45:00Z")
	if code != 0 {
		t.Fatalf("exit %d, stderr:\n%s", code, errOut)
	}
	for _, want := range []string{
		`runner "shared-runners-manager-1.gitlab.com"`,
		"gce (from [runners.machine])",
		"google-machine-type=n1-standard-1",
		"each VM runs one job and is deleted",
		`2026-11-24T03:45:00Z: idle 700, idle time 1h0m0s [period 1: "* 30-59 3 * * * *", "* 0-30 4 * * * *" UTC]`,
		"2026-11-24T04:31:00Z (in 46m0s): idle 50, idle time 1h0m0s [default]",
		"jobs with an image run in containers on the VM's Docker Engine (unix:///var/run/docker.sock), default image ruby:3.1, privileged, pull policy always",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

func TestVerifyBrokenConfig(t *testing.T) {
	good, err := os.ReadFile("../../testdata/hosted-gcp-linux.toml")
	if err != nil {
		t.Fatal(err)
	}
	broken := bytes.Replace(good, []byte("IdleCount = 700"), []byte("IdleCount = -700"), 1)
	path := filepath.Join(t.TempDir(), "broken.toml")
	if err := os.WriteFile(path, broken, 0o600); err != nil {
		t.Fatal(err)
	}
	code, out, errOut := runCLI("verify", "--config", path)
	if code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	if out != "" {
		t.Errorf("printed a summary for a broken config:\n%s", out)
	}
	want := path + ":61:7: runners[0].machine.autoscaling[1].IdleCount: must not be negative, got -700"
	if !strings.Contains(errOut, want) {
		t.Errorf("stderr = %q, want it to contain %q", errOut, want)
	}
}

func TestCLIUsage(t *testing.T) {
	tests := []struct {
		args     []string
		code     int
		contains string
	}{
		{nil, 2, "Commands:"},
		{[]string{"--help"}, 0, "verify"},
		{[]string{"verify", "--help"}, 0, "Usage: mayfly verify"},
		{[]string{"version", "--help"}, 0, "Usage: mayfly version"},
		{[]string{"version"}, 0, "mayfly "},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"verify", "--at", "yesterday"}, 2, "RFC 3339"},
		{[]string{"verify", "--config", "/nonexistent/config.toml"}, 1, "no such file"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			code, out, errOut := runCLI(tt.args...)
			if code != tt.code || !strings.Contains(out+errOut, tt.contains) {
				t.Errorf("exit %d (want %d), output:\n%s%s\nwant it to contain %q", code, tt.code, out, errOut, tt.contains)
			}
		})
	}
}

func TestImageBuildUsage(t *testing.T) {
	for _, tt := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"image"}, 2, "Usage: mayfly image build"},
		{[]string{"image", "build", "--help"}, 0, "Debian packages only"},
		{[]string{"image", "build", "--cache-dir", "/nonexistent-mayfly-cache"}, 1, "mayfly image build:"},
	} {
		code, out, errOut := runCLI(tt.args...)
		if code != tt.code || !strings.Contains(out+errOut, tt.want) {
			t.Errorf("%v: exit %d (want %d), output %q, want it to contain %q", tt.args, code, tt.code, out+errOut, tt.want)
		}
	}
}

func TestSimulate(t *testing.T) {
	code, out, errOut := runCLI("simulate", "--config", "../../testdata/hosted-gcp-linux.toml", "--trace", "../../testdata/traces/nightly.csv", "--policy", "mayfly", "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	for _, want := range []string{`"policy": "mayfly"`, `"trace": "nightly.csv"`, `"deleted_unused_while_waiting": 0,`} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %s:\n%.400s", want, out)
		}
	}
	png := filepath.Join(t.TempDir(), "sim.png")
	if code, _, errOut := runCLI("simulate", "--config", "../../testdata/hosted-gcp-linux.toml", "--trace", "../../testdata/traces/nightly.csv", "--policy", "docker-machine", "--plot", png); code != 0 {
		t.Errorf("--plot: exit %d: %s", code, errOut)
	} else if st, err := os.Stat(png); err != nil || st.Size() < 1000 {
		t.Errorf("--plot wrote no picture: %v", err)
	}
	if code, _, errOut := runCLI("simulate", "--config", "../../testdata/hosted-gcp-linux.toml"); code != 2 || !strings.Contains(errOut, "--trace is required") {
		t.Errorf("without --trace: exit %d, %q", code, errOut)
	}
	if code, _, errOut := runCLI("simulate", "--config", "../../testdata/hosted-gcp-linux.toml", "--trace", "../../testdata/traces/nightly.csv", "--policy", "nope"); code != 1 || !strings.Contains(errOut, "nope") {
		t.Errorf("bad policy: exit %d, %q", code, errOut)
	}
}

func TestFleetStatusUsage(t *testing.T) {
	for _, tt := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"fleet"}, 2, "Usage: mayfly fleet status"},
		{[]string{"fleet", "--help"}, 0, "Shows the fleets"},
		{[]string{"fleet", "status", "--addr", "127.0.0.1:1"}, 1, "is mayfly run serving on 127.0.0.1:1?"},
	} {
		code, out, errOut := runCLI(tt.args...)
		if code != tt.code || !strings.Contains(out+errOut, tt.want) {
			t.Errorf("%v: exit %d (want %d), output %q, want it to contain %q", tt.args, code, tt.code, out+errOut, tt.want)
		}
	}
}
