package host_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mayfly-ci/mayfly/providers/host"
)

func TestFind(t *testing.T) {
	dirA, dirB, pathDir := t.TempDir(), t.TempDir(), t.TempDir()
	write := func(path string, mode os.FileMode) string {
		t.Helper()
		if err := os.WriteFile(path, []byte("#!/bin/sh\n"), mode); err != nil {
			t.Fatal(err)
		}
		return path
	}
	prefixedA := write(filepath.Join(dirA, "mayfly-plugin-gce"), 0o755)
	bareB := write(filepath.Join(dirB, "qemu"), 0o755)
	write(filepath.Join(dirA, "mayfly-plugin-noexec"), 0o644)
	if err := os.Mkdir(filepath.Join(dirA, "mayfly-plugin-dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	inPath := write(filepath.Join(pathDir, "mayfly-plugin-aws"), 0o755)
	write(filepath.Join(pathDir, "bare"), 0o755) // a bare name in $PATH is not a plugin
	t.Setenv("PATH", pathDir)

	tests := []struct {
		name    string
		dirs    []string
		want    string
		wantErr []string
	}{
		{name: "gce", dirs: []string{dirA, dirB}, want: prefixedA},
		{name: "mayfly-plugin-gce", dirs: []string{dirA}, want: prefixedA},
		{name: "qemu", dirs: []string{dirA, dirB}, want: bareB},
		{name: "aws", dirs: []string{dirA}, want: inPath},
		{name: prefixedA, want: prefixedA},
		{name: "noexec", dirs: []string{dirA}, wantErr: []string{"mayfly-plugin-noexec (not executable)", "mayfly-plugin-noexec in $PATH (" + pathDir + ")"}},
		{name: "dir", dirs: []string{dirA}, wantErr: []string{"mayfly-plugin-dir (is a directory)"}},
		{name: "bare", dirs: []string{dirB}, wantErr: []string{filepath.Join(dirB, "mayfly-plugin-bare") + " (missing)", filepath.Join(dirB, "bare") + " (missing)"}},
		{name: filepath.Join(dirB, "nope"), wantErr: []string{"nope"}},
		{name: "", wantErr: []string{"name is empty"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := host.Find(tt.name, tt.dirs)
			if tt.wantErr == nil {
				if err != nil || got != tt.want {
					t.Fatalf("Find(%q) = %q, %v; want %q", tt.name, got, err, tt.want)
				}
				return
			}
			if err == nil {
				t.Fatalf("Find(%q) = %q, want an error", tt.name, got)
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Find(%q) error %q lacks %q", tt.name, err, w)
				}
			}
		})
	}

	_, err := host.Find("nosuch", []string{dirA})
	if !errors.Is(err, host.ErrPluginNotFound) {
		t.Errorf("Find(nosuch) error %v does not wrap ErrPluginNotFound", err)
	}
}
