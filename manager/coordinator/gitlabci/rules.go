package gitlabci

import (
	"fmt"
	"path"
	"slices"
	"strings"
)

// rules reads rules: (or workflow: rules:).
func (p *parser) rules(n *node, key string) ([]Rule, error) {
	if n.kind != kindSeq {
		return nil, p.errorf(n, key, "should be a list of rules")
	}
	out := []Rule{}
	for i, it := range n.items {
		kp := fmt.Sprintf("%s[%d]", key, i)
		h, err := p.hash(it, kp)
		if err != nil {
			return nil, err
		}
		r := Rule{Line: it.line}
		for j, k := range h.keys {
			v, kk := h.vals[j], kp+": "+k.value
			switch k.value {
			case "if":
				if r.If, err = p.str(v, kk); err == nil {
					if r.ifExpr, err = CompileExpr(r.If); err != nil {
						err = p.errorf(v, kk, "%q: %v", r.If, err)
					}
				}
			case "when":
				r.When, err = p.oneOf(v, kk, "never", "on_success", "on_failure", "always", "manual", "delayed")
				if r.When == "delayed" {
					p.warn(v, kk, "delayed jobs are not supported by mayfly's coordinator; it starts as on_success")
					r.When = "on_success"
				}
			case "allow_failure":
				var b bool
				b, err = p.boolean(v, kk)
				r.AllowFailure = &b
			case "variables":
				r.Variables, err = p.variables(v, kk)
			case "exists":
				if v.kind == kindMap {
					if v.get("project") != nil || v.get("ref") != nil {
						p.warn(v, kk, "exists in other projects is not supported by mayfly's coordinator; only paths: is read")
					}
					v = v.get("paths")
				}
				r.Exists, err = p.list(v, kk)
			case "changes":
				p.warn(k, kk, "not supported by mayfly's coordinator; the rule matches as if files changed")
			case "needs", "start_in", "interruptible", "auto_cancel":
				p.warn(k, kk, "not supported by mayfly's coordinator; ignored")
			default:
				return nil, p.errorf(k, kp, "unknown key %q (if, when, allow_failure, variables, exists, changes)", k.value)
			}
			if err != nil {
				return nil, err
			}
		}
		out = append(out, r)
	}
	return out, nil
}

// refFilter reads only: or except:.
func (p *parser) refFilter(n *node, key string) (*RefFilter, error) {
	f := &RefFilter{Line: n.line}
	var err error
	if n.kind != kindMap {
		f.Refs, err = p.strList(n, key)
		return f, err
	}
	for i, k := range n.keys {
		v, kp := n.vals[i], key+": "+k.value
		switch k.value {
		case "refs":
			f.Refs, err = p.strList(v, kp)
		case "variables":
			var srcs []string
			if srcs, err = p.strList(v, kp); err == nil {
				for _, src := range srcs {
					e, cerr := CompileExpr(src)
					if cerr != nil {
						return nil, p.errorf(v, kp, "%q: %v", src, cerr)
					}
					f.Variables = append(f.Variables, e)
				}
			}
		case "changes", "kubernetes":
			p.warn(k, kp, "not supported by mayfly's coordinator; ignored")
		default:
			return nil, p.errorf(k, key, "unknown key %q (refs, variables, changes, kubernetes)", k.value)
		}
		if err != nil {
			return nil, err
		}
	}
	return f, nil
}

// ruleResult is what the first matching rule says.
type ruleResult struct {
	matched bool
	rule    *Rule
}

// firstMatch returns the first rule that matches, as GitLab picks it.
func firstMatch(rules []Rule, vars map[string]string, exists func(string) bool) (ruleResult, error) {
	for i := range rules {
		r := &rules[i]
		if r.ifExpr != nil {
			ok, err := r.ifExpr.Eval(vars)
			if err != nil {
				return ruleResult{}, fmt.Errorf("rule at line %d: if %q: %w", r.Line, r.If, err)
			}
			if !ok {
				continue
			}
		}
		if r.Exists != nil && !anyExists(r.Exists, exists) {
			continue
		}
		return ruleResult{matched: true, rule: r}, nil
	}
	return ruleResult{}, nil
}

func anyExists(globs []string, exists func(string) bool) bool {
	if exists == nil {
		return false
	}
	for _, g := range globs {
		if exists(g) {
			return true
		}
	}
	return false
}

// matches reports whether only:/except: refs or variables select the pipeline.
func (f *RefFilter) matches(vars map[string]string) (bool, error) {
	if len(f.Refs) > 0 && !slices.ContainsFunc(f.Refs, func(r string) bool { return refMatches(r, vars) }) {
		return false, nil
	}
	for _, e := range f.Variables {
		ok, err := e.Eval(vars)
		if err != nil || !ok {
			return false, err
		}
	}
	return true, nil
}

// refMatches is one only:/except: ref against the pipeline.
func refMatches(ref string, vars map[string]string) bool {
	source := vars["CI_PIPELINE_SOURCE"]
	_, isTag := vars["CI_COMMIT_TAG"]
	name := vars["CI_COMMIT_REF_NAME"]
	switch ref {
	case "branches":
		return !isTag && source != "merge_request_event"
	case "tags":
		return isTag
	case "pushes":
		return source == "push"
	case "web", "api", "schedules", "triggers", "pipelines", "chat", "external":
		return source == strings.TrimSuffix(ref, "s") || source == ref || (ref == "schedules" && source == "schedule") || (ref == "triggers" && source == "trigger") || (ref == "pipelines" && source == "pipeline")
	case "merge_requests":
		return source == "merge_request_event"
	}
	if strings.HasPrefix(ref, "/") {
		re, err := compilePattern(ref)
		return err == nil && re.MatchString(name)
	}
	if ok, _ := path.Match(ref, name); ok {
		return true
	}
	return ref == name
}
