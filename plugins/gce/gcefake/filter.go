package gcefake

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"cloud.google.com/go/compute/apiv1/computepb"
)

// termRE is one AIP-160 comparison: field, operator, value.
var termRE = regexp.MustCompile(`^([a-zA-Z][a-zA-Z0-9_.-]*)\s*(=|!=|:)\s*(.+)$`)

// parseFilter compiles the subset of the list filter syntax the fake
// supports: one comparison, or parenthesised comparisons joined by spaces
// or AND. Fields are name, status, zone and labels.KEY; labels.KEY:*
// tests presence. Anything else is an error, as GCE rejects bad filters.
func parseFilter(f string) (func(*computepb.Instance) bool, error) {
	f = strings.TrimSpace(f)
	if f == "" {
		return func(*computepb.Instance) bool { return true }, nil
	}
	var terms []string
	if strings.HasPrefix(f, "(") {
		rest := f
		for rest != "" {
			if !strings.HasPrefix(rest, "(") {
				return nil, fmt.Errorf("expected '(' at %q", rest)
			}
			end := strings.IndexByte(rest, ')')
			if end < 0 {
				return nil, fmt.Errorf("unbalanced parentheses in %q", f)
			}
			terms = append(terms, rest[1:end])
			rest = strings.TrimSpace(rest[end+1:])
			rest = strings.TrimSpace(strings.TrimPrefix(rest, "AND "))
		}
	} else {
		terms = []string{f}
	}
	var preds []func(*computepb.Instance) bool
	for _, t := range terms {
		p, err := parseTerm(strings.TrimSpace(t))
		if err != nil {
			return nil, err
		}
		preds = append(preds, p)
	}
	return func(in *computepb.Instance) bool {
		for _, p := range preds {
			if !p(in) {
				return false
			}
		}
		return true
	}, nil
}

func parseTerm(t string) (func(*computepb.Instance) bool, error) {
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
	}
	var get func(*computepb.Instance) (string, bool)
	switch {
	case field == "name":
		get = func(in *computepb.Instance) (string, bool) { return in.GetName(), true }
	case field == "status":
		get = func(in *computepb.Instance) (string, bool) { return in.GetStatus(), true }
	case field == "zone":
		get = func(in *computepb.Instance) (string, bool) { return in.GetZone(), true }
	case strings.HasPrefix(field, "labels."):
		key := strings.TrimPrefix(field, "labels.")
		get = func(in *computepb.Instance) (string, bool) {
			v, ok := in.GetLabels()[key]
			return v, ok
		}
	default:
		return nil, fmt.Errorf("unsupported filter field %q", field)
	}
	switch op {
	case "=":
		return func(in *computepb.Instance) bool { v, ok := get(in); return ok && v == value }, nil
	case "!=":
		return func(in *computepb.Instance) bool { v, ok := get(in); return !ok || v != value }, nil
	default: // ":"
		if raw == "*" {
			return func(in *computepb.Instance) bool { _, ok := get(in); return ok }, nil
		}
		return func(in *computepb.Instance) bool { v, ok := get(in); return ok && strings.Contains(v, value) }, nil
	}
}
