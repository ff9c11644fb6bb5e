package awsfake

import (
	"net/url"
	"slices"
	"strconv"
	"strings"
)

// query reads EC2 Query parameters. Lists are flattened with 1-based
// indexes ("InstanceId.1"), structures with dots
// ("TagSpecification.1.Tag.2.Key").
type query url.Values

func (q query) get(k string) string { return url.Values(q).Get(k) }

func (q query) has(k string) bool { _, ok := q[k]; return ok }

func (q query) int(k string) (int, error) { return strconv.Atoi(q.get(k)) }

// indexes returns the sorted N of every key prefix.N[.…].
func (q query) indexes(prefix string) []int {
	seen := map[int]bool{}
	for k := range q {
		rest, ok := strings.CutPrefix(k, prefix+".")
		if !ok {
			continue
		}
		num, _, _ := strings.Cut(rest, ".")
		if n, err := strconv.Atoi(num); err == nil && n > 0 {
			seen[n] = true
		}
	}
	var out []int
	for n := range seen {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// list returns the values of prefix.1, prefix.2, … in index order.
func (q query) list(prefix string) []string {
	var out []string
	for _, n := range q.indexes(prefix) {
		if v, ok := q[prefix+"."+strconv.Itoa(n)]; ok && len(v) > 0 {
			out = append(out, v[0])
		}
	}
	return out
}

// sub returns the structures prefix.1.*, prefix.2.*, … with the prefix
// removed from their keys.
func (q query) sub(prefix string) []query {
	var out []query
	for _, n := range q.indexes(prefix) {
		p := prefix + "." + strconv.Itoa(n) + "."
		s := query{}
		for k, v := range q {
			if rest, ok := strings.CutPrefix(k, p); ok {
				s[rest] = v
			}
		}
		out = append(out, s)
	}
	return out
}

type filter struct {
	name   string
	values []string
}

type filters []filter

var filterNames = []string{
	"instance-id", "instance-state-name", "instance-state-code", "subnet-id", "availability-zone",
	"client-token", "key-name", "image-id", "instance-type", "instance-lifecycle", "tag-key", "tag-value",
}

func parseFilters(q query) (filters, *apiError) {
	var fs filters
	for _, f := range q.sub("Filter") {
		name := f.get("Name")
		if !strings.HasPrefix(name, "tag:") && !slices.Contains(filterNames, name) {
			return nil, badRequest("InvalidParameterValue", "The filter '%s' is invalid", name)
		}
		values := f.list("Value")
		if len(values) == 0 {
			return nil, badRequest("InvalidParameterValue", "The filter '%s' has no values", name)
		}
		fs = append(fs, filter{name: name, values: values})
	}
	return fs, nil
}

// match reports whether in passes every filter (a filter passes when any
// of its values matches).
func (fs filters) match(in *instance) bool {
	for _, f := range fs {
		var candidates []string
		switch {
		case strings.HasPrefix(f.name, "tag:"):
			v, ok := in.Tags[strings.TrimPrefix(f.name, "tag:")]
			if !ok {
				return false
			}
			candidates = []string{v}
		case f.name == "tag-key":
			for k := range in.Tags {
				candidates = append(candidates, k)
			}
		case f.name == "tag-value":
			for _, v := range in.Tags {
				candidates = append(candidates, v)
			}
		case f.name == "instance-id":
			candidates = []string{in.ID}
		case f.name == "instance-state-name":
			candidates = []string{in.State}
		case f.name == "instance-state-code":
			candidates = []string{strconv.Itoa(stateCodes[in.State])}
		case f.name == "subnet-id":
			candidates = []string{in.SubnetID}
		case f.name == "availability-zone":
			candidates = []string{in.AvailabilityAZ}
		case f.name == "client-token":
			candidates = []string{in.ClientToken}
		case f.name == "key-name":
			candidates = []string{in.KeyName}
		case f.name == "image-id":
			candidates = []string{in.ImageID}
		case f.name == "instance-type":
			candidates = []string{in.InstanceType}
		case f.name == "instance-lifecycle":
			if in.Spot {
				candidates = []string{"spot"}
			}
		}
		if !slices.ContainsFunc(candidates, func(c string) bool {
			return slices.ContainsFunc(f.values, func(pattern string) bool { return wildcard(pattern, c) })
		}) {
			return false
		}
	}
	return true
}

// wildcard matches s against an EC2 filter value, where * matches any
// run of characters and ? exactly one; \ escapes them.
func wildcard(pattern, s string) bool {
	if pattern == "" {
		return s == ""
	}
	switch pattern[0] {
	case '*':
		for i := 0; i <= len(s); i++ {
			if wildcard(pattern[1:], s[i:]) {
				return true
			}
		}
		return false
	case '?':
		return s != "" && wildcard(pattern[1:], s[1:])
	case '\\':
		if len(pattern) > 1 {
			return s != "" && s[0] == pattern[1] && wildcard(pattern[2:], s[1:])
		}
	}
	return s != "" && s[0] == pattern[0] && wildcard(pattern[1:], s[1:])
}
