package gitlabci

import (
	"fmt"
	"regexp"
	"strings"
)

// Expr is a compiled rules:if expression: $VAR, "string", 'string',
// /regexp/flags, null, ==, !=, =~, !~, &&, || and parentheses, as GitLab
// evaluates them. Regular expressions are RE2, as in GitLab.
type Expr struct {
	src  string
	root exprNode
}

// maxExprLen and maxExprDepth bound what CompileExpr accepts.
const (
	maxExprLen   = 8 << 10
	maxExprDepth = 64
)

type exprNode interface {
	eval(vars map[string]string) (value, error)
}

// value is the result of an operand: a string, a pattern, or null.
type value struct {
	str     string
	null    bool
	pattern *regexp.Regexp
	isBool  bool
	b       bool
}

func (v value) truthy() bool {
	switch {
	case v.isBool:
		return v.b
	case v.null:
		return false
	case v.pattern != nil:
		return true
	}
	return v.str != ""
}

func boolValue(b bool) value { return value{isBool: true, b: b} }

type varNode struct{ name string }

func (n varNode) eval(vars map[string]string) (value, error) {
	v, ok := vars[n.name]
	if !ok {
		return value{null: true}, nil
	}
	return value{str: v}, nil
}

type litNode struct{ v value }

func (n litNode) eval(map[string]string) (value, error) { return n.v, nil }

type binNode struct {
	op   string
	l, r exprNode
}

func (n binNode) eval(vars map[string]string) (value, error) {
	l, err := n.l.eval(vars)
	if err != nil {
		return value{}, err
	}
	switch n.op {
	case "&&":
		if !l.truthy() {
			return boolValue(false), nil
		}
		r, err := n.r.eval(vars)
		return boolValue(r.truthy()), err
	case "||":
		if l.truthy() {
			return boolValue(true), nil
		}
		r, err := n.r.eval(vars)
		return boolValue(r.truthy()), err
	}
	r, err := n.r.eval(vars)
	if err != nil {
		return value{}, err
	}
	switch n.op {
	case "==", "!=":
		eq := l.null == r.null && (l.null || l.str == r.str)
		if l.pattern != nil || r.pattern != nil {
			eq = false
		}
		return boolValue(eq == (n.op == "==")), nil
	default: // =~ !~
		re := r.pattern
		if re == nil && !r.null {
			// A variable may hold a pattern written as /…/flags.
			if re, err = compilePattern(r.str); err != nil {
				return value{}, fmt.Errorf("the right side of %s is not a /pattern/: %w", n.op, err)
			}
		}
		match := re != nil && !l.null && l.pattern == nil && re.MatchString(l.str)
		return boolValue(match == (n.op == "=~")), nil
	}
}

// CompileExpr parses a rules:if expression.
func CompileExpr(src string) (*Expr, error) {
	if len(src) > maxExprLen {
		return nil, fmt.Errorf("expression longer than %d bytes", maxExprLen)
	}
	toks, err := lexExpr(src)
	if err != nil {
		return nil, err
	}
	ps := &exprParser{toks: toks}
	root, err := ps.or(0)
	if err != nil {
		return nil, err
	}
	if ps.pos != len(toks) {
		return nil, fmt.Errorf("unexpected %q", toks[ps.pos].text)
	}
	return &Expr{src: src, root: root}, nil
}

// Eval evaluates the expression with the given variables (absent = null).
func (e *Expr) Eval(vars map[string]string) (bool, error) {
	v, err := e.root.eval(vars)
	if err != nil {
		return false, err
	}
	return v.truthy(), nil
}

// String returns the source.
func (e *Expr) String() string { return e.src }

type token struct {
	kind string // var, str, pattern, null, op, (, )
	text string
	val  value
}

func lexExpr(s string) ([]token, error) {
	var toks []token
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '$':
			j := i + 1
			braced := j < len(s) && s[j] == '{'
			if braced {
				j++
			}
			k := j
			for k < len(s) && isWordByte(s[k]) {
				k++
			}
			if k == j {
				return nil, fmt.Errorf("a variable name should follow $ at offset %d", i)
			}
			name := s[j:k]
			if braced {
				if k >= len(s) || s[k] != '}' {
					return nil, fmt.Errorf("missing } after ${%s", name)
				}
				k++
			}
			toks = append(toks, token{kind: "var", text: s[i:k]})
			i = k
		case c == '"' || c == '\'':
			j := strings.IndexByte(s[i+1:], c)
			if j < 0 {
				return nil, fmt.Errorf("unterminated string at offset %d", i)
			}
			toks = append(toks, token{kind: "str", text: s[i : i+j+2], val: value{str: s[i+1 : i+1+j]}})
			i += j + 2
		case c == '/':
			j := i + 1
			for j < len(s) && s[j] != '/' {
				if s[j] == '\\' {
					j++
				}
				j++
			}
			if j >= len(s) {
				return nil, fmt.Errorf("unterminated /pattern/ at offset %d", i)
			}
			k := j + 1
			for k < len(s) && (s[k] >= 'a' && s[k] <= 'z') {
				k++
			}
			re, err := compilePattern(s[i:k])
			if err != nil {
				return nil, err
			}
			toks = append(toks, token{kind: "pattern", text: s[i:k], val: value{pattern: re}})
			i = k
		case strings.HasPrefix(s[i:], "null") && (i+4 == len(s) || !isWordByte(s[i+4])):
			toks = append(toks, token{kind: "null", text: "null", val: value{null: true}})
			i += 4
		case c == '(' || c == ')':
			toks = append(toks, token{kind: string(c), text: string(c)})
			i++
		default:
			op := ""
			for _, o := range []string{"==", "!=", "=~", "!~", "&&", "||"} {
				if strings.HasPrefix(s[i:], o) {
					op = o
				}
			}
			if op == "" {
				return nil, fmt.Errorf("unexpected %q at offset %d", s[i:min(len(s), i+10)], i)
			}
			toks = append(toks, token{kind: "op", text: op})
			i += 2
		}
	}
	return toks, nil
}

func isWordByte(c byte) bool {
	return c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
}

// compilePattern compiles /re/flags (flags i, m, s) as RE2.
func compilePattern(p string) (*regexp.Regexp, error) {
	end := strings.LastIndexByte(p, '/')
	if len(p) < 2 || p[0] != '/' || end <= 0 {
		return nil, fmt.Errorf("%q is not a /pattern/", p)
	}
	body, flags := p[1:end], p[end+1:]
	body = strings.ReplaceAll(body, `\/`, `/`)
	prefix := ""
	for _, f := range flags {
		switch f {
		case 'i', 'm', 's':
			prefix += string(f)
		default:
			return nil, fmt.Errorf("pattern %q: unknown flag %q", p, f)
		}
	}
	if prefix != "" {
		body = "(?" + prefix + ")" + body
	}
	re, err := regexp.Compile(body)
	if err != nil {
		return nil, fmt.Errorf("pattern %q: %w", p, err)
	}
	return re, nil
}

type exprParser struct {
	toks []token
	pos  int
}

func (ps *exprParser) peek() *token {
	if ps.pos < len(ps.toks) {
		return &ps.toks[ps.pos]
	}
	return nil
}

func (ps *exprParser) or(depth int) (exprNode, error) {
	return ps.binary(depth, "||", ps.and)
}

func (ps *exprParser) and(depth int) (exprNode, error) {
	return ps.binary(depth, "&&", ps.cmp)
}

func (ps *exprParser) binary(depth int, op string, next func(int) (exprNode, error)) (exprNode, error) {
	l, err := next(depth)
	if err != nil {
		return nil, err
	}
	for t := ps.peek(); t != nil && t.kind == "op" && t.text == op; t = ps.peek() {
		ps.pos++
		r, err := next(depth)
		if err != nil {
			return nil, err
		}
		l = binNode{op: op, l: l, r: r}
	}
	return l, nil
}

func (ps *exprParser) cmp(depth int) (exprNode, error) {
	l, err := ps.primary(depth)
	if err != nil {
		return nil, err
	}
	if t := ps.peek(); t != nil && t.kind == "op" && t.text != "&&" && t.text != "||" {
		ps.pos++
		r, err := ps.primary(depth)
		if err != nil {
			return nil, err
		}
		return binNode{op: t.text, l: l, r: r}, nil
	}
	return l, nil
}

func (ps *exprParser) primary(depth int) (exprNode, error) {
	if depth > maxExprDepth {
		return nil, fmt.Errorf("parentheses nested deeper than %d", maxExprDepth)
	}
	t := ps.peek()
	if t == nil {
		return nil, fmt.Errorf("the expression ends too early")
	}
	ps.pos++
	switch t.kind {
	case "var":
		name := strings.Trim(t.text, "${}")
		return varNode{name: name}, nil
	case "str", "pattern", "null":
		return litNode{v: t.val}, nil
	case "(":
		n, err := ps.or(depth + 1)
		if err != nil {
			return nil, err
		}
		if c := ps.peek(); c == nil || c.kind != ")" {
			return nil, fmt.Errorf("missing )")
		}
		ps.pos++
		return n, nil
	}
	return nil, fmt.Errorf("unexpected %q", t.text)
}
