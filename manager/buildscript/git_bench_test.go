package buildscript

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// BenchmarkGetSources times the get_sources stage with bash against the
// test's git server on 127.0.0.1 (git http-backend behind basic auth): a
// small repository (3 commits, a submodule with a nested one) cloned at
// depth 1 without and with recursive submodules, and a fetch into the
// checkout that clone left. Each op runs the stage 5 times; the median is
// reported as ms/get_sources (wall time, so noisy on a loaded machine).
// "git-clone-baseline" is a bare `git clone --depth 1` of the same
// repository by the same shell, to compare with.
func BenchmarkGetSources(b *testing.B) {
	srv := newGitServer(b, testJobToken)
	shas := srv.demoRepos(b)
	b.Run("git-clone-baseline", func(b *testing.B) {
		e := newLocalExec(b, bashProgram(), nil)
		dir := b.TempDir()
		script := "rm -rf " + shQuote(dir+"/c") + " && git clone -q --depth 1 " + shQuote(srv.url("demo", CredentialUser, srv.token)) + " " + shQuote(dir+"/c")
		var runs []time.Duration
		for i := 0; i < b.N; i++ {
			for range 5 {
				start := time.Now()
				var out strings.Builder
				if code, err := e.Run(context.Background(), ShellBash, script, &out); code != 0 || err != nil {
					b.Fatalf("exit %d %v\n%s", code, err, out.String())
				}
				runs = append(runs, time.Since(start))
			}
		}
		slices.Sort(runs)
		b.ReportMetric(float64(runs[len(runs)/2].Microseconds())/1000, "ms/get_sources")
	})
	for _, bc := range []struct {
		name string
		vars []runnerapi.Variable
	}{
		{"clone-depth1", []runnerapi.Variable{{Key: "GIT_STRATEGY", Value: "clone"}}},
		{"clone-depth1-submodules", []runnerapi.Variable{{Key: "GIT_STRATEGY", Value: "clone"}, {Key: "GIT_SUBMODULE_STRATEGY", Value: "recursive"}}},
		{"fetch-unchanged", []runnerapi.Variable{{Key: "GIT_STRATEGY", Value: "fetch"}}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			e := newLocalExec(b, bashProgram(), nil)
			job := srv.job(shas[2], bc.vars...)
			job.GitInfo.Depth = 1
			p, err := Generate(job, Options{BuildsDir: b.TempDir()})
			if err != nil {
				b.Fatal(err)
			}
			if code, out := runOne(b, p, e, StageGetSources); code != 0 { // warm: the fetch case reuses it
				b.Fatalf("exit %d\n%s", code, out)
			}
			var runs []time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				for range 5 {
					start := time.Now()
					if code, out := runOne(b, p, e, StageGetSources); code != 0 {
						b.Fatalf("exit %d\n%s", code, out)
					}
					runs = append(runs, time.Since(start))
				}
			}
			slices.Sort(runs)
			b.ReportMetric(float64(runs[len(runs)/2].Microseconds())/1000, "ms/get_sources")
		})
	}
}
