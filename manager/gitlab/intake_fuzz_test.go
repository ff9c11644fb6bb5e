package gitlab

import (
	"encoding/json"
	"net/http"
	"net/url"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"golang.org/x/net/http/httpguts"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// fuzzSeedJob is a payload as GitLab sends it.
const fuzzSeedJob = `{"id": 42, "token": "glcbt-64_token", "allow_git_fetch": true,
 "job_info": {"name": "test", "stage": "test", "project_id": 7, "project_name": "app"},
 "git_info": {"repo_url": "https://gitlab-ci-token:glcbt-64_token@gitlab.example.com/g/app.git", "ref": "main",
   "sha": "0123456789abcdef0123456789abcdef01234567", "before_sha": "0000000000000000000000000000000000000000",
   "ref_type": "branch", "refspecs": ["+refs/heads/main:refs/remotes/origin/main"], "depth": 20},
 "runner_info": {"timeout": 3600},
 "variables": [{"key": "CI_JOB_TOKEN", "value": "glcbt-64_token", "masked": true}, {"key": "GIT_STRATEGY", "value": "none"},
   {"key": "F", "value": "file body", "file": true}],
 "steps": [{"name": "script", "script": ["echo hi"], "timeout": 3600, "when": "on_success"},
   {"name": "after_script", "script": ["echo bye"], "timeout": 300, "when": "always"}],
 "image": {"name": "debian:bookworm"},
 "services": [{"name": "postgres:16", "alias": "db"}],
 "artifacts": [{"name": "a", "paths": ["bin/"], "when": "on_success", "artifact_type": "archive", "artifact_format": "zip", "expire_in": "1 day"}],
 "cache": [{"key": "k", "paths": ["c/"], "policy": "pull-push", "when": "on_success"}],
 "dependencies": [{"id": 41, "token": "glcbt-64_token", "name": "build", "artifacts_file": {"filename": "artifacts.zip", "size": 10}}],
 "features": {"trace_sections": true}}`

var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// FuzzJobPayload feeds job request answers through the whole intake path
// (decoding and validation, then the build plan) and checks that nothing
// panics and that every accepted payload is safe to use: its tokens can be
// sent as headers, its variables set in an environment, its cache keys
// joined to a directory without leaving it, and its clone URL parsed.
func FuzzJobPayload(f *testing.F) {
	f.Add([]byte(fuzzSeedJob))
	f.Add([]byte(strings.Replace(fuzzSeedJob, `"glcbt-64_token", "allow`, `"tok\r\nX: 1", "allow`, 1)))
	f.Add([]byte(strings.Replace(fuzzSeedJob, `"key": "k"`, `"key": "../../etc"`, 1)))
	f.Add([]byte(`{"id": 1, "token": "t", "steps": []}`))
	f.Add([]byte(`{"id": "1"}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		resp := &response{status: http.StatusCreated, header: http.Header{"Content-Type": {"application/json"}}, body: body}
		job, err := decodeJob(resp)
		if err != nil {
			if _, ok := err.(*JobPayloadError); !ok {
				t.Fatalf("error %T is not a *JobPayloadError: %v", err, err)
			}
			return
		}
		tokens := []string{job.Token}
		for _, d := range job.Dependencies {
			tokens = append(tokens, d.Token)
		}
		for _, tok := range tokens {
			if !httpguts.ValidHeaderFieldValue(tok) || !runnerapi.HeaderSafe(tok) {
				t.Fatalf("accepted token %q cannot be sent as a header", tok)
			}
		}
		for _, v := range job.Variables {
			if !envName.MatchString(v.Key) || strings.IndexByte(v.Value, 0) >= 0 {
				t.Fatalf("accepted variable %q=%q cannot be set in an environment", v.Key, v.Value)
			}
		}
		for _, c := range job.Cache {
			for _, key := range append([]string{c.Key}, c.FallbackKeys...) {
				if p := filepath.Join("/cache/base", key); p != "/cache/base" && !strings.HasPrefix(p, "/cache/base/") {
					t.Fatalf("accepted cache key %q leaves its directory: %s", key, p)
				}
			}
		}
		if job.GitInfo.RepoURL != "" {
			if _, err := url.Parse(job.GitInfo.RepoURL); err != nil {
				t.Fatalf("accepted repo URL %q: %v", job.GitInfo.RepoURL, err)
			}
		}
		if _, err := json.Marshal(job); err != nil {
			t.Fatalf("accepted payload cannot be encoded again: %v", err)
		}
		// The build plan takes it or refuses it with an error, never a panic.
		for _, shell := range []string{buildscript.ShellBash, buildscript.ShellSh, buildscript.ShellPwsh} {
			_, _ = buildscript.Generate(job, buildscript.Options{Shell: shell, BuildsDir: "/builds"})
		}
	})
}
