package coordinator

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"mime/multipart"
	"net/http"
	"os"
	"slices"

	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// multipartBody is GitLab's artifact upload body: one "file" part.
func multipartBody(t testing.TB, filename string, content []byte) ([]byte, string) {
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	fw, err := mw.CreateFormFile("file", filename)
	if err != nil {
		t.Fatal(err)
	}
	fw.Write(content)
	mw.Close()
	return buf.Bytes(), mw.FormDataContentType()
}

func gz(s string) []byte {
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	zw.Write([]byte(s))
	zw.Close()
	return b.Bytes()
}

func (e *env) upload(id int64, token, query, filename string, content []byte) resp {
	e.t.Helper()
	body, ctype := multipartBody(e.t, filename, content)
	return e.do(http.MethodPost, "/api/v4/jobs/"+itoa(id)+"/artifacts?"+query, map[string]string{"JOB-TOKEN": token, "Content-Type": ctype}, body)
}

// TestArtifactsBetweenJobs: job A uploads an archive, a junit report and a
// dotenv report; job B (needs A) gets artifacts_file and the dotenv
// variable in its payload and downloads A's archive with its own token;
// others cannot.
func TestArtifactsBetweenJobs(t *testing.T) {
	e := newEnv(t, Config{StateDir: t.TempDir(), MaxArtifactBytes: 1 << 20})
	f, err := ParsePipelineFile("p.yaml", []byte(`
projects:
  - name: app
    pipelines:
      - variables: [{key: GIT_STRATEGY, value: none}, {key: FROM_YAML, value: yaml}]
        jobs:
          - {name: a, stage: build, script: [x], artifacts: {paths: [out/], reports: [{type: junit, paths: [junit.xml]}, {type: dotenv, paths: [build.env]}]}}
          - {name: b, stage: test, script: [x], needs: [{job: a}], variables: [{key: FROM_YAML, value: job}]}
          - {name: c, stage: test, script: [x], needs: [{job: a, no_artifacts: true}]}
`))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.s.Apply(f); err != nil {
		t.Fatal(err)
	}
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	a := e.mustJob(tok)
	archive := []byte("PK\x05\x06" + strings.Repeat("\x00", 18)) // an empty zip
	for _, u := range []struct {
		query, name string
		body        []byte
		want        int
	}{
		{"artifact_format=zip&artifact_type=archive&expire_in=1+week", "artifacts.zip", archive, 201},
		{"artifact_format=zip&artifact_type=archive", "artifacts.zip", archive, 201}, // the same again: a retry
		{"artifact_format=zip&artifact_type=archive", "artifacts.zip", []byte("other"), 400},
		{"artifact_format=gzip&artifact_type=junit", "junit.xml.gz", gz("<testsuites/>"), 201},
		{"artifact_format=gzip&artifact_type=dotenv", ".env.gz", gz("BUILD_VERSION=1.2.3\nFROM_YAML = dotenv \n"), 201},
		{"artifact_format=zip&artifact_type=nonsense", "x.zip", archive, 400},
		{"artifact_format=zip&artifact_type=archive&expire_in=soon", "x.zip", archive, 400},
		{"artifact_format=raw&artifact_type=sast", "big.json", bytes.Repeat([]byte("x"), 2<<20), 413},
	} {
		if r := e.upload(a.ID, a.Token, u.query, u.name, u.body); r.status != u.want {
			t.Errorf("upload %s: %d %s, want %d", u.query, r.status, r.body, u.want)
		}
	}
	if r := e.upload(a.ID, "wrong", "artifact_type=archive", "a.zip", archive); r.status != http.StatusForbidden {
		t.Errorf("upload with a wrong token: %d", r.status)
	}
	e.finish(a, runnerapi.StateSuccess, nil)

	var b, c *runnerapi.JobResponse
	for range 2 {
		j := e.mustJob(tok)
		if j.JobInfo.Name == "b" {
			b = j
		} else {
			c = j
		}
	}
	if len(b.Dependencies) != 1 || b.Dependencies[0].ArtifactsFile != (runnerapi.ArtifactsFile{Filename: "artifacts.zip", Size: int64(len(archive))}) {
		t.Errorf("b's dependencies: %+v", b.Dependencies)
	}
	vars := map[string]string{}
	for _, v := range b.Variables {
		vars[v.Key] = v.Value
	}
	if vars["BUILD_VERSION"] != "1.2.3" || vars["FROM_YAML"] != "dotenv" {
		t.Errorf("b's dotenv variables: BUILD_VERSION=%q FROM_YAML=%q", vars["BUILD_VERSION"], vars["FROM_YAML"])
	}
	if slices.ContainsFunc(c.Variables, func(v runnerapi.Variable) bool { return v.Key == "BUILD_VERSION" }) || len(c.Dependencies) != 0 {
		t.Errorf("c (needs a without artifacts) got a's artifacts or dotenv: %+v", c.Dependencies)
	}
	get := func(token string) resp {
		return e.do(http.MethodGet, "/api/v4/jobs/"+itoa(a.ID)+"/artifacts", map[string]string{"JOB-TOKEN": token}, nil)
	}
	if r := get(b.Token); r.status != http.StatusOK || !bytes.Equal(r.body, archive) || !strings.Contains(r.header.Get("Content-Disposition"), "artifacts.zip") {
		t.Errorf("b downloads a's archive: %d %q %v", r.status, r.body, r.header)
	}
	if r := get(c.Token); r.status != http.StatusForbidden {
		t.Errorf("c, which does not depend on a's artifacts, downloads them: %d", r.status)
	}
	if r := get("nobody"); r.status != http.StatusForbidden {
		t.Errorf("an unknown token downloads: %d", r.status)
	}
	r := e.do(http.MethodGet, AdminPrefix+"/jobs/"+itoa(a.ID)+"/artifacts", nil, nil)
	var recs []ArtifactRecord
	if err := json.Unmarshal(r.body, &recs); err != nil {
		t.Fatalf("admin artifacts: %d %s", r.status, r.body)
	}
	var types []string
	for _, rec := range recs {
		types = append(types, rec.Type+"/"+rec.Format+"/"+rec.Filename)
	}
	if want := []string{"archive/zip/artifacts.zip", "dotenv/gzip/.env.gz", "junit/gzip/junit.xml.gz"}; !slices.Equal(types, want) {
		t.Errorf("admin artifacts %q, want %q", types, want)
	}
	if want := e.clock.Now().Add(7 * 24 * time.Hour); !recs[0].ExpireAt.Equal(want) {
		t.Errorf("archive expires %v, want %v", recs[0].ExpireAt, want)
	}
	if r := e.do(http.MethodGet, AdminPrefix+"/jobs/"+itoa(a.ID)+"/artifacts/junit", nil, nil); r.status != 200 || !bytes.Equal(r.body, gz("<testsuites/>")) {
		t.Errorf("admin junit file: %d", r.status)
	}

	// After expiry the archive is gone, from the disk too.
	e.clock.Advance(8 * 24 * time.Hour)
	if r := get(b.Token); r.status != http.StatusNotFound {
		t.Errorf("expired archive: %d", r.status)
	}
	if _, err := os.Stat(recs[0].Path); !os.IsNotExist(err) {
		t.Errorf("expired archive still on disk: %v", err)
	}
}

func TestArtifactsNeedStateDir(t *testing.T) {
	e := newEnv(t, Config{})
	e.project("p", "", jobs("a")...)
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	a := e.mustJob(tok)
	if r := e.upload(a.ID, a.Token, "artifact_type=archive", "a.zip", []byte("x")); r.status != http.StatusMethodNotAllowed {
		t.Errorf("upload without a state dir: %d", r.status)
	}
}

func TestParseExpireIn(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for in, want := range map[string]time.Duration{
		"42": 42 * time.Second, "3 mins 4 sec": 184 * time.Second, "2 hrs 20 min": 140 * time.Minute,
		"2h20min": 140 * time.Minute, "6 mos 1 day": (6*30 + 1) * 24 * time.Hour, "47 yrs 6 mos and 4d": (47*365 + 6*30 + 4) * 24 * time.Hour,
		"3 weeks and 2 days": 23 * 24 * time.Hour, "never": 0, "": 0,
	} {
		got, err := parseExpireIn(in, now)
		if err != nil || (want == 0) != got.IsZero() || want != 0 && got.Sub(now) != want {
			t.Errorf("%q: %v %v, want +%v", in, got, err, want)
		}
	}
	for _, bad := range []string{"soon", "1 fortnight", "-1 day", "0"} {
		if _, err := parseExpireIn(bad, now); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

func TestParseDotenv(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct{ body, want string }{
		{"A=1\nB = two words \n", "A=1,B=two words"},
		{"A=1\n\nB=2\n", "Invalid Format"},
		{"# comment\n", "Invalid Format"},
		{"BAD-KEY=1\n", "Key can contain only"},
		{strings.Repeat("A=1234567890\n", 400), "Too Big"},
	} {
		p := dir + "/f"
		format := "gzip"
		content := gz(tc.body)
		if len(tc.body) > 5000 {
			format, content = "raw", []byte(tc.body)
		}
		os.WriteFile(p, content, 0o600)
		fi, _ := os.Stat(p)
		vars, err := parseDotenv(p, format, fi.Size())
		var got []string
		for _, v := range vars {
			got = append(got, v.Key+"="+v.Value)
		}
		if s := strings.Join(got, ","); err != nil && !strings.Contains(err.Error(), tc.want) || err == nil && s != tc.want {
			t.Errorf("%q: %q %v, want %q", tc.body, s, err, tc.want)
		}
	}
}
