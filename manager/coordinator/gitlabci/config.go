package gitlabci

import (
	"fmt"
	"path"
	"slices"
	"strings"
)

// Options tune Parse.
type Options struct {
	// ReadFile reads a file of the repository at the pipeline's commit, for
	// include: local (path relative to the repository root). Nil: include:
	// local is refused with a warning.
	ReadFile func(path string) ([]byte, error)
}

// Limits of include: and extends:, as GitLab has them.
const (
	maxIncludes     = 150
	maxExtendsDepth = 11
	maxRefDepth     = 10
)

// globalKeys are the top-level keywords; anything else is a job.
var globalKeys = []string{"default", "include", "stages", "types", "variables", "workflow",
	"image", "services", "cache", "before_script", "after_script", "spec"}

// defaultKeys are the keywords default: may set for every job.
var defaultKeys = []string{"after_script", "artifacts", "before_script", "cache", "hooks",
	"image", "interruptible", "retry", "services", "tags", "timeout", "id_tokens"}

// Parse loads a .gitlab-ci.yml. file names it in messages. Errors are
// *Error; unsupported keywords become Config.Warnings, one line each.
func Parse(file string, data []byte, opts Options) (*Config, error) {
	p := &parser{file: file}
	root, err := load(file, data, func(line int, msg string) { p.warnings = append(p.warnings, Warning{File: file, Line: line, Msg: msg}) })
	if err != nil {
		return nil, err
	}
	if root.kind == kindNull {
		return nil, &Error{File: file, Msg: "the configuration is empty"}
	}
	if root.kind != kindMap {
		return nil, &Error{File: file, Line: root.line, Msg: "the configuration should be a hash of jobs and keywords, not " + root.kind.String()}
	}
	root, err = p.includes(root, opts, map[string]bool{file: true}, new(int))
	if err != nil {
		return nil, err
	}
	cfg := &Config{File: file}
	if err := p.globals(root, cfg); err != nil {
		return nil, err
	}
	jobs, err := p.resolveExtends(root)
	if err != nil {
		return nil, err
	}
	// !reference sees the jobs as extended.
	resolved := root.without()
	for name, j := range jobs {
		resolved.set(name, j)
	}
	def := root.get("default")
	if def, err = p.references(resolved, def, 0); err != nil {
		return nil, err
	}
	defaults, err := p.defaults(root, def)
	if err != nil {
		return nil, err
	}
	for _, k := range root.keys {
		name := k.value
		if slices.Contains(globalKeys, name) || strings.HasPrefix(name, ".") {
			continue
		}
		jn, err := p.references(resolved, jobs[name], 0)
		if err != nil {
			return nil, err
		}
		job, err := p.job(name, k, jn, defaults, cfg)
		if err != nil {
			return nil, err
		}
		if job != nil {
			cfg.Jobs = append(cfg.Jobs, job)
		}
	}
	if len(cfg.Jobs) == 0 {
		return nil, &Error{File: file, Msg: "the configuration has no jobs (hidden .jobs do not run)"}
	}
	cfg.Warnings = p.warnings
	return cfg, nil
}

// includes merges include: local files under root (root's own keys win).
func (p *parser) includes(root *node, opts Options, seen map[string]bool, count *int) (*node, error) {
	inc := root.get("include")
	if inc == nil {
		return root, nil
	}
	var entries []*node
	switch inc.kind {
	case kindScalar, kindMap:
		entries = []*node{inc}
	case kindSeq:
		entries = inc.items
	default:
		return nil, p.errorf(inc, "include", "should be a path, a hash or a list of them")
	}
	merged := &node{kind: kindMap, file: root.file, line: root.line}
	for _, e := range entries {
		var local string
		switch {
		case e.kind == kindScalar && !strings.Contains(e.value, "://"):
			local = e.value
		case e.kind == kindMap && e.get("local") != nil:
			s, err := p.str(e.get("local"), "include: local")
			if err != nil {
				return nil, err
			}
			local = s
			for _, k := range e.keys {
				if k.value != "local" {
					p.warn(k, "include: "+k.value, "not supported by mayfly's coordinator; ignored")
				}
			}
		default:
			kind := "remote"
			if e.kind == kindMap && len(e.keys) > 0 {
				kind = e.keys[0].value
			}
			p.warn(e, "include: "+kind, "only include: local is supported by mayfly's coordinator; this include is skipped")
			continue
		}
		if opts.ReadFile == nil {
			p.warn(e, "include: local", "no repository to read %q from; skipped", local)
			continue
		}
		clean := strings.TrimPrefix(path.Clean("/"+local), "/")
		if strings.ContainsAny(clean, "*") {
			p.warn(e, "include: local", "wildcard includes are not supported by mayfly's coordinator; %q skipped", local)
			continue
		}
		if seen[clean] {
			return nil, p.errorf(e, "include", "%q is included twice or includes itself", local)
		}
		if *count++; *count > maxIncludes {
			return nil, p.errorf(e, "include", "more than %d included files", maxIncludes)
		}
		data, err := opts.ReadFile(clean)
		if err != nil {
			return nil, p.errorf(e, "include: local", "cannot read %q: %v", local, err)
		}
		sub, err := load(clean, data, func(line int, msg string) {
			p.warnings = append(p.warnings, Warning{File: clean, Line: line, Msg: msg})
		})
		if err != nil {
			return nil, err
		}
		if sub.kind == kindNull {
			continue
		}
		if sub.kind != kindMap {
			return nil, &Error{File: clean, Line: sub.line, Msg: "an included file should be a hash, not " + sub.kind.String()}
		}
		seen[clean] = true
		if sub, err = p.includes(sub, opts, seen, count); err != nil {
			return nil, err
		}
		merged = deepMerge(merged, sub)
	}
	return deepMerge(merged, root.without("include")), nil
}

// globals reads stages:, variables: and workflow:.
func (p *parser) globals(root *node, cfg *Config) error {
	stages := []string{"build", "test", "deploy"}
	key := "stages"
	if root.has("types") && !root.has("stages") {
		key = "types"
		p.warn(root.get("types"), "types", "is deprecated; read as stages:")
	}
	if n := root.get(key); n != nil {
		s, err := p.list(n, key)
		if err != nil {
			return err
		}
		stages = nil
		for i, st := range s {
			if st == "" {
				return p.errorf(n.items[i], fmt.Sprintf("%s[%d]", key, i), "a stage name cannot be empty")
			}
			if st == ".pre" || st == ".post" {
				continue
			}
			if slices.Contains(stages, st) {
				return p.errorf(n.items[i], key, "stage %q is listed twice", st)
			}
			stages = append(stages, st)
		}
	}
	cfg.Stages = slices.Concat([]string{".pre"}, stages, []string{".post"})
	if n := root.get("variables"); n != nil {
		v, err := p.variables(n, "variables")
		if err != nil {
			return err
		}
		cfg.Variables = v
	}
	if n := root.get("workflow"); n != nil {
		h, err := p.hash(n, "workflow")
		if err != nil {
			return err
		}
		wf := &Workflow{Line: n.line}
		for i, k := range h.keys {
			switch k.value {
			case "rules":
				if wf.Rules, err = p.rules(h.vals[i], "workflow: rules"); err != nil {
					return err
				}
			case "name":
				if wf.Name, err = p.str(h.vals[i], "workflow: name"); err != nil {
					return err
				}
			default:
				p.warn(k, "workflow: "+k.value, "not supported by mayfly's coordinator; ignored")
			}
		}
		cfg.Workflow = wf
	}
	if n := root.get("spec"); n != nil {
		p.warn(n, "spec", "inputs are not supported by mayfly's coordinator; ignored")
	}
	for i, k := range root.keys {
		v := root.vals[i]
		if !slices.Contains(globalKeys, k.value) && !strings.HasPrefix(k.value, ".") && v.kind != kindMap {
			return p.errorf(k, k.value, "a job should be a hash, not %s (or is this an unknown keyword?)", v.kind)
		}
	}
	return nil
}

// resolveExtends returns every job and hidden job (hash values of non-keyword
// top-level keys) with extends: applied.
func (p *parser) resolveExtends(root *node) (map[string]*node, error) {
	raw := map[string]*node{}
	for i, k := range root.keys {
		if !slices.Contains(globalKeys, k.value) && root.vals[i].kind == kindMap {
			raw[k.value] = root.vals[i]
		}
	}
	done := map[string]*node{}
	var resolve func(name string, chain []string) (*node, error)
	resolve = func(name string, chain []string) (*node, error) {
		if r, ok := done[name]; ok {
			return r, nil
		}
		n := raw[name]
		ext := n.get("extends")
		if ext == nil {
			done[name] = n
			return n, nil
		}
		if len(chain) >= maxExtendsDepth {
			return nil, p.errorf(ext, name+": extends", "nested deeper than %d levels (%s)", maxExtendsDepth, strings.Join(chain, " → "))
		}
		parents, err := p.strList(ext, name+": extends")
		if err != nil {
			return nil, err
		}
		var base *node
		for _, parent := range parents {
			if slices.Contains(chain, parent) || parent == name {
				return nil, p.errorf(ext, name+": extends", "circular: %s → %s", strings.Join(append(chain, name), " → "), parent)
			}
			if raw[parent] == nil {
				return nil, p.errorf(ext, name+": extends", "%q is not a job or hidden job of this configuration", parent)
			}
			pn, err := resolve(parent, append(slices.Clone(chain), name))
			if err != nil {
				return nil, err
			}
			base = deepMerge(base, pn.without("extends"))
		}
		r := deepMerge(base, n.without("extends"))
		done[name] = r
		return r, nil
	}
	for name := range raw {
		if _, err := resolve(name, nil); err != nil {
			return nil, err
		}
	}
	return done, nil
}

// references replaces !reference [job, key, …] tags in n with the values
// they name in root (jobs already extended).
func (p *parser) references(root, n *node, depth int) (*node, error) {
	if n == nil {
		return nil, nil
	}
	if n.tag == "!reference" {
		if depth >= maxRefDepth {
			return nil, p.errorf(n, "!reference", "nested deeper than %d levels", maxRefDepth)
		}
		if n.kind != kindSeq || len(n.items) == 0 {
			return nil, p.errorf(n, "!reference", "should be a list of keys, such as !reference [.setup, script]")
		}
		cur := root
		var names []string
		for _, it := range n.items {
			if it.kind != kindScalar {
				return nil, p.errorf(it, "!reference", "keys should be strings")
			}
			names = append(names, it.value)
			if cur = cur.get(it.value); cur == nil {
				return nil, p.errorf(n, "!reference", "[%s] names nothing in this configuration", strings.Join(names, ", "))
			}
		}
		return p.references(root, cur, depth+1)
	}
	switch n.kind {
	case kindSeq:
		out := &node{kind: kindSeq, tag: n.tag, file: n.file, line: n.line}
		for _, it := range n.items {
			v, err := p.references(root, it, depth)
			if err != nil {
				return nil, err
			}
			out.items = append(out.items, v)
		}
		return out, nil
	case kindMap:
		out := &node{kind: kindMap, tag: n.tag, file: n.file, line: n.line, keys: n.keys}
		for _, v := range n.vals {
			r, err := p.references(root, v, depth)
			if err != nil {
				return nil, err
			}
			out.vals = append(out.vals, r)
		}
		return out, nil
	}
	return n, nil
}

// defaults returns the job keywords every job inherits: default: plus the
// deprecated top-level image, services, cache, before_script, after_script.
func (p *parser) defaults(root, def *node) (*node, error) {
	out := &node{kind: kindMap, file: root.file, line: root.line}
	for _, k := range []string{"image", "services", "cache", "before_script", "after_script"} {
		if v := root.get(k); v != nil {
			out.set(k, v)
		}
	}
	if def == nil {
		return out, nil
	}
	if def.kind != kindMap {
		return nil, p.errorf(def, "default", "should be a hash, not %s", def.kind)
	}
	for i, k := range def.keys {
		if !slices.Contains(defaultKeys, k.value) {
			return nil, p.errorf(k, "default", "%q cannot be set in default: (allowed: %s)", k.value, strings.Join(defaultKeys, ", "))
		}
		out.setKey(k, def.vals[i])
	}
	return out, nil
}
