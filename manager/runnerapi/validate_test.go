package runnerapi

import (
	"errors"
	"strings"
	"testing"
)

// goodJob is a payload as GitLab sends it, with every list filled.
func goodJob() *JobResponse {
	return &JobResponse{
		ID:      42,
		Token:   "glcbt-64_xYz-token",
		JobInfo: JobInfo{Name: "test: [go 1.26]", Stage: "test", ProjectID: 7, ProjectName: "app"},
		GitInfo: GitInfo{
			RepoURL: "https://gitlab-ci-token:glcbt-64_xYz-token@gitlab.example.com/group/app.git",
			Ref:     "feature/x", Sha: strings.Repeat("a", 40), BeforeSha: strings.Repeat("0", 40), RefType: "branch",
			Refspecs: []string{"+refs/heads/feature/x:refs/remotes/origin/feature/x"}, Depth: 20,
		},
		RunnerInfo: RunnerInfo{Timeout: 3600},
		Variables: []Variable{
			{Key: "CI_JOB_TOKEN", Value: "glcbt-64_xYz-token", Masked: true},
			{Key: "MULTI", Value: "line one\nline two $HOME 'quoted' \"too\""},
		},
		Steps:        []Step{{Name: "script", Script: []string{"echo hi", "make test"}, Timeout: 3600, When: WhenOnSuccess}, {Name: "after_script", Script: []string{"echo bye"}, When: WhenAlways}},
		Image:        &Image{Name: "registry.example.com/group/app/golang:1.26", Entrypoint: []string{""}},
		Services:     []Image{{Name: "postgres:16", Alias: "db,postgres", Variables: []Variable{{Key: "POSTGRES_PASSWORD", Value: "x"}}, PullPolicy: []string{"if-not-present"}}},
		Artifacts:    []Artifact{{Name: "app-$CI_JOB_NAME", Paths: []string{"bin/**"}, Exclude: []string{"bin/*.tmp"}, When: WhenOnSuccess, Type: "archive", Format: "zip", ExpireIn: "1 week"}, {Type: "junit", Format: "gzip", Paths: []string{"report.xml"}, When: WhenAlways}},
		Cache:        []Cache{{Key: "go-mod-protected", Paths: []string{".cache/go"}, Policy: "pull-push", When: WhenOnSuccess, FallbackKeys: []string{"main-go"}}},
		Credentials:  []Credentials{{Type: "registry", URL: "registry.example.com", Username: "gitlab-ci-token", Password: "glcbt-64_xYz-token"}},
		Dependencies: []Dependency{{ID: 41, Token: "glcbt-64_xYz-token", Name: "build", ArtifactsFile: ArtifactsFile{Filename: "artifacts.zip", Size: 1234}}},
		Hooks:        []Hook{{Name: HookPreGetSourcesScript, Script: []string{"echo pre"}}},
	}
}

func TestValidate(t *testing.T) {
	if err := goodJob().Validate(); err != nil {
		t.Fatalf("a good payload was refused: %v", err)
	}
	tests := []struct {
		field string
		edit  func(j *JobResponse)
	}{
		{"id", func(j *JobResponse) { j.ID = 0 }},
		{"token", func(j *JobResponse) { j.Token = "" }},
		{"token", func(j *JobResponse) { j.Token = "tok\r\nX-Evil: 1" }},
		{"token", func(j *JobResponse) { j.Token = "tok en" }},
		{"token", func(j *JobResponse) { j.Token = "tök" }},
		{"job_info.name", func(j *JobResponse) { j.JobInfo.Name = "a\nb" }},
		{"job_info.project_id", func(j *JobResponse) { j.JobInfo.ProjectID = -1 }},
		{"git_info.repo_url", func(j *JobResponse) { j.GitInfo.RepoURL = "file:///etc" }},
		{"git_info.repo_url", func(j *JobResponse) { j.GitInfo.RepoURL = "https://host/a\nb" }},
		{"git_info.repo_url", func(j *JobResponse) { j.GitInfo.RepoURL = "-uhttps://x" }},
		{"git_info.ref", func(j *JobResponse) { j.GitInfo.Ref = "--upload-pack=evil" }},
		{"git_info.sha", func(j *JobResponse) { j.GitInfo.Sha = "HEAD; rm -rf /" }},
		{"git_info.ref_type", func(j *JobResponse) { j.GitInfo.RefType = "commit" }},
		{"git_info.refspecs[0]", func(j *JobResponse) { j.GitInfo.Refspecs = []string{"--exec=evil"} }},
		{"git_info.depth", func(j *JobResponse) { j.GitInfo.Depth = -1 }},
		{"variables[1].key", func(j *JobResponse) { j.Variables[1].Key = "A-B" }},
		{"variables[1].key", func(j *JobResponse) { j.Variables[1].Key = "X=Y" }},
		{"variables[1].key", func(j *JobResponse) { j.Variables[1].Key = "1ST" }},
		{"variables[1].value", func(j *JobResponse) { j.Variables[1].Value = "a\x00b" }},
		{"steps", func(j *JobResponse) { j.Steps = nil }},
		{"steps[0].name", func(j *JobResponse) { j.Steps[0].Name = "../../x" }},
		{"steps[0].when", func(j *JobResponse) { j.Steps[0].When = "sometimes" }},
		{"steps[0].script[1]", func(j *JobResponse) { j.Steps[0].Script[1] = "a\x00" }},
		{"image.name", func(j *JobResponse) { j.Image.Name = "alpine\n" }},
		{"services[0].name", func(j *JobResponse) { j.Services[0].Name = "" }},
		{"services[0].alias", func(j *JobResponse) { j.Services[0].Alias = "db;evil" }},
		{"services[0].pull_policy[0]", func(j *JobResponse) { j.Services[0].PullPolicy = []string{"sometimes"} }},
		{"artifacts[0].name", func(j *JobResponse) { j.Artifacts[0].Name = "a\rb" }},
		{"artifacts[0].artifact_format", func(j *JobResponse) { j.Artifacts[0].Format = "tar" }},
		{"artifacts[0].artifact_type", func(j *JobResponse) { j.Artifacts[0].Type = "Archive!" }},
		{"cache[0].key", func(j *JobResponse) { j.Cache[0].Key = "../../etc" }},
		{"cache[0].key", func(j *JobResponse) { j.Cache[0].Key = "/abs" }},
		{"cache[0].key", func(j *JobResponse) { j.Cache[0].Key = `a\..\b` }},
		{"cache[0].fallback_keys[0]", func(j *JobResponse) { j.Cache[0].FallbackKeys[0] = ".." }},
		{"cache[0].policy", func(j *JobResponse) { j.Cache[0].Policy = "push-pull" }},
		{"dependencies[0].token", func(j *JobResponse) { j.Dependencies[0].Token = "a\nb" }},
		{"dependencies[0].artifacts_file.filename", func(j *JobResponse) { j.Dependencies[0].ArtifactsFile.Filename = "../x.zip" }},
		{"hooks[0].name", func(j *JobResponse) { j.Hooks[0].Name = "Pre Hook" }},
	}
	for _, tt := range tests {
		t.Run(tt.field, func(t *testing.T) {
			j := goodJob()
			tt.edit(j)
			err := j.Validate()
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("accepted (err %v)", err)
			}
			if fe.Field != tt.field {
				t.Errorf("error names %q, want %q: %v", fe.Field, tt.field, err)
			}
		})
	}
}
