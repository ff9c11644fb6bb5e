package image

import (
	"bytes"
	"debug/elf"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
)

type module struct {
	name string
	path string
}

// moduleRoot returns lib/modules/<version> of an unpacked kernel package.
func moduleRoot(root, version string) (string, error) {
	modRoot := filepath.Join(root, "lib", "modules", version)
	if _, err := os.Stat(modRoot); err == nil {
		return modRoot, nil
	}
	// Debian's usrmerged packages may ship /usr/lib/modules.
	alt := filepath.Join(root, "usr", "lib", "modules", version)
	if _, err := os.Stat(alt); err != nil {
		return "", fmt.Errorf("%w: no lib/modules/%s in the package", ErrMissing, version)
	}
	return alt, nil
}

// findModules locates each module's .ko in the unpacked kernel and returns
// them in load order: every module after the modules it depends on (the
// "depends=" of its .modinfo), dependencies not named in names included. A
// module that is built into the kernel (modules.builtin) is skipped; one
// that is neither is an error naming it.
func findModules(root, version string, names []string) ([]module, error) {
	modRoot, err := moduleRoot(root, version)
	if err != nil {
		return nil, err
	}
	found := make(map[string]string)
	err = filepath.WalkDir(filepath.Join(modRoot, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(p, ".ko") {
			name := strings.TrimSuffix(d.Name(), ".ko")
			found[name] = p
			found[strings.ReplaceAll(name, "-", "_")] = p
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("scan modules: %w", err)
	}
	builtin := make(map[string]bool)
	if b, err := os.ReadFile(filepath.Join(modRoot, "modules.builtin")); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			name := strings.TrimSuffix(path.Base(line), ".ko")
			builtin[strings.ReplaceAll(name, "-", "_")] = true
		}
	}
	var (
		mods  []module
		state = make(map[string]int) // 1: being added, 2: added
		add   func(n string, chain []string) error
	)
	add = func(n string, chain []string) error {
		n = strings.ReplaceAll(n, "-", "_")
		switch state[n] {
		case 2:
			return nil
		case 1:
			return fmt.Errorf("kernel module dependency cycle: %s", strings.Join(append(chain, n), " -> "))
		}
		p, ok := found[n]
		if !ok {
			if builtin[n] {
				state[n] = 2
				return nil
			}
			what := "kernel module " + n + ".ko"
			if len(chain) > 0 {
				what += " (needed by " + strings.Join(chain, " -> ") + ")"
			}
			return fmt.Errorf("%w: %s not in %s and not built in (compressed .ko.xz/.ko.zst modules are not supported)", ErrMissing, what, modRoot)
		}
		state[n] = 1
		deps, err := moduleDepends(p)
		if err != nil {
			return err
		}
		for _, d := range deps {
			if err := add(d, append(chain, n)); err != nil {
				return err
			}
		}
		state[n] = 2
		mods = append(mods, module{name: n, path: p})
		return nil
	}
	for _, n := range names {
		if err := add(n, nil); err != nil {
			return nil, err
		}
	}
	return mods, nil
}

// moduleDepends returns the modules a .ko needs loaded first: the
// comma-separated "depends=" entry of its .modinfo section.
func moduleDepends(ko string) ([]string, error) {
	f, err := elf.Open(ko)
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", ko, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, nil
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("module %s: .modinfo: %w", ko, err)
	}
	for _, kv := range bytes.Split(data, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			var deps []string
			for _, d := range strings.Split(string(v), ",") {
				if d = strings.TrimSpace(d); d != "" {
					deps = append(deps, d)
				}
			}
			return deps, nil
		}
	}
	return nil, nil
}
