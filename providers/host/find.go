package host

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// BinaryPrefix is the file name prefix of provider plugin binaries.
const BinaryPrefix = "mayfly-plugin-"

// ErrPluginNotFound is wrapped by Find when no binary matches.
var ErrPluginNotFound = errors.New("plugin binary not found")

// Find returns the path of the plugin binary for name.
//
// A name containing a path separator is used as a path. Otherwise each of
// dirs is searched for "mayfly-plugin-<name>" and then "<name>", and then
// $PATH for "mayfly-plugin-<name>" only (a bare name like "aws" in $PATH is
// far more likely some other program). The error lists every place looked.
func Find(name string, dirs []string) (string, error) {
	if name == "" {
		return "", errors.New("find plugin: name is empty")
	}
	if strings.ContainsRune(name, filepath.Separator) || strings.ContainsRune(name, '/') {
		if err := checkExecutable(name); err != nil {
			return "", fmt.Errorf("find plugin %q: %w", name, err)
		}
		return name, nil
	}
	prefixed := name
	if !strings.HasPrefix(name, BinaryPrefix) {
		prefixed = BinaryPrefix + name
	}
	var looked []string
	for _, dir := range dirs {
		if dir == "" {
			continue
		}
		for _, file := range uniq(prefixed, name) {
			p := filepath.Join(dir, file)
			err := checkExecutable(p)
			if err == nil {
				return p, nil
			}
			looked = append(looked, p+" ("+reason(err)+")")
		}
	}
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, prefixed)
		if checkExecutable(p) == nil {
			return p, nil
		}
	}
	looked = append(looked, fmt.Sprintf("%s in $PATH (%s)", prefixed, os.Getenv("PATH")))
	return "", fmt.Errorf("find plugin %q: %w; looked in: %s", name, ErrPluginNotFound, strings.Join(looked, ", "))
}

func uniq(a, b string) []string {
	if a == b {
		return []string{a}
	}
	return []string{a, b}
}

func checkExecutable(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	if fi.IsDir() {
		return errors.New("is a directory")
	}
	if fi.Mode().Perm()&0o111 == 0 {
		return errors.New("not executable")
	}
	return nil
}

func reason(err error) string {
	if errors.Is(err, os.ErrNotExist) {
		return "missing"
	}
	if pe, ok := errors.AsType[*os.PathError](err); ok {
		return pe.Err.Error()
	}
	return err.Error()
}
