package runnerapi

import (
	"fmt"
	"net/url"
	"regexp"
	"strings"
	"unicode/utf8"
)

// FieldError is a job payload field that cannot be used safely.
type FieldError struct {
	// Field is the field's path in the payload, such as "variables[3].key".
	Field string
	// Msg says what is wrong with it.
	Msg string
}

func (e *FieldError) Error() string { return "field " + e.Field + ": " + e.Msg }

// Limits on what a job payload may carry. They are far above what GitLab
// sends and keep one payload from costing the manager much.
const (
	maxTokenLen    = 1024
	maxNameLen     = 1024   // names, refs, keys, aliases
	maxListLen     = 10_000 // entries of any list
	maxTextLen     = 1 << 20
	maxVariableLen = 1 << 20 // one variable's value
)

var (
	variableKey = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	stepName    = regexp.MustCompile(`^[a-z0-9_]+$`)
	hexSHA      = regexp.MustCompile(`^([0-9a-f]{40}|[0-9a-f]{64})$`)
	hostLabel   = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$`)
	lowerWord   = regexp.MustCompile(`^[a-z0-9_]+$`)
)

// Validate checks, once, every field of a job payload that reaches an HTTP
// header, a path, a file name, a command line or the environment, so that
// nothing later has to: a payload that passes is safe to use. The error is
// a *FieldError naming the first field at fault.
func (j *JobResponse) Validate() error {
	v := &validator{}
	v.positive("id", j.ID)
	v.token("token", j.Token)
	v.text("job_info.name", j.JobInfo.Name, maxNameLen)
	v.text("job_info.stage", j.JobInfo.Stage, maxNameLen)
	v.text("job_info.project_name", j.JobInfo.ProjectName, maxNameLen)
	if j.JobInfo.ProjectID < 0 {
		v.fail("job_info.project_id", "must not be negative, got %d", j.JobInfo.ProjectID)
	}
	v.gitInfo(&j.GitInfo)
	v.list("variables", len(j.Variables))
	for i, x := range j.Variables {
		v.variable(fmt.Sprintf("variables[%d]", i), x)
	}
	if len(j.Steps) == 0 {
		v.fail("steps", "empty, nothing to run")
	}
	v.list("steps", len(j.Steps))
	for i, s := range j.Steps {
		f := fmt.Sprintf("steps[%d]", i)
		v.match(f+".name", s.Name, stepName, "lowercase letters, digits and _")
		v.oneOf(f+".when", s.When, "", WhenOnSuccess, WhenOnFailure, WhenAlways)
		v.lines(f+".script", s.Script)
		if s.Timeout < 0 {
			v.fail(f+".timeout", "must not be negative, got %d", s.Timeout)
		}
	}
	if j.Image != nil {
		v.image("image", j.Image, false)
	}
	v.list("services", len(j.Services))
	for i := range j.Services {
		v.image(fmt.Sprintf("services[%d]", i), &j.Services[i], true)
	}
	v.list("artifacts", len(j.Artifacts))
	for i, a := range j.Artifacts {
		f := fmt.Sprintf("artifacts[%d]", i)
		v.text(f+".name", a.Name, maxNameLen)
		v.paths(f+".paths", a.Paths)
		v.paths(f+".exclude", a.Exclude)
		v.oneOf(f+".when", a.When, "", WhenOnSuccess, WhenOnFailure, WhenAlways)
		if a.Type != "" {
			v.match(f+".artifact_type", a.Type, lowerWord, "lowercase letters, digits and _")
		}
		v.oneOf(f+".artifact_format", a.Format, "", "zip", "gzip", "raw")
		v.text(f+".expire_in", a.ExpireIn, maxNameLen)
	}
	v.list("cache", len(j.Cache))
	for i, c := range j.Cache {
		f := fmt.Sprintf("cache[%d]", i)
		v.cacheKey(f+".key", c.Key)
		v.list(f+".fallback_keys", len(c.FallbackKeys))
		for k, key := range c.FallbackKeys {
			v.cacheKey(fmt.Sprintf("%s.fallback_keys[%d]", f, k), key)
		}
		v.paths(f+".paths", c.Paths)
		v.oneOf(f+".policy", c.Policy, "", "pull", "push", "pull-push")
		v.oneOf(f+".when", c.When, "", WhenOnSuccess, WhenOnFailure, WhenAlways)
	}
	v.list("credentials", len(j.Credentials))
	for i, c := range j.Credentials {
		f := fmt.Sprintf("credentials[%d]", i)
		v.text(f+".type", c.Type, maxNameLen)
		v.text(f+".url", c.URL, maxNameLen)
		v.text(f+".username", c.Username, maxNameLen)
		v.text(f+".password", c.Password, maxTokenLen)
	}
	v.list("dependencies", len(j.Dependencies))
	for i, d := range j.Dependencies {
		f := fmt.Sprintf("dependencies[%d]", i)
		v.positive(f+".id", d.ID)
		v.token(f+".token", d.Token)
		v.text(f+".name", d.Name, maxNameLen)
		if fn := d.ArtifactsFile.Filename; fn != "" {
			v.text(f+".artifacts_file.filename", fn, maxNameLen)
			if strings.ContainsAny(fn, `/\`) || fn == "." || fn == ".." {
				v.fail(f+".artifacts_file.filename", "must be a plain file name, got %q", fn)
			}
		}
		if d.ArtifactsFile.Size < 0 {
			v.fail(f+".artifacts_file.size", "must not be negative")
		}
	}
	v.list("hooks", len(j.Hooks))
	for i, h := range j.Hooks {
		f := fmt.Sprintf("hooks[%d]", i)
		v.match(f+".name", h.Name, stepName, "lowercase letters, digits and _")
		v.lines(f+".script", h.Script)
	}
	if v.err == nil {
		return nil
	}
	return v.err
}

// validator keeps the first error of a Validate run.
type validator struct{ err *FieldError }

func (v *validator) fail(field, format string, args ...any) {
	if v.err == nil {
		v.err = &FieldError{Field: field, Msg: fmt.Sprintf(format, args...)}
	}
}

func (v *validator) positive(field string, n int64) {
	if n <= 0 {
		v.fail(field, "must be a positive integer, got %d", n)
	}
}

// HeaderSafe reports whether a token can be sent in an HTTP header (the
// Job-Token of trace and artifact calls): visible ASCII only.
func HeaderSafe(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] >= 0x7f {
			return false
		}
	}
	return s != ""
}

// token checks a value sent in an HTTP header: visible ASCII only.
func (v *validator) token(field, s string) {
	switch {
	case s == "":
		v.fail(field, "empty")
	case len(s) > maxTokenLen:
		v.fail(field, "longer than %d bytes", maxTokenLen)
	default:
		for i := 0; i < len(s); i++ {
			if s[i] <= ' ' || s[i] >= 0x7f {
				v.fail(field, "byte %d is %q: a token must be visible ASCII (it is sent in an HTTP header)", i, s[i])
				return
			}
		}
	}
}

// text checks free text that ends up in logs, file names or arguments:
// valid UTF-8, no NUL, no line breaks or other control characters.
func (v *validator) text(field, s string, maxLen int) {
	if len(s) > maxLen {
		v.fail(field, "longer than %d bytes", maxLen)
		return
	}
	if !utf8.ValidString(s) {
		v.fail(field, "not valid UTF-8")
		return
	}
	for _, r := range s {
		if r < ' ' || r == 0x7f {
			v.fail(field, "contains the control character %q", r)
			return
		}
	}
}

// lines checks script lines: any text but NUL, which no shell can take.
func (v *validator) lines(field string, ls []string) {
	v.list(field, len(ls))
	for i, l := range ls {
		switch {
		case len(l) > maxTextLen:
			v.fail(fmt.Sprintf("%s[%d]", field, i), "longer than %d bytes", maxTextLen)
		case strings.IndexByte(l, 0) >= 0:
			v.fail(fmt.Sprintf("%s[%d]", field, i), "contains NUL")
		}
	}
}

func (v *validator) list(field string, n int) {
	if n > maxListLen {
		v.fail(field, "more than %d entries", maxListLen)
	}
}

func (v *validator) match(field, s string, re *regexp.Regexp, want string) {
	if len(s) > maxNameLen || !re.MatchString(s) {
		v.fail(field, "%q: want %s", s, want)
	}
}

func (v *validator) oneOf(field, s string, allowed ...string) {
	for _, a := range allowed {
		if s == a {
			return
		}
	}
	v.fail(field, "%q is not one of %s", s, strings.Join(allowed[1:], ", "))
}

// paths checks globs relative to the build directory.
func (v *validator) paths(field string, ps []string) {
	v.list(field, len(ps))
	for i, p := range ps {
		v.text(fmt.Sprintf("%s[%d]", field, i), p, maxNameLen)
	}
}

// cacheKey checks a key that becomes part of an object name or a path:
// no separators that climb out, no control characters.
func (v *validator) cacheKey(field, key string) {
	v.text(field, key, maxNameLen)
	for _, part := range strings.FieldsFunc(key, func(r rune) bool { return r == '/' || r == '\\' }) {
		if part == ".." || part == "." {
			v.fail(field, "%q: a cache key must not contain . or .. path elements", key)
			return
		}
	}
	if strings.HasPrefix(key, "/") || strings.HasPrefix(key, `\`) {
		v.fail(field, "%q: a cache key must not start with a path separator", key)
	}
}

func (v *validator) variable(field string, x Variable) {
	if len(x.Key) > maxNameLen || !variableKey.MatchString(x.Key) {
		v.fail(field+".key", "%q: want letters, digits and _, not starting with a digit", x.Key)
	}
	switch {
	case len(x.Value) > maxVariableLen:
		v.fail(field+".value", "longer than %d bytes", maxVariableLen)
	case strings.IndexByte(x.Value, 0) >= 0:
		v.fail(field+".value", "contains NUL")
	}
}

func (v *validator) image(field string, im *Image, service bool) {
	v.text(field+".name", im.Name, maxNameLen)
	if strings.ContainsAny(im.Name, " \t") {
		v.fail(field+".name", "%q contains a space", im.Name)
	}
	if service && im.Name == "" {
		v.fail(field+".name", "empty")
	}
	if im.Alias != "" {
		for _, a := range strings.Split(im.Alias, ",") { // GitLab accepts several, comma-separated
			if len(a) > 253 || !hostLabel.MatchString(strings.TrimSpace(a)) {
				v.fail(field+".alias", "%q is not a host name", a)
			}
		}
	}
	v.lines(field+".command", im.Command)
	v.lines(field+".entrypoint", im.Entrypoint)
	v.list(field+".variables", len(im.Variables))
	for i, x := range im.Variables {
		v.variable(fmt.Sprintf("%s.variables[%d]", field, i), x)
	}
	for i, p := range im.PullPolicy {
		v.oneOf(fmt.Sprintf("%s.pull_policy[%d]", field, i), p, "", "always", "if-not-present", "never")
	}
	for i, p := range im.Ports {
		if p.Number < 0 || p.Number > 65535 {
			v.fail(fmt.Sprintf("%s.ports[%d].number", field, i), "%d is not a port", p.Number)
		}
	}
}

// gitInfo checks what reaches git's command line and the clone URL.
func (v *validator) gitInfo(g *GitInfo) {
	if g.RepoURL != "" {
		v.text("git_info.repo_url", g.RepoURL, maxNameLen)
		u, err := url.Parse(g.RepoURL)
		switch {
		case err != nil:
			v.fail("git_info.repo_url", "not a URL: %v", err)
		case u.Scheme != "http" && u.Scheme != "https":
			v.fail("git_info.repo_url", "scheme %q: want http or https", u.Scheme)
		case u.Host == "":
			v.fail("git_info.repo_url", "no host")
		}
	}
	v.text("git_info.ref", g.Ref, maxNameLen)
	if strings.HasPrefix(g.Ref, "-") {
		v.fail("git_info.ref", "%q starts with -", g.Ref)
	}
	for _, f := range []struct{ name, sha string }{{"git_info.sha", g.Sha}, {"git_info.before_sha", g.BeforeSha}} {
		if f.sha != "" && !hexSHA.MatchString(f.sha) {
			v.fail(f.name, "%q: want 40 or 64 lowercase hex digits", f.sha)
		}
	}
	v.oneOf("git_info.ref_type", g.RefType, "", "branch", "tag")
	v.list("git_info.refspecs", len(g.Refspecs))
	for i, r := range g.Refspecs {
		f := fmt.Sprintf("git_info.refspecs[%d]", i)
		v.text(f, r, maxNameLen)
		if strings.HasPrefix(r, "-") {
			v.fail(f, "%q starts with -", r)
		}
	}
	if g.Depth < 0 {
		v.fail("git_info.depth", "must not be negative, got %d", g.Depth)
	}
	v.oneOf("git_info.repo_object_format", g.RepoObjectFormat, "", "sha1", "sha256")
}
