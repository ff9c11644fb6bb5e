package gitrepo

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"
)

// Store holds bare repositories under Root, one per project path
// ("group/name" → Root/group/name.git).
type Store struct {
	root string
	g    *runner
	// importMu serializes imports and refreshes: they write a repository's
	// index and refs.
	importMu sync.Mutex

	mu    sync.Mutex
	repos map[string]*Repo
}

// Repo is one served repository.
type Repo struct {
	Path          string // project path, "root/app"
	Dir           string // the bare repository
	Source        string // the directory it was imported from
	DefaultBranch string
	Head          string // commit of DefaultBranch at import
	// Dirty tells that the source work tree had changes that were not
	// committed (and so are not served).
	Dirty bool

	g *runner
}

var projectPath = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)+$`)

// NewStore makes a store under root (created if missing).
func NewStore(root string) (*Store, error) {
	git, err := findGit()
	if err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("git store %s: %w", root, err)
	}
	home := filepath.Join(abs, ".home")
	if err := os.MkdirAll(home, 0o700); err != nil {
		return nil, fmt.Errorf("git store: %w", err)
	}
	return &Store{root: abs, g: &runner{git: git, home: home}, repos: map[string]*Repo{}}, nil
}

// Root is the directory holding the repositories.
func (s *Store) Root() string { return s.root }

// Repo returns the repository of a project path, or nil.
func (s *Store) Repo(projectPath string) *Repo {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.repos[projectPath]
}

// Source is a directory to serve as the project Path.
type Source struct {
	Path string // "root/app"
	Dir  string
}

// ImportAll imports sources so that plain directories come after the
// projects their .gitmodules name.
func (s *Store) ImportAll(ctx context.Context, sources []Source) ([]*Repo, error) {
	seen := map[string]bool{}
	for _, src := range sources {
		if seen[src.Path] {
			return nil, fmt.Errorf("project %s is given twice", src.Path)
		}
		seen[src.Path] = true
	}
	order, err := importOrder(sources)
	if err != nil {
		return nil, err
	}
	out := make([]*Repo, len(sources))
	for _, i := range order {
		r, err := s.Import(ctx, sources[i])
		if err != nil {
			return nil, err
		}
		out[i] = r
	}
	return out, nil
}

// importOrder sorts sources so that each plain directory follows the other
// sources its .gitmodules names.
func importOrder(sources []Source) ([]int, error) {
	byPath := map[string]int{}
	for i, s := range sources {
		byPath[s.Path] = i
	}
	state := make([]int, len(sources))
	var order []int
	var visit func(i int, chain []string) error
	visit = func(i int, chain []string) error {
		switch state[i] {
		case 1:
			return fmt.Errorf("submodules form a cycle: %s", strings.Join(append(chain, sources[i].Path), " → "))
		case 2:
			return nil
		}
		state[i] = 1
		if !isGitDir(sources[i].Dir) {
			mods, _ := parseGitmodules(filepath.Join(sources[i].Dir, ".gitmodules"))
			for _, m := range mods {
				if target, ok := ResolveRelative(sources[i].Path, m.URL); ok {
					if j, ok := byPath[target]; ok {
						if err := visit(j, append(chain, sources[i].Path)); err != nil {
							return err
						}
					}
				}
			}
		}
		state[i] = 2
		order = append(order, i)
		return nil
	}
	for i := range sources {
		if err := visit(i, nil); err != nil {
			return nil, err
		}
	}
	return order, nil
}

func isGitDir(dir string) bool {
	if st, err := os.Stat(filepath.Join(dir, ".git")); err == nil && (st.IsDir() || st.Mode().IsRegular()) {
		return true
	}
	_, errH := os.Stat(filepath.Join(dir, "HEAD"))
	_, errO := os.Stat(filepath.Join(dir, "objects"))
	return errH == nil && errO == nil
}

// Import (re)makes the repository of src.Path from src.Dir. An existing
// repository of that path is replaced.
func (s *Store) Import(ctx context.Context, src Source) (*Repo, error) {
	s.importMu.Lock()
	defer s.importMu.Unlock()
	if !projectPath.MatchString(src.Path) || strings.Contains(src.Path, "..") {
		return nil, fmt.Errorf("project path %q: want namespace/name of letters, digits, _ . -", src.Path)
	}
	st, err := os.Stat(src.Dir)
	if err != nil {
		return nil, fmt.Errorf("project %s: %w", src.Path, err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("project %s: %s is not a directory", src.Path, src.Dir)
	}
	abs, err := filepath.Abs(src.Dir)
	if err != nil {
		return nil, fmt.Errorf("project %s: %w", src.Path, err)
	}
	dest := filepath.Join(s.root, filepath.FromSlash(src.Path)+".git")
	if err := os.RemoveAll(dest); err != nil {
		return nil, fmt.Errorf("project %s: remove old repository: %w", src.Path, err)
	}
	if err := os.MkdirAll(filepath.Dir(dest), 0o755); err != nil {
		return nil, fmt.Errorf("project %s: %w", src.Path, err)
	}
	r := &Repo{Path: src.Path, Dir: dest, Source: abs, g: s.g}
	if isGitDir(abs) {
		err = s.cloneRepo(ctx, r)
	} else {
		if _, err = s.g.run(ctx, s.root, nil, nil, "init", "--quiet", "--bare", "--initial-branch=main", r.Dir); err == nil {
			err = s.commitDir(ctx, r, "")
		}
	}
	if err != nil {
		_ = os.RemoveAll(dest)
		return nil, fmt.Errorf("project %s from %s: %w", src.Path, abs, err)
	}
	// Served repositories are read-only and need no reflogs or hooks.
	if _, err := s.g.run(ctx, dest, nil, nil, "config", "http.receivepack", "false"); err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.repos[src.Path] = r
	s.mu.Unlock()
	return r, nil
}

// cloneRepo copies a git repository: every branch and tag, the source's
// current branch as the default one.
func (s *Store) cloneRepo(ctx context.Context, r *Repo) error {
	if _, err := s.g.run(ctx, s.root, nil, nil, "clone", "--bare", "--quiet", "--", r.Source, r.Dir); err != nil {
		return err
	}
	return s.readSourceHead(ctx, r)
}

// readSourceHead sets r's default branch and head from its git source.
func (s *Store) readSourceHead(ctx context.Context, r *Repo) error {
	head, err := s.g.trimmed(ctx, r.Source, "rev-parse", "--verify", "HEAD^{commit}")
	if err != nil {
		return fmt.Errorf("the repository has no commit: %w", err)
	}
	branch, err := s.g.trimmed(ctx, r.Source, "symbolic-ref", "--quiet", "--short", "HEAD")
	if err != nil || branch == "" {
		branch = "main" // detached HEAD: serve it as main
		if _, err := s.g.run(ctx, r.Dir, nil, nil, "update-ref", "refs/heads/main", head); err != nil {
			return err
		}
		if _, err := s.g.run(ctx, r.Dir, nil, nil, "symbolic-ref", "HEAD", "refs/heads/main"); err != nil {
			return err
		}
	}
	r.DefaultBranch, r.Head = branch, head
	if out, err := s.g.run(ctx, r.Source, nil, nil, "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"); err == nil && len(bytes.TrimSpace(out)) > 0 {
		r.Dirty = true
	}
	return nil
}

// commitDir commits a plain directory as it is on branch main (on top of
// parent, unless the tree did not change), linking the submodules its
// .gitmodules names among the store's projects.
func (s *Store) commitDir(ctx context.Context, r *Repo, parent string) error {
	index := filepath.Join(r.Dir, "mayfly-import.index")
	defer os.Remove(index)
	env := []string{"GIT_DIR=" + r.Dir, "GIT_WORK_TREE=" + r.Source, "GIT_INDEX_FILE=" + index}
	if _, err := s.g.run(ctx, r.Source, env, nil, "add", "--all", "."); err != nil {
		return err
	}
	mods, err := parseGitmodules(filepath.Join(r.Source, ".gitmodules"))
	if err != nil {
		return err
	}
	for _, m := range mods {
		target, ok := ResolveRelative(r.Path, m.URL)
		if !ok {
			return fmt.Errorf(".gitmodules: submodule %q: url %q is not relative (../name.git); only other --project directories can be submodules", m.Name, m.URL)
		}
		sub := s.Repo(target)
		if sub == nil {
			return fmt.Errorf(".gitmodules: submodule %q: url %q names project %s, which is not served", m.Name, m.URL, target)
		}
		if _, err := s.g.run(ctx, r.Source, env, nil, "rm", "-r", "--cached", "--quiet", "--ignore-unmatch", "--", m.Path); err != nil {
			return err
		}
		if _, err := s.g.run(ctx, r.Source, env, nil, "update-index", "--add", "--cacheinfo", "160000,"+sub.Head+","+m.Path); err != nil {
			return err
		}
	}
	treeOut, err := s.g.run(ctx, r.Dir, []string{"GIT_INDEX_FILE=" + index}, nil, "write-tree")
	if err != nil {
		return err
	}
	tree := strings.TrimSpace(string(treeOut))
	if parent != "" {
		if old, err := s.g.trimmed(ctx, r.Dir, "rev-parse", parent+"^{tree}"); err == nil && old == tree {
			r.DefaultBranch, r.Head = "main", parent
			return nil
		}
	}
	when := time.Now().UTC().Format(time.RFC3339)
	idEnv := []string{"GIT_AUTHOR_NAME=mayfly", "GIT_AUTHOR_EMAIL=mayfly@localhost", "GIT_AUTHOR_DATE=" + when,
		"GIT_COMMITTER_NAME=mayfly", "GIT_COMMITTER_EMAIL=mayfly@localhost", "GIT_COMMITTER_DATE=" + when}
	args := []string{"commit-tree", tree, "-m", "Import " + filepath.Base(r.Source) + " by mayfly coordinator"}
	if parent != "" {
		args = append(args, "-p", parent)
	}
	out, err := s.g.run(ctx, r.Dir, idEnv, nil, args...)
	if err != nil {
		return err
	}
	commit := strings.TrimSpace(string(out))
	if _, err := s.g.run(ctx, r.Dir, nil, nil, "update-ref", "refs/heads/main", commit); err != nil {
		return err
	}
	r.DefaultBranch, r.Head = "main", commit
	return nil
}

// Refresh brings the repository of a project up to date with its source,
// as a push would: a git source's branches and tags are fetched, a plain
// directory is committed again on top of the default branch. Pipeline refs
// stay. It returns the repository as it is now and the commit its default
// branch pointed at before.
func (s *Store) Refresh(ctx context.Context, project string) (*Repo, string, error) {
	s.importMu.Lock()
	defer s.importMu.Unlock()
	s.mu.Lock()
	old := s.repos[project]
	s.mu.Unlock()
	if old == nil {
		return nil, "", fmt.Errorf("project %s is not served", project)
	}
	r := &Repo{Path: old.Path, Dir: old.Dir, Source: old.Source, g: s.g}
	var err error
	if isGitDir(r.Source) {
		_, err = s.g.run(ctx, r.Dir, nil, nil, "fetch", "--quiet", "--prune", "--force", "--", r.Source, "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
		if err == nil {
			err = s.readSourceHead(ctx, r)
		}
		if err == nil {
			_, err = s.g.run(ctx, r.Dir, nil, nil, "symbolic-ref", "HEAD", "refs/heads/"+r.DefaultBranch)
		}
	} else {
		err = s.commitDir(ctx, r, old.Head)
	}
	if err != nil {
		return nil, "", fmt.Errorf("refresh project %s from %s: %w", project, r.Source, err)
	}
	s.mu.Lock()
	s.repos[project] = r
	s.mu.Unlock()
	return r, old.Head, nil
}

// Submodule is one entry of .gitmodules.
type Submodule struct {
	Name, Path, URL string
}

// parseGitmodules reads a .gitmodules file; a missing file has none.
func parseGitmodules(file string) ([]Submodule, error) {
	data, err := os.ReadFile(file)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return ParseGitmodules(data), nil
}

// ParseGitmodules reads the submodules of a .gitmodules file (git config
// syntax: [submodule "name"] path = …, url = …).
func ParseGitmodules(data []byte) []Submodule {
	var out []Submodule
	var cur *Submodule
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		if strings.HasPrefix(line, "[") {
			cur = nil
			if rest, ok := strings.CutPrefix(line, "[submodule"); ok {
				name := strings.Trim(strings.TrimSpace(strings.TrimSuffix(rest, "]")), `"`)
				out = append(out, Submodule{Name: name})
				cur = &out[len(out)-1]
			}
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || cur == nil {
			continue
		}
		v = strings.Trim(strings.TrimSpace(v), `"`)
		switch strings.ToLower(strings.TrimSpace(k)) {
		case "path":
			cur.Path = v
		case "url":
			cur.URL = v
		}
	}
	return slices.DeleteFunc(out, func(m Submodule) bool { return m.Path == "" || m.URL == "" })
}

// ResolveRelative resolves a submodule's relative URL (../lib.git,
// ../../group/lib.git) against the superproject's path ("root/app") as git
// does against the project's URL, and returns the project path it names
// ("root/lib").
func ResolveRelative(project, url string) (string, bool) {
	if !strings.HasPrefix(url, "../") {
		return "", false
	}
	base, rest := project, url
	for strings.HasPrefix(rest, "../") {
		base, rest = path.Dir(base), rest[3:]
	}
	if base == "." || base == "/" || rest == "" {
		return "", false
	}
	target := path.Clean(base + "/" + strings.TrimSuffix(rest, ".git"))
	if !projectPath.MatchString(target) {
		return "", false
	}
	return target, true
}
