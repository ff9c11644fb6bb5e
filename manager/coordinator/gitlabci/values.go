package gitlabci

import (
	"fmt"
	"regexp"
	"strconv"
)

// parser decodes nodes into the configuration, collecting warnings.
type parser struct {
	file     string
	warnings []Warning
}

func (p *parser) warn(n *node, key, format string, a ...any) {
	w := Warning{File: p.file, Key: key, Msg: fmt.Sprintf(format, a...)}
	if n != nil {
		w.File, w.Line = n.file, n.line
	}
	p.warnings = append(p.warnings, w)
}

func (p *parser) errorf(n *node, key, format string, a ...any) error {
	e := &Error{File: p.file, Key: key, Msg: fmt.Sprintf(format, a...)}
	if n != nil {
		e.File, e.Line = n.file, n.line
	}
	return e
}

// str reads a scalar as text. Numbers and booleans are taken as written.
func (p *parser) str(n *node, key string) (string, error) {
	if n == nil || n.kind != kindScalar {
		return "", p.errorf(n, key, "should be a string, not %s", kindOf(n))
	}
	return n.value, nil
}

func kindOf(n *node) string {
	if n == nil {
		return "nothing"
	}
	return n.kind.String()
}

// strList reads a string or a list of strings.
func (p *parser) strList(n *node, key string) ([]string, error) {
	if n != nil && n.kind == kindScalar {
		return []string{n.value}, nil
	}
	if n == nil || n.kind != kindSeq {
		return nil, p.errorf(n, key, "should be a string or a list of strings, not %s", kindOf(n))
	}
	out := make([]string, 0, len(n.items))
	for i, it := range n.items {
		s, err := p.str(it, fmt.Sprintf("%s[%d]", key, i))
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// list reads a list of strings (a single string is an error).
func (p *parser) list(n *node, key string) ([]string, error) {
	if n == nil || n.kind != kindSeq {
		return nil, p.errorf(n, key, "should be a list of strings, not %s", kindOf(n))
	}
	return p.strList(n, key)
}

// script reads script-like values: a string, or a list of strings and
// nested lists (from !reference) up to 10 levels, flattened.
func (p *parser) script(n *node, key string) ([]string, error) {
	var out []string
	var walk func(n *node, depth int) error
	walk = func(n *node, depth int) error {
		switch {
		case n != nil && n.kind == kindScalar:
			out = append(out, n.value)
		case n != nil && n.kind == kindSeq && depth < 10:
			for _, it := range n.items {
				if err := walk(it, depth+1); err != nil {
					return err
				}
			}
		case n != nil && n.kind == kindSeq:
			return p.errorf(n, key, "nested lists deeper than 10 levels")
		default:
			return p.errorf(n, key, "should be a string or a list of strings, not %s", kindOf(n))
		}
		return nil
	}
	if err := walk(n, 0); err != nil {
		return nil, err
	}
	return out, nil
}

func (p *parser) boolean(n *node, key string) (bool, error) {
	if n != nil && n.kind == kindScalar {
		switch n.value {
		case "true", "True", "TRUE":
			return true, nil
		case "false", "False", "FALSE":
			return false, nil
		}
	}
	return false, p.errorf(n, key, "should be true or false")
}

func (p *parser) integer(n *node, key string) (int, error) {
	if n != nil && n.kind == kindScalar {
		if v, err := strconv.Atoi(n.value); err == nil {
			return v, nil
		}
	}
	return 0, p.errorf(n, key, "should be an integer")
}

// ints reads an integer or a list of integers.
func (p *parser) ints(n *node, key string) ([]int, error) {
	if n != nil && n.kind == kindScalar {
		v, err := p.integer(n, key)
		return []int{v}, err
	}
	if n == nil || n.kind != kindSeq {
		return nil, p.errorf(n, key, "should be an integer or a list of integers")
	}
	var out []int
	for i, it := range n.items {
		v, err := p.integer(it, fmt.Sprintf("%s[%d]", key, i))
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

func (p *parser) hash(n *node, key string) (*node, error) {
	if n == nil || n.kind != kindMap {
		return nil, p.errorf(n, key, "should be a hash, not %s", kindOf(n))
	}
	return n, nil
}

// oneOf checks a scalar against allowed values.
func (p *parser) oneOf(n *node, key string, allowed ...string) (string, error) {
	s, err := p.str(n, key)
	if err != nil {
		return "", err
	}
	for _, a := range allowed {
		if s == a {
			return s, nil
		}
	}
	return "", p.errorf(n, key, "%q is not one of %v", s, allowed)
}

var varName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// variables reads a variables: hash. Values are strings (numbers and
// booleans as written) or {value, expand, description, options}.
func (p *parser) variables(n *node, key string) ([]Variable, error) {
	if n != nil && n.kind == kindNull {
		return nil, nil
	}
	h, err := p.hash(n, key)
	if err != nil {
		return nil, err
	}
	out := make([]Variable, 0, len(h.keys))
	for i, k := range h.keys {
		vk := key + ": " + k.value
		if !varName.MatchString(k.value) {
			return nil, p.errorf(k, vk, "%q is not a variable name (letters, digits and _, not starting with a digit)", k.value)
		}
		v := h.vals[i]
		switch v.kind {
		case kindScalar:
			out = append(out, Variable{Key: k.value, Value: v.value})
		case kindMap:
			vr := Variable{Key: k.value}
			for j, sk := range v.keys {
				sv := v.vals[j]
				switch sk.value {
				case "value":
					if vr.Value, err = p.str(sv, vk+": value"); err != nil {
						return nil, err
					}
				case "expand":
					expand, err := p.boolean(sv, vk+": expand")
					if err != nil {
						return nil, err
					}
					vr.Raw = !expand
				case "description", "options":
					// For the run-pipeline form only; nothing to do here.
				default:
					return nil, p.errorf(sk, vk, "unknown key %q (value, expand, description, options)", sk.value)
				}
			}
			out = append(out, vr)
		default:
			return nil, p.errorf(v, vk, "should be a string or a hash with value:, not %s", v.kind)
		}
	}
	return out, nil
}
