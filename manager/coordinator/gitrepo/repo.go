package gitrepo

import (
	"bytes"
	"context"
	"crypto/sha1"
	"encoding/hex"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// maxReadFile bounds ReadFile (a .gitlab-ci.yml is at most 2 MB in GitLab).
const maxReadFile = 4 << 20

// maxListedFiles bounds the file list used for rules:exists and cache keys.
const maxListedFiles = 200_000

// Commit describes a commit, for the CI_COMMIT_* variables.
type Commit struct {
	SHA         string
	Parent      string // first parent; "" for a root commit
	AuthorName  string
	AuthorEmail string
	Timestamp   time.Time
	Message     string
}

// Title is the first line of the message.
func (c Commit) Title() string {
	t, _, _ := strings.Cut(strings.TrimSpace(c.Message), "\n")
	return t
}

// Description is the message after the title (GitLab's CI_COMMIT_DESCRIPTION).
func (c Commit) Description() string {
	_, d, _ := strings.Cut(strings.TrimSpace(c.Message), "\n")
	return strings.TrimLeft(d, "\n")
}

// Commit reads commit sha (or a ref).
func (r *Repo) Commit(ctx context.Context, rev string) (Commit, error) {
	out, err := r.g.run(ctx, r.Dir, nil, nil, "show", "-s", "--format=%H%x00%P%x00%an%x00%ae%x00%aI%x00%B", rev+"^{commit}", "--")
	if err != nil {
		return Commit{}, fmt.Errorf("project %s: %w", r.Path, err)
	}
	f := strings.SplitN(string(out), "\x00", 6)
	if len(f) != 6 {
		return Commit{}, fmt.Errorf("project %s: unexpected git show output for %s", r.Path, rev)
	}
	ts, err := time.Parse(time.RFC3339, f[4])
	if err != nil {
		return Commit{}, fmt.Errorf("project %s: commit date %q: %w", r.Path, f[4], err)
	}
	parent, _, _ := strings.Cut(f[1], " ")
	return Commit{SHA: f[0], Parent: parent, AuthorName: f[2], AuthorEmail: f[3], Timestamp: ts, Message: strings.TrimRight(f[5], "\n")}, nil
}

// ReadFile returns the content of file p at commit sha; it fails if the
// file does not exist or is larger than 4 MiB.
func (r *Repo) ReadFile(ctx context.Context, sha, p string) ([]byte, error) {
	obj := sha + ":" + strings.TrimPrefix(p, "/")
	size, err := r.g.trimmed(ctx, r.Dir, "cat-file", "-s", obj)
	if err != nil {
		return nil, fmt.Errorf("%s is not in commit %.8s", p, sha)
	}
	if n, err := strconv.Atoi(size); err != nil || n > maxReadFile {
		return nil, fmt.Errorf("%s is larger than %d bytes", p, maxReadFile)
	}
	return r.g.run(ctx, r.Dir, nil, nil, "cat-file", "blob", obj)
}

// SetRef points ref (such as refs/pipelines/7) at sha.
func (r *Repo) SetRef(ctx context.Context, ref, sha string) error {
	if _, err := r.g.run(ctx, r.Dir, nil, nil, "update-ref", ref, sha); err != nil {
		return fmt.Errorf("project %s: %w", r.Path, err)
	}
	return nil
}

// Submodules lists the submodules of commit sha (its .gitmodules).
func (r *Repo) Submodules(ctx context.Context, sha string) []Submodule {
	data, err := r.ReadFile(ctx, sha, ".gitmodules")
	if err != nil {
		return nil
	}
	return ParseGitmodules(data)
}

var (
	filesMu    sync.Mutex
	filesCache = map[string][]string{} // dir+sha → files; commits never change
)

// Files lists the files of commit sha (at most 200 000).
func (r *Repo) Files(ctx context.Context, sha string) ([]string, error) {
	key := r.Dir + "\x00" + sha
	filesMu.Lock()
	files, ok := filesCache[key]
	filesMu.Unlock()
	if ok {
		return files, nil
	}
	out, err := r.g.run(ctx, r.Dir, nil, nil, "ls-tree", "-r", "-z", "--name-only", sha)
	if err != nil {
		return nil, fmt.Errorf("project %s: %w", r.Path, err)
	}
	for _, f := range bytes.Split(out, []byte{0}) {
		if len(f) > 0 {
			files = append(files, string(f))
		}
		if len(files) > maxListedFiles {
			return nil, fmt.Errorf("project %s: more than %d files", r.Path, maxListedFiles)
		}
	}
	filesMu.Lock()
	if len(filesCache) > 64 {
		clear(filesCache)
	}
	filesCache[key] = files
	filesMu.Unlock()
	return files, nil
}

// Exists reports whether a file of commit sha matches glob (rules:exists:
// * within a directory, ** across directories, ?, {a,b}).
func (r *Repo) Exists(ctx context.Context, sha, glob string) bool {
	re, err := globRegexp(glob)
	if err != nil {
		return false
	}
	files, err := r.Files(ctx, sha)
	if err != nil {
		return false
	}
	return slices.ContainsFunc(files, re.MatchString)
}

// CacheKeyDigest is GitLab's cache:key:files digest: the SHA-1 of the
// sorted, unique blob ids of the files (globs expanded) joined by "-".
// ok is false when no file matches (GitLab then uses "default").
func (r *Repo) CacheKeyDigest(ctx context.Context, sha string, patterns []string) (string, bool) {
	var paths []string
	for _, p := range patterns {
		p = strings.TrimPrefix(p, "/")
		if !strings.Contains(p, "*") {
			paths = append(paths, p)
			continue
		}
		re, err := globRegexp(p)
		if err != nil {
			continue
		}
		files, err := r.Files(ctx, sha)
		if err != nil {
			continue
		}
		for _, f := range files {
			if re.MatchString(f) {
				paths = append(paths, f)
			}
		}
	}
	var ids []string
	for _, p := range paths {
		if id, err := r.g.trimmed(ctx, r.Dir, "rev-parse", "--verify", "--quiet", sha+":"+p); err == nil && id != "" {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	ids = slices.Compact(ids)
	if len(ids) == 0 {
		return "", false
	}
	sum := sha1.Sum([]byte(strings.Join(ids, "-")))
	return hex.EncodeToString(sum[:]), true
}

// globRegexp turns a rules:exists glob into an anchored regular expression.
func globRegexp(glob string) (*regexp.Regexp, error) {
	glob = strings.TrimPrefix(glob, "/")
	var b strings.Builder
	b.WriteString("^")
	inBraces := false
	for i := 0; i < len(glob); i++ {
		c := glob[i]
		switch {
		case c == '*' && strings.HasPrefix(glob[i:], "**/"):
			b.WriteString("(?:.*/)?")
			i += 2
		case c == '*' && strings.HasPrefix(glob[i:], "**"):
			b.WriteString(".*")
			i++
		case c == '*':
			b.WriteString("[^/]*")
		case c == '?':
			b.WriteString("[^/]")
		case c == '{' && !inBraces:
			b.WriteString("(?:")
			inBraces = true
		case c == '}' && inBraces:
			b.WriteString(")")
			inBraces = false
		case c == ',' && inBraces:
			b.WriteString("|")
		default:
			b.WriteString(regexp.QuoteMeta(string(c)))
		}
	}
	if inBraces {
		return nil, fmt.Errorf("glob %q: unclosed {", glob)
	}
	b.WriteString("$")
	return regexp.Compile(b.String())
}

// ResolveRef finds a branch or tag of the repository: its commit and
// whether it is a "branch" or a "tag".
func (r *Repo) ResolveRef(ctx context.Context, ref string) (sha, refType string, err error) {
	if strings.HasPrefix(ref, "-") || strings.Contains(ref, "..") {
		return "", "", fmt.Errorf("project %s: %q is not a ref name", r.Path, ref)
	}
	for _, c := range []struct{ prefix, typ string }{{"refs/heads/", "branch"}, {"refs/tags/", "tag"}} {
		if sha, err := r.g.trimmed(ctx, r.Dir, "rev-parse", "--verify", "--quiet", c.prefix+ref+"^{commit}"); err == nil && sha != "" {
			return sha, c.typ, nil
		}
	}
	return "", "", fmt.Errorf("project %s has no branch or tag %q", r.Path, ref)
}
