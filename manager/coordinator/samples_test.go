package coordinator

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// TestSampleProjects serves every project of testdata/projects as
// `mayfly coordinator --project` does and checks the pipelines and payloads
// they make: no warnings, and the keywords each sample is there to show.
func TestSampleProjects(t *testing.T) {
	needGit(t)
	dirs, err := filepath.Glob("../../testdata/projects/*")
	if err != nil {
		t.Fatal(err)
	}
	var srcs []ProjectSource
	for _, d := range dirs {
		if st, err := os.Stat(d); err == nil && st.IsDir() {
			srcs = append(srcs, ProjectSource{Dir: d})
		}
	}
	if len(srcs) < 4 {
		t.Fatalf("found %d sample projects", len(srcs))
	}
	e := newEnv(t, Config{StateDir: t.TempDir(), ExternalURL: "http://10.0.2.2:8929"})
	res, err := e.s.AddProjects(context.Background(), srcs)
	if err != nil {
		t.Fatal(err)
	}
	byPath := map[string]ProjectResult{}
	for _, r := range res {
		byPath[r.Project.Path] = r
		if r.Project.Path == "root/shared-lib" {
			if r.Pipeline != nil {
				t.Errorf("shared-lib has a pipeline")
			}
			continue
		}
		if r.Pipeline == nil {
			t.Errorf("%s: no pipeline: %s", r.Project.Path, r.NoPipeline)
			continue
		}
		if len(r.Pipeline.Warnings) > 0 {
			t.Errorf("%s: warnings %q", r.Project.Path, r.Pipeline.Warnings)
		}
		if !strings.HasPrefix(r.RepoURL, "http://10.0.2.2:8929/root/") {
			t.Errorf("%s: repo URL %s", r.Project.Path, r.RepoURL)
		}
	}
	// Take every job there is and look at what each sample shows.
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	payloads := map[string]*runnerapi.JobResponse{}
	for range 20 {
		_, j := e.requestJob(tok, "")
		if j == nil {
			break
		}
		payloads[j.JobInfo.ProjectName+"/"+j.JobInfo.Name] = j
		if !strings.HasPrefix(j.GitInfo.RepoURL, "http://gitlab-ci-token:"+j.Token+"@10.0.2.2:8929/root/") {
			t.Errorf("%s: repo_url %s", j.JobInfo.Name, j.GitInfo.RepoURL)
		}
		e.finish(j, runnerapi.StateSuccess, nil)
	}
	for _, name := range []string{"two-stages/build", "two-stages/test", "with-submodule/show", "services/check-db", "go-app/unit", "go-app/build"} {
		if payloads[name] == nil {
			t.Fatalf("no job %q among %v", name, keys(payloads))
		}
	}
	if b := payloads["two-stages/build"]; b.GitInfo.Depth != 1 || len(b.Artifacts) != 1 || b.Artifacts[0].Paths[0] != "out/" {
		t.Errorf("two-stages build: depth %d artifacts %+v", b.GitInfo.Depth, b.Artifacts)
	}
	if tj := payloads["two-stages/test"]; len(tj.Dependencies) != 1 || tj.Dependencies[0].Name != "build" || tj.Dependencies[0].ID != payloads["two-stages/build"].ID {
		t.Errorf("two-stages test dependencies %+v", tj.Dependencies)
	}
	show := payloads["with-submodule/show"]
	if len(show.Hooks) != 1 || show.Hooks[0].Name != "pre_get_sources_script" || varValue(show, "GIT_SUBMODULE_STRATEGY") != "recursive" ||
		!strings.Contains(varValue(show, "CI_PRE_CLONE_SCRIPT"), "pre-clone script ran") || show.GitInfo.Depth != 1 {
		t.Errorf("with-submodule payload: hooks %+v", show.Hooks)
	}
	e.s.mu.Lock()
	readable := e.s.pipelines[byPath["root/with-submodule"].Pipeline.ID].readable
	e.s.mu.Unlock()
	if !slices.Contains(readable, "root/shared-lib") {
		t.Errorf("with-submodule's job token may read %v, want shared-lib too", readable)
	}
	db := payloads["services/check-db"]
	if db.Image == nil || db.Image.Name != "$CI_REGISTRY/mayfly/debian:bookworm" || len(db.Services) != 1 || db.Services[0].Alias != "db" {
		t.Errorf("services payload: image %+v services %+v", db.Image, db.Services)
	}
	unit := payloads["go-app/unit"]
	if len(unit.Cache) != 1 || !strings.HasPrefix(unit.Cache[0].Key, "go-") || !strings.HasSuffix(unit.Cache[0].Key, "-protected") || len(unit.Cache[0].Key) != len("go-")+40+len("-protected") {
		t.Errorf("go-app cache %+v", unit.Cache)
	}
	// demo is what `make run` runs (scripts/demo.sh checks its traces).
	for _, name := range []string{"demo/build", "demo/lint", "demo/check-db"} {
		if payloads[name] == nil {
			t.Fatalf("no job %q among %v", name, keys(payloads))
		}
	}
	if b := payloads["demo/build"]; len(b.Cache) != 1 || b.Cache[0].Key != "demo-$CI_COMMIT_REF_SLUG-protected" || len(b.Artifacts) != 2 || b.Image != nil {
		t.Errorf("demo build: cache %+v artifacts %+v image %+v", b.Cache, b.Artifacts, b.Image)
	}
	for _, j := range e.s.Jobs() {
		if j.ProjectPath == "root/demo" && j.Name == "lint" && !j.AllowFailure {
			t.Errorf("demo lint may not fail")
		}
	}
	if c := payloads["demo/check-db"]; c.Image == nil || len(c.Services) != 1 || c.Services[0].Alias != "db" ||
		len(c.Dependencies) != 1 || c.Dependencies[0].ID != payloads["demo/build"].ID {
		t.Errorf("demo check-db: image %+v services %+v dependencies %+v", c.Image, c.Services, c.Dependencies)
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func varValue(j *runnerapi.JobResponse, key string) string {
	v := ""
	for _, x := range j.Variables {
		if x.Key == key {
			v = x.Value
		}
	}
	return v
}
