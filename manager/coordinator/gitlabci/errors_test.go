package gitlabci

import (
	"errors"
	"strings"
	"testing"
)

func TestUnsupportedKeywordsWarnOneLineEach(t *testing.T) {
	cfg := mustParse(t, `a:
  script: x
  environment: production
  coverage: '/\d+%/'
  interruptible: true
  rules:
    - changes: [src/*]
  artifacts:
    paths: [x]
    expose_as: report
trigger-me:
  trigger: other/project
`)
	want := []struct {
		line int
		key  string
	}{
		{3, "a: environment"}, {4, "a: coverage"}, {5, "a: interruptible"},
		{7, "a: rules[0]: changes"}, {10, "a: artifacts: expose_as"}, {12, "trigger-me: trigger"},
	}
	if len(cfg.Warnings) != len(want) {
		t.Fatalf("warnings:\n%s", joinWarnings(cfg.Warnings))
	}
	for i, w := range want {
		got := cfg.Warnings[i]
		if got.Line != w.line || got.Key != w.key || got.File != ".gitlab-ci.yml" || strings.Contains(got.String(), "\n") {
			t.Errorf("warning %d: %q, want line %d key %q", i, got.String(), w.line, w.key)
		}
	}
	if len(cfg.Jobs) != 1 || cfg.Jobs[0].Name != "a" {
		t.Errorf("the trigger job must be skipped, the other kept: %d jobs", len(cfg.Jobs))
	}
}

func joinWarnings(ws []Warning) string {
	var b strings.Builder
	for _, w := range ws {
		b.WriteString(w.String() + "\n")
	}
	return b.String()
}

func TestConfigErrorsNameFileLineKey(t *testing.T) {
	tests := []struct {
		name, src string
		line      int
		want      string
	}{
		{"empty", "", 0, "the configuration is empty"},
		{"not a hash", "- a\n- b\n", 1, "should be a hash"},
		{"syntax", "a:\n  script: [x\n", 1, "invalid YAML: did not find"},
		{"unknown job key", "a:\n  script: x\n  scirpt: y\n", 3, `a: unknown keyword "scirpt"`},
		{"no script", "a:\n  stage: test\n", 1, "needs a script"},
		{"bad stage", "stages: [build]\na:\n  stage: test\n  script: x\n", 3, `a: stage: "test" is not one of the stages`},
		{"job not a hash", "a: echo\n", 1, "a job should be a hash"},
		{"bad when", "a:\n  script: x\n  when: sometimes\n", 3, "a: when:"},
		{"bad retry", "a:\n  script: x\n  retry: 3\n", 3, "max should be 0, 1 or 2"},
		{"bad timeout", "a:\n  script: x\n  timeout: soon\n", 3, "a: timeout"},
		{"bad variable", "variables:\n  1X: y\na: {script: x}\n", 2, "is not a variable name"},
		{"extends unknown", "a:\n  extends: .nope\n  script: x\n", 2, `".nope" is not a job`},
		{"extends cycle", ".a: {extends: .b}\n.b: {extends: .a}\nc: {extends: .a, script: x}\n", 0, "circular"},
		{"bad reference", "a:\n  script: !reference [.nope, script]\n", 2, "names nothing"},
		{"bad rule", "a:\n  script: x\n  rules:\n    - if: $A ==\n", 4, "ends too early"},
		{"bad regexp", "a:\n  script: x\n  rules:\n    - if: $A =~ /(/\n", 4, "pattern"},
		{"bad cache key", "a:\n  script: x\n  cache: {key: a/b}\n", 3, "cannot contain /"},
		{"too many caches", "a:\n  script: x\n  cache: [{}, {}, {}, {}, {}]\n", 3, "at most 4 caches"},
		{"bad parallel", "a:\n  script: x\n  parallel: 500\n", 3, "between 1 and 200"},
		{"empty matrix values", "a:\n  script: x\n  parallel:\n    matrix:\n      - {OS: []}\n", 5, "needs at least one value"},
		{"rules and only", "a:\n  script: x\n  only: [main]\n  rules: [{when: always}]\n", 1, "cannot be used with only"},
		{"default unknown", "default:\n  stage: build\na: {script: x}\n", 2, `"stage" cannot be set in default`},
		{"two documents", "a: {script: x}\n---\nb: {script: y}\n", 2, "more than one YAML document"},
		{"merge of a list", "a:\n  <<: [1]\n  script: x\n", 2, "<< must merge a hash"},
		{"deep nesting", "a: " + strings.Repeat("[", 120) + strings.Repeat("]", 120) + "\n", 1, "nesting deeper"},
		{"alias bomb", bomb(), 0, "after expanding aliases"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse(".gitlab-ci.yml", []byte(tt.src), Options{})
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("err %v (%T), want *Error", err, err)
			}
			if !strings.Contains(e.Error(), tt.want) || e.File != ".gitlab-ci.yml" || (tt.line != 0 && e.Line != tt.line) {
				t.Errorf("error %q (line %d), want line %d containing %q", e.Error(), e.Line, tt.line, tt.want)
			}
		})
	}
}

// bomb is a billion-laughs document: nine levels of ten aliases.
func bomb() string {
	var b strings.Builder
	b.WriteString("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n")
	for i := 1; i < 9; i++ {
		b.WriteString("a")
		b.WriteString(string(rune('0' + i)))
		b.WriteString(": &a")
		b.WriteString(string(rune('0' + i)))
		b.WriteString(" [")
		for k := 0; k < 10; k++ {
			if k > 0 {
				b.WriteString(", ")
			}
			b.WriteString("*a" + string(rune('0'+i-1)))
		}
		b.WriteString("]\n")
	}
	b.WriteString("job: {script: *a8}\n")
	return b.String()
}

func TestEvaluateErrors(t *testing.T) {
	tests := []struct{ name, src, want string }{
		{"needs unknown", "a: {script: x, needs: [b]}\n", `job "b" is not in this pipeline`},
		{"needs later stage", "stages: [one, two]\na: {stage: one, script: x, needs: [b]}\nb: {stage: two, script: x}\n", "later stage"},
		{"needs cycle", "a: {script: x, needs: [b]}\nb: {script: x, needs: [a]}\n", "cycle"},
		{"dependency same stage", "a: {script: x}\nb: {script: x, dependencies: [a]}\n", "not in an earlier stage"},
		{"regexp variable", "a:\n  script: x\n  rules: [{if: '$CI_COMMIT_BRANCH =~ $CI_DEFAULT_BRANCH'}]\n", "not a /pattern/"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := mustParse(t, tt.src).Evaluate(branchEnv)
			var e *Error
			if !errors.As(err, &e) || !strings.Contains(err.Error(), tt.want) || e.Line == 0 {
				t.Errorf("err %v, want an *Error with a line containing %q", err, tt.want)
			}
		})
	}
	if _, err := mustParse(t, "a: {script: x, rules: [{if: $NOPE}]}\n").Evaluate(branchEnv); !errors.Is(err, ErrNoPipeline) {
		t.Errorf("no matching job: %v", err)
	}
}
