// Package archive selects, archives and extracts the files of a job's
// artifacts and caches, as gitlab-runner's helper does: paths are globs
// relative to the project directory (with ** for any depth), exclude globs
// drop matches, untracked adds what `git ls-files -o` lists; archives are
// zip files (with GitLab's gzip and raw formats for reports) written as a
// stream, never held whole in memory. Symbolic links are stored as links,
// file modes and times are kept.
//
// Extraction never writes outside its directory: entry names must be
// local paths, and every file is created through an os.Root, so a link in
// the archive cannot lead a later entry out. Limits bound the entries and
// the bytes written, whatever the archive's headers claim.
package archive

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"github.com/bmatcuk/doublestar/v4"
)

// Selection names the files of an archive.
type Selection struct {
	// Dir is the project directory: patterns are relative to it, and
	// nothing outside it is archived.
	Dir string
	// Paths are globs of files and directories; a directory brings
	// everything below it.
	Paths []string
	// Exclude are globs of paths left out.
	Exclude []string
	// Untracked adds every file git does not track (`git ls-files -o`),
	// ignored files included.
	Untracked bool
}

// Entry is one file, directory or link to archive.
type Entry struct {
	// Name is the slash-separated path relative to the project directory.
	Name string
	Info fs.FileInfo
}

// Logf receives the warnings and notes of an operation, one line each.
type Logf func(format string, args ...any)

// Select returns the entries sel names, sorted by name. Paths that match
// nothing or point outside the directory are warned about, as
// gitlab-runner does, and do not fail the selection.
func Select(ctx context.Context, sel Selection, logf Logf) ([]Entry, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	dir, err := filepath.Abs(sel.Dir)
	if err != nil {
		return nil, fmt.Errorf("project directory %s: %w", sel.Dir, err)
	}
	s := &selector{dir: dir, logf: logf, files: map[string]fs.FileInfo{}, excluded: map[string]int{}}
	for _, p := range sel.Exclude {
		rel, ok := s.relPattern(p)
		if !ok {
			logf("WARNING: exclude %q: not a path inside the project directory", p)
			continue
		}
		if !doublestar.ValidatePattern(rel) {
			logf("WARNING: exclude %q: not a valid glob", p)
			continue
		}
		s.exclude = append(s.exclude, [2]string{p, rel})
	}
	for _, p := range sel.Paths {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		s.path(p)
	}
	if sel.Untracked {
		if err := s.untracked(ctx); err != nil {
			return nil, err
		}
	}
	for _, e := range s.exclude {
		if n := s.excluded[e[0]]; n > 0 {
			logf("%s: excluded %d files", e[0], n)
		}
	}
	out := make([]Entry, 0, len(s.files))
	for name, info := range s.files {
		out = append(out, Entry{Name: name, Info: info})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

type selector struct {
	dir      string
	logf     Logf
	exclude  [][2]string // pattern as given, pattern relative to dir
	files    map[string]fs.FileInfo
	excluded map[string]int
}

// relPattern makes a pattern relative to the project directory, keeping
// its glob part; ok is false when it points outside.
func (s *selector) relPattern(p string) (string, bool) {
	p = filepath.ToSlash(p)
	base, pat := p, ""
	if strings.ContainsAny(p, "*?[{") {
		base, pat = doublestar.SplitPattern(p)
	}
	abs := base
	if !path.IsAbs(base) {
		abs = path.Join(filepath.ToSlash(s.dir), base)
	}
	rel, err := filepath.Rel(s.dir, filepath.FromSlash(abs))
	if err != nil || !filepath.IsLocal(rel) && rel != "." {
		return "", false
	}
	rel = filepath.ToSlash(rel)
	if pat != "" {
		if rel == "." {
			return pat, true
		}
		return rel + "/" + pat, true
	}
	return rel, true
}

func (s *selector) path(p string) {
	if strings.TrimSpace(p) == "" {
		s.logf("WARNING: No matching files. Path is empty.")
		return
	}
	rel, ok := s.relPattern(p)
	if !ok {
		s.logf("WARNING: %s: artifact path is not a subpath of the project directory (%s)", p, s.dir)
		return
	}
	fsys := os.DirFS(s.dir)
	var matches []string
	if rel == "." {
		matches = []string{"."}
	} else {
		var err error
		matches, err = doublestar.Glob(fsys, rel, doublestar.WithNoFollow(), doublestar.WithFailOnIOErrors())
		if err != nil {
			s.logf("WARNING: %s: %v", p, err)
			return
		}
	}
	found := 0
	for _, m := range matches {
		// WalkDir does not follow links: a link is archived as a link.
		_ = fs.WalkDir(fsys, m, func(name string, d fs.DirEntry, err error) error {
			if err != nil {
				s.logf("WARNING: %s: %v", name, err)
				return nil
			}
			if s.add(name) {
				found++
			}
			return nil
		})
	}
	if found == 0 {
		s.logf("WARNING: %s: no matching files. Ensure that the artifact path is relative to the working directory (%s)", p, s.dir)
		return
	}
	s.logf("%s: found %d matching artifact files and directories", p, found)
}

// add records the entry name (relative, slash-separated) unless excluded.
func (s *selector) add(name string) bool {
	if name == "." || name == "" {
		return false
	}
	for _, e := range s.exclude {
		if ok, _ := doublestar.Match(e[1], name); ok {
			s.excluded[e[0]]++
			return false
		}
	}
	if _, seen := s.files[name]; seen {
		return true
	}
	info, err := os.Lstat(filepath.Join(s.dir, filepath.FromSlash(name)))
	if err != nil {
		if !os.IsNotExist(err) {
			s.logf("WARNING: %s: %v", name, err)
		}
		return false
	}
	if isGitDir(name) {
		s.logf("WARNING: Part of .git directory is on the list of files to archive: %s", name)
	}
	s.files[name] = info
	return true
}

func isGitDir(name string) bool { return name == ".git" || strings.HasPrefix(name, ".git/") }

// untracked adds the files `git ls-files -o -z` lists in the directory.
func (s *selector) untracked(ctx context.Context) error {
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, "git", "ls-files", "-o", "-z")
	cmd.Dir = s.dir
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		s.logf("WARNING: untracked: git ls-files: %v: %s", err, strings.TrimSpace(errb.String()))
		return nil
	}
	found := 0
	sc := bufio.NewScanner(&out)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	sc.Split(func(data []byte, atEOF bool) (int, []byte, error) {
		if i := bytes.IndexByte(data, 0); i >= 0 {
			return i + 1, data[:i], nil
		}
		if atEOF && len(data) > 0 {
			return len(data), data, nil
		}
		return 0, nil, nil
	})
	for sc.Scan() {
		name := strings.TrimSuffix(filepath.ToSlash(sc.Text()), "/")
		if !filepath.IsLocal(filepath.FromSlash(name)) {
			continue
		}
		if s.add(name) {
			found++
		}
	}
	if found == 0 {
		s.logf("WARNING: untracked: no files")
	} else {
		s.logf("untracked: found %d files", found)
	}
	return nil
}
