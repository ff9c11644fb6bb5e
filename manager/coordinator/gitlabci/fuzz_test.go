package gitlabci

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzParse feeds arbitrary bytes to the loader and the evaluator: they
// must return a config or an error, never panic or hang.
func FuzzParse(f *testing.F) {
	seeds := []string{
		"a: {script: x}\n",
		"stages: [b]\n.t: &t {tags: [x]}\nj: {<<: *t, stage: b, script: [y], rules: [{if: '$A == \"1\" || $B =~ /c/i'}]}\n",
		"default: {image: i}\nvariables: {A: {value: b, expand: false}}\nj: {extends: .h, script: !reference [.h, s], parallel: {matrix: [{A: [1, 2]}]}}\n.h: {s: [z]}\n",
		"j: {script: x, needs: [k], cache: [{key: {files: [a]}}], artifacts: {reports: {junit: r}}}\nk: {script: y, retry: {max: 1}, timeout: 1h 2m}\n",
		"workflow: {rules: [{when: never}]}\nj: {script: x, only: [main], except: {variables: [$X]}}\n",
	}
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	if matches, _ := filepath.Glob("../../../testdata/projects/*/.gitlab-ci.yml"); len(matches) > 0 {
		for _, m := range matches {
			if b, err := os.ReadFile(m); err == nil {
				f.Add(b)
			}
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse("fuzz.yml", data, Options{ReadFile: func(string) ([]byte, error) { return data, nil }})
		if err != nil {
			if cfg != nil {
				t.Fatal("config and error both returned")
			}
			return
		}
		for _, env := range []Env{branchEnv, {Vars: map[string]string{"CI_COMMIT_TAG": "v1"}, Exists: func(string) bool { return true }}} {
			_, _ = cfg.Evaluate(env)
		}
	})
}
