package gce

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"strings"
)

// GCE label rules (https://cloud.google.com/compute/docs/labeling-resources):
// keys and values are at most 63 characters of lowercase letters, digits,
// underscores and dashes; keys start with a lowercase letter; values may be
// empty. The plugin keeps to ASCII.
const (
	maxLabelLen = 63
	// hashLen is the number of hex digits of the digest appended to a
	// value that had to be changed, so distinct inputs stay distinct.
	hashLen = 8
)

// metadataLabels is the metadata key holding the caller's labels exactly as
// given, so List can return them even when the GCE labels were rewritten.
const metadataLabels = "mayfly-labels"

// LabelKey maps a label key to a valid GCE label key.
func LabelKey(k string) string {
	return mapLabel(k, true)
}

// LabelValue maps a label value to a valid GCE label value. A value that is
// already valid is unchanged; any other value is lowercased, has invalid
// characters replaced by '_', is cut to fit, and gets a dash and a short
// digest of the original appended, so two different inputs (e.g. "Runner"
// and "runner") never map to the same value.
func LabelValue(v string) string {
	return mapLabel(v, false)
}

func mapLabel(s string, key bool) string {
	if validLabel(s, key) {
		return s
	}
	var b strings.Builder
	for _, r := range strings.ToLower(s) {
		if isLabelChar(r) {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	out := b.String()
	if key && (out == "" || out[0] < 'a' || out[0] > 'z') {
		out = "k" + out
	}
	sum := sha256.Sum256([]byte(s))
	suffix := "-" + hex.EncodeToString(sum[:])[:hashLen]
	if len(out) > maxLabelLen-len(suffix) {
		out = out[:maxLabelLen-len(suffix)]
	}
	return out + suffix
}

// validLabel reports whether s is a valid GCE label key (key) or value.
func validLabel(s string, key bool) bool {
	if len(s) > maxLabelLen {
		return false
	}
	if key && (s == "" || s[0] < 'a' || s[0] > 'z') {
		return false
	}
	for _, r := range s {
		if !isLabelChar(r) {
			return false
		}
	}
	return true
}

func isLabelChar(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_' || r == '-'
}

// gceLabels maps the caller's labels to GCE labels. It fails when two keys
// map to the same GCE key.
func gceLabels(labels map[string]string) (map[string]string, error) {
	if len(labels) > 64 {
		return nil, fmt.Errorf("%d labels, GCE allows at most 64", len(labels))
	}
	out := make(map[string]string, len(labels))
	from := make(map[string]string, len(labels))
	for k, v := range labels {
		gk := LabelKey(k)
		if prev, dup := from[gk]; dup {
			return nil, fmt.Errorf("label keys %q and %q both map to GCE label key %q", prev, k, gk)
		}
		from[gk] = k
		out[gk] = LabelValue(v)
	}
	return out, nil
}

// originalLabels returns the caller's labels of an instance: the ones kept
// in metadata when they are consistent with its GCE labels, else the GCE
// labels themselves.
func originalLabels(gce map[string]string, stored string) map[string]string {
	if stored == "" {
		return maps.Clone(gce)
	}
	var orig map[string]string
	if err := json.Unmarshal([]byte(stored), &orig); err != nil {
		return maps.Clone(gce)
	}
	for k, v := range orig {
		if gv, ok := gce[LabelKey(k)]; !ok || gv != LabelValue(v) {
			return maps.Clone(gce) // edited since creation: trust GCE
		}
	}
	return orig
}
