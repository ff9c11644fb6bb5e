package gcefake

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"cloud.google.com/go/compute/apiv1/computepb"
)

// termRE is one comparison: field, operator, value.
var termRE = regexp.MustCompile(`^([a-zA-Z][a-zA-Z0-9_.-]*)\s*(=|!=|:)\s*(.+)$`)

// fieldFunc reads one filter field of a resource; ok is false when the
// resource does not have it (an absent label).
type fieldFunc[T any] func(T) (value string, ok bool)

// fieldsOf returns the reader of a field name of one resource kind, or nil
// when the kind has no such field.
type fieldsOf[T any] func(field string) fieldFunc[T]

// instanceFields are the filter fields of instances: name, status, zone
// and labels.KEY.
func instanceFields(field string) fieldFunc[*computepb.Instance] {
	switch {
	case field == "name":
		return func(in *computepb.Instance) (string, bool) { return in.GetName(), true }
	case field == "status":
		return func(in *computepb.Instance) (string, bool) { return in.GetStatus(), true }
	case field == "zone":
		return func(in *computepb.Instance) (string, bool) { return in.GetZone(), true }
	case strings.HasPrefix(field, "labels."):
		key := strings.TrimPrefix(field, "labels.")
		return func(in *computepb.Instance) (string, bool) {
			v, ok := in.GetLabels()[key]
			return v, ok
		}
	}
	return nil
}

// operationFields are the filter fields of operations: name,
// operationType, status, targetLink, targetId and user.
func operationFields(field string) fieldFunc[*computepb.Operation] {
	switch field {
	case "name":
		return func(op *computepb.Operation) (string, bool) { return op.GetName(), true }
	case "operationType":
		return func(op *computepb.Operation) (string, bool) { return op.GetOperationType(), true }
	case "status":
		return func(op *computepb.Operation) (string, bool) { return op.GetStatus().String(), true }
	case "targetLink":
		return func(op *computepb.Operation) (string, bool) { return op.GetTargetLink(), true }
	case "targetId":
		return func(op *computepb.Operation) (string, bool) {
			return strconv.FormatUint(op.GetTargetId(), 10), op.TargetId != nil
		}
	case "user":
		return func(op *computepb.Operation) (string, bool) { return op.GetUser(), true }
	}
	return nil
}

// parseFilter compiles the subset of the list filter syntax the fake
// supports: comparisons (FIELD = value, FIELD != value, FIELD:value,
// FIELD:* for presence), each bare or in parentheses, joined by AND or,
// between parenthesised ones, by spaces. Values are bare words or double
// quoted strings. Anything else is an error, as GCE rejects bad filters.
func parseFilter[T any](f string, fields fieldsOf[T]) (func(T) bool, error) {
	terms, err := splitTerms(f)
	if err != nil {
		return nil, err
	}
	var preds []func(T) bool
	for _, t := range terms {
		p, err := parseTerm(t, fields)
		if err != nil {
			return nil, err
		}
		preds = append(preds, p)
	}
	return func(x T) bool {
		for _, p := range preds {
			if !p(x) {
				return false
			}
		}
		return true
	}, nil
}

// splitTerms cuts a filter into its comparisons.
func splitTerms(f string) ([]string, error) {
	var terms []string
	rest := strings.TrimSpace(f)
	for rest != "" {
		paren := rest[0] == '('
		end, err := termEnd(rest, paren)
		if err != nil {
			return nil, fmt.Errorf("%w in %q", err, f)
		}
		term := rest[:end]
		if paren {
			term = rest[1 : end-1]
		}
		terms = append(terms, strings.TrimSpace(term))
		next := strings.TrimSpace(rest[end:])
		if after, ok := strings.CutPrefix(next, "AND"); ok && (after == "" || after[0] == ' ' || after[0] == '(') {
			next = strings.TrimSpace(after)
			if next == "" {
				return nil, fmt.Errorf("AND without a following term in %q", f)
			}
		} else if next != "" && (!paren || next[0] != '(') {
			return nil, fmt.Errorf("expected AND at %q in %q", next, f)
		}
		rest = next
	}
	return terms, nil
}

// termEnd returns the end of the term at the start of s: after its closing
// parenthesis when paren, else before the first " AND " or the end. Double
// quoted strings are skipped.
func termEnd(s string, paren bool) (int, error) {
	quoted := false
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '\\' && quoted:
			i++
		case c == '"':
			quoted = !quoted
		case quoted:
		case paren && c == ')':
			return i + 1, nil
		case !paren && c == ' ' && strings.HasPrefix(strings.TrimLeft(s[i:], " "), "AND "):
			return i, nil
		}
	}
	switch {
	case quoted:
		return 0, fmt.Errorf("unterminated quoted string")
	case paren:
		return 0, fmt.Errorf("unbalanced parentheses")
	}
	return len(s), nil
}

func parseTerm[T any](t string, fields fieldsOf[T]) (func(T) bool, error) {
	m := termRE.FindStringSubmatch(t)
	if m == nil {
		return nil, fmt.Errorf("cannot parse filter term %q", t)
	}
	field, op, raw := m[1], m[2], strings.TrimSpace(m[3])
	value := raw
	if strings.HasPrefix(raw, `"`) {
		v, err := strconv.Unquote(raw)
		if err != nil {
			return nil, fmt.Errorf("bad quoted value %s", raw)
		}
		value = v
	} else if strings.ContainsAny(raw, " \t\"()") {
		return nil, fmt.Errorf("unquoted value %q holds spaces, quotes or parentheses (OR is not supported)", raw)
	}
	get := fields(field)
	if get == nil {
		return nil, fmt.Errorf("unsupported filter field %q", field)
	}
	switch op {
	case "=":
		return func(x T) bool { v, ok := get(x); return ok && v == value }, nil
	case "!=":
		return func(x T) bool { v, ok := get(x); return !ok || v != value }, nil
	default: // ":"
		if raw == "*" {
			return func(x T) bool { _, ok := get(x); return ok }, nil
		}
		return func(x T) bool { v, ok := get(x); return ok && strings.Contains(v, value) }, nil
	}
}
