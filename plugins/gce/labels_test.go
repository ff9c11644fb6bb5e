package gce

import (
	"encoding/json"
	"maps"
	"strings"
	"testing"
)

func TestLabelValue(t *testing.T) {
	tests := []struct {
		in   string
		want string // "" means: check only validity and the hash suffix
		same bool   // the input is valid and must be unchanged
	}{
		{in: "mgr-1", same: true},
		{in: "", same: true},
		{in: "linux_small-2", same: true},
		{in: strings.Repeat("a", 63), same: true},
		{in: "Runner"},
		{in: "docker runner #1"},
		{in: "ünïcode"},
		{in: strings.Repeat("a", 64)},
		{in: strings.Repeat("Z", 200)},
		{in: "gitlab.example.com/group"},
	}
	for _, tt := range tests {
		got := LabelValue(tt.in)
		if !validLabel(got, false) {
			t.Errorf("LabelValue(%q) = %q, not a valid GCE label value", tt.in, got)
		}
		if tt.same && got != tt.in {
			t.Errorf("LabelValue(%q) = %q, want it unchanged", tt.in, got)
		}
		if !tt.same {
			if got == tt.in {
				t.Errorf("LabelValue(%q) unchanged, but it is not valid", tt.in)
			}
			if len(got) < hashLen+1 || got[len(got)-hashLen-1] != '-' {
				t.Errorf("LabelValue(%q) = %q lacks the -<hash> suffix", tt.in, got)
			}
		}
		if LabelValue(tt.in) != got {
			t.Errorf("LabelValue(%q) is not deterministic", tt.in)
		}
	}
}

func TestLabelValueKeepsDistinctInputsDistinct(t *testing.T) {
	inputs := []string{"Runner", "runner", "RUNNER", "run ner", "run_ner", "run-ner", "run#ner",
		strings.Repeat("x", 70) + "a", strings.Repeat("x", 70) + "b", "Ab", "aB"}
	seen := map[string]string{}
	for _, in := range inputs {
		out := LabelValue(in)
		if prev, dup := seen[out]; dup {
			t.Errorf("LabelValue(%q) = LabelValue(%q) = %q", in, prev, out)
		}
		seen[out] = in
	}
}

func TestLabelKey(t *testing.T) {
	tests := []struct{ in, want string }{
		{"mayfly-manager", "mayfly-manager"},
		{"mayfly-runner", "mayfly-runner"},
		{"team_a", "team_a"},
	}
	for _, tt := range tests {
		if got := LabelKey(tt.in); got != tt.want {
			t.Errorf("LabelKey(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
	for _, in := range []string{"", "1abc", "_x", "Team", "a.b/c", strings.Repeat("k", 80)} {
		got := LabelKey(in)
		if !validLabel(got, true) {
			t.Errorf("LabelKey(%q) = %q, not a valid GCE label key", in, got)
		}
	}
}

func TestGCELabels(t *testing.T) {
	got, err := gceLabels(map[string]string{"mayfly-manager": "M 1", "mayfly-runner": "r"})
	if err != nil {
		t.Fatal(err)
	}
	if got["mayfly-runner"] != "r" || got["mayfly-manager"] != LabelValue("M 1") {
		t.Errorf("gceLabels = %v", got)
	}
	// A valid key spelled like another key's mapping collides with it.
	if _, err := gceLabels(map[string]string{"Team": "a", LabelKey("Team"): "b"}); err == nil {
		t.Error("gceLabels accepted two keys mapping to the same GCE key")
	}
	many := map[string]string{}
	for i := range 65 {
		many[strings.Repeat("k", i+1)] = "v"
	}
	if _, err := gceLabels(many); err == nil {
		t.Error("gceLabels accepted 65 labels")
	}
}

func TestOriginalLabels(t *testing.T) {
	orig := map[string]string{"mayfly-manager": "Manager #1", "mayfly-runner": "Docker Runner"}
	gl, err := gceLabels(orig)
	if err != nil {
		t.Fatal(err)
	}
	stored, _ := json.Marshal(orig)

	if got := originalLabels(gl, string(stored)); !maps.Equal(got, orig) {
		t.Errorf("round trip = %v, want %v", got, orig)
	}
	if got := originalLabels(gl, ""); !maps.Equal(got, gl) {
		t.Errorf("without metadata = %v, want the GCE labels %v", got, gl)
	}
	if got := originalLabels(gl, "{not json"); !maps.Equal(got, gl) {
		t.Errorf("with bad metadata = %v, want the GCE labels", got)
	}
	// Labels edited in GCE after creation: metadata no longer matches.
	edited := maps.Clone(gl)
	edited["mayfly-manager"] = "someone-else"
	if got := originalLabels(edited, string(stored)); !maps.Equal(got, edited) {
		t.Errorf("after an edit = %v, want the GCE labels %v", got, edited)
	}
}
