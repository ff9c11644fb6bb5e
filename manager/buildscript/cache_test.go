package buildscript

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

type fakeSigner struct{ signed []string }

func (f *fakeSigner) CacheURLs(project int64, key string, ttl time.Duration) (CacheURLs, error) {
	f.signed = append(f.signed, fmt.Sprintf("%d/%s/%s", project, key, ttl))
	return CacheURLs{Get: "http://store/get/" + key + "?sig=g", Put: "http://store/put/" + key + "?sig=p", PutHeaders: []string{"X-Goog-Meta-Cachekey: " + key}}, nil
}

func TestSanitizeCacheKey(t *testing.T) {
	for in, want := range map[string]string{
		"main":                   "main",
		"a/b":                    "a/b",
		`..\..\etc`:              "etc",
		"x%2F..%2F..%2Fy":        "y",
		"job/main  ":             "job/main",
		"/abs/key/":              "abs/key",
		"a/b/  /":                "a/b",
		"feature/x/../../../ok.": "ok.",
	} {
		got, err := SanitizeCacheKey(in)
		if err != nil || got != want {
			t.Errorf("%q: %q %v, want %q", in, got, err, want)
		}
	}
	if _, err := SanitizeCacheKey("../"); err == nil {
		t.Error(`"../": no error`)
	}
}

func stageScript(p *Plan, name StageName) string {
	for _, s := range p.Stages {
		if s.Name == name {
			return s.Script
		}
	}
	return ""
}

func TestCacheAndArtifactStages(t *testing.T) {
	job := &runnerapi.JobResponse{
		ID: 7, Token: "jt",
		JobInfo: runnerapi.JobInfo{Name: "build", ProjectID: 3},
		GitInfo: runnerapi.GitInfo{Ref: "main", Sha: "0123456789abcdef"},
		Variables: []runnerapi.Variable{
			{Key: "CI_SERVER_URL", Value: "http://10.0.2.2:8929"}, {Key: "LANG_V", Value: "go1"},
			{Key: "CACHE_FALLBACK_KEY", Value: "main-protected"}, {Key: "GIT_STRATEGY", Value: "none"},
		},
		Steps: []runnerapi.Step{{Name: "script", Script: []string{"true"}}},
		Cache: []runnerapi.Cache{
			{Key: "deps-$LANG_V", Paths: []string{"vendor/"}, Policy: "pull-push", When: "on_success", FallbackKeys: []string{"deps-main"}},
			{Key: "pulled", Paths: []string{"x/"}, Policy: "pull"},
			{Key: `..\bad`, Untracked: true, When: "always"},
		},
		Artifacts: []runnerapi.Artifact{
			{Paths: []string{"bin/"}, Exclude: []string{"bin/**/*.o"}, Type: "archive", Format: "zip", When: "on_success", ExpireIn: "1 week"},
			{Name: "junit.xml", Paths: []string{"junit.xml"}, Type: "junit", Format: "gzip", When: "always"},
		},
		Dependencies: []runnerapi.Dependency{{ID: 5, Name: "compile", Token: "jt", ArtifactsFile: runnerapi.ArtifactsFile{Filename: "artifacts.zip"}}, {ID: 6, Name: "none"}},
	}
	signer := &fakeSigner{}
	p, err := Generate(job, Options{UseHelper: true, Cache: signer, BuildsDir: "/builds"})
	if err != nil {
		t.Fatal(err)
	}
	if p.HelperPath != "/builds/.mayfly/mayfly-helper" || !p.NeedsHelper {
		t.Errorf("helper %q needed %v", p.HelperPath, p.NeedsHelper)
	}
	restore := stageScript(p, StageRestoreCache)
	for _, want := range []string{
		`'cache-extractor' '--key' 'deps-go1' '--url' 'http://store/get/deps-go1?sig=g' '--key' 'deps-main' '--url' 'http://store/get/deps-main?sig=g'`,
		`CACHE_FALLBACK_KEY "main-protected" not allowed to end in "-protected"`,
		`'cache-extractor' '--key' 'pulled'`,
		`cache key "..\\bad" sanitized to "bad"`,
	} {
		if !strings.Contains(restore, want) {
			t.Errorf("restore_cache lacks %s:\n%s", want, restore)
		}
	}
	archive := stageScript(p, StageArchiveCache)
	for _, want := range []string{
		`'cache-archiver' '--key' 'deps-go1' '--file' '/builds/project-3.tmp/cache/deps-go1/cache.zip' '--path' 'vendor/' '--url' 'http://store/put/deps-go1?sig=p' '--header' 'X-Goog-Meta-Cachekey: deps-go1'`,
		`'--key' 'bad'`, `'--untracked'`,
	} {
		if !strings.Contains(archive, want) {
			t.Errorf("archive_cache lacks %s:\n%s", want, archive)
		}
	}
	if onFailure := stageScript(p, StageArchiveCacheOnFailure); !strings.Contains(onFailure, "'--key' 'bad'") || strings.Contains(onFailure, "deps-go1") {
		t.Errorf("archive_cache_on_failure should save only the when:always cache:\n%s", onFailure)
	}
	download := stageScript(p, StageDownloadArtifacts)
	if !strings.Contains(download, `'artifacts-downloader' '--url' 'http://10.0.2.2:8929' '--id' '5'`) || strings.Contains(download, "'6'") {
		t.Errorf("download_artifacts:\n%s", download)
	}
	up := stageScript(p, StageUploadArtifactsOnSuccess)
	for _, want := range []string{
		`'artifacts-uploader' '--url' 'http://10.0.2.2:8929' '--id' '7' '--path' 'bin/' '--exclude' 'bin/**/*.o' '--expire-in' '1 week' '--artifact-format' 'zip' '--artifact-type' 'archive'`,
		`'--name' 'junit.xml' '--artifact-format' 'gzip' '--artifact-type' 'junit'`,
	} {
		if !strings.Contains(up, want) {
			t.Errorf("upload_artifacts_on_success lacks %s:\n%s", want, up)
		}
	}
	if f := stageScript(p, StageUploadArtifactsOnFailure); !strings.Contains(f, "junit") || strings.Contains(f, "'archive'") {
		t.Errorf("upload_artifacts_on_failure should send the report only:\n%s", f)
	}
	if len(signer.signed) == 0 || !strings.HasPrefix(signer.signed[0], "3/deps-go1/2h15m0s") {
		t.Errorf("signed %q", signer.signed)
	}

	// Without the helper the stages say so, as gitlab-runner without its helper.
	p, err = Generate(job, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if p.NeedsHelper || !strings.Contains(stageScript(p, StageRestoreCache), "Extracting cache is not supported by this executor.") {
		t.Errorf("without a helper:\n%s", stageScript(p, StageRestoreCache))
	}
}
