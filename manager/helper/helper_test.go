package helper

import (
	"archive/zip"
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// runIn runs the helper in dir with env and returns its exit code and output.
func runIn(t *testing.T, dir string, env map[string]string, args ...string) (int, string) {
	t.Helper()
	t.Chdir(dir)
	var out bytes.Buffer
	c := &cli{stdout: &out, stderr: &out, env: func(k string) string { return env[k] }, retryWait: time.Millisecond}
	code := run(context.Background(), c, args)
	return code, out.String()
}

func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestArtifactsUploader: the request GitLab gets (multipart "file", query,
// JOB-TOKEN), a 503 retried, a 403 not.
func TestArtifactsUploader(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"bin/app": "app", "bin/app.o": "obj"})
	var mu sync.Mutex
	var got []string
	fail503 := 1
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		if r.URL.Path == "/api/v4/jobs/9/artifacts" && r.Header.Get("JOB-TOKEN") == "" {
			http.Error(w, `{"message":"403 Forbidden"}`, http.StatusForbidden)
			return
		}
		f, hdr, err := r.FormFile("file")
		if err != nil {
			t.Errorf("form file: %v", err)
			return
		}
		b, _ := io.ReadAll(f)
		if fail503 > 0 {
			fail503--
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		zr, err := zip.NewReader(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			t.Errorf("not a zip: %v", err)
			return
		}
		var names []string
		for _, f := range zr.File {
			names = append(names, f.Name)
		}
		got = append(got, r.URL.Path+"?"+r.URL.RawQuery+" "+r.Header.Get("JOB-TOKEN")+" "+hdr.Filename+" "+strings.Join(names, ","))
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, "201")
	}))
	defer srv.Close()
	code, out := runIn(t, dir, map[string]string{"CI_JOB_TOKEN": "jt", "NAME": "build"}, "artifacts-uploader", "--url", srv.URL+"/", "--id", "7",
		"--path", "bin/", "--exclude", "**/*.o", "--name", "$NAME", "--expire-in", "1 week")
	if code != 0 || !strings.Contains(out, `Uploading artifacts as "archive" to coordinator... 201 Created`) || !strings.Contains(out, "retrying") {
		t.Errorf("exit %d:\n%s", code, out)
	}
	want := "/api/v4/jobs/7/artifacts?artifact_format=zip&artifact_type=archive&expire_in=1+week jt build.zip bin/,bin/app"
	if len(got) != 1 || got[0] != want {
		t.Errorf("uploads %q, want %q", got, want)
	}
	code, out = runIn(t, dir, nil, "artifacts-uploader", "--url", srv.URL, "--id", "9", "--token", "", "--path", "bin/")
	if code != 1 || !strings.Contains(out, "missing runner credentials") {
		t.Errorf("no token: exit %d: %s", code, out)
	}
}

func zipBytes(t *testing.T, files map[string]string) []byte {
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for n, c := range files {
		w, _ := zw.Create(n)
		io.WriteString(w, c)
	}
	zw.Close()
	return buf.Bytes()
}

func TestArtifactsDownloader(t *testing.T) {
	dir := t.TempDir()
	body := zipBytes(t, map[string]string{"out/result.txt": "42"})
	calls := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls++
		switch {
		case r.Header.Get("JOB-TOKEN") != "jt":
			w.WriteHeader(http.StatusForbidden)
		case r.URL.Path == "/api/v4/jobs/5/artifacts" && calls == 1:
			w.WriteHeader(http.StatusBadGateway)
		case r.URL.Path == "/api/v4/jobs/5/artifacts":
			w.Write(body)
		default:
			w.WriteHeader(http.StatusNotFound)
		}
	}))
	defer srv.Close()
	code, out := runIn(t, dir, map[string]string{"CI_JOB_TOKEN": "jt"}, "artifacts-downloader", "--url", srv.URL, "--id", "5")
	if b, _ := os.ReadFile(filepath.Join(dir, "out/result.txt")); code != 0 || string(b) != "42" {
		t.Errorf("exit %d, file %q:\n%s", code, b, out)
	}
	if code, out := runIn(t, dir, map[string]string{"CI_JOB_TOKEN": "jt"}, "artifacts-downloader", "--url", srv.URL, "--id", "6"); code != 1 || !strings.Contains(out, "not found") {
		t.Errorf("missing: exit %d: %s", code, out)
	}
}

// TestCacheRoundTrip: archive + PUT with the signed headers, then a
// restore that falls back past a missing key; an archive over the limit
// is refused with a clear line.
func TestCacheRoundTrip(t *testing.T) {
	var mu sync.Mutex
	store := map[string][]byte{}
	var putHeaders http.Header
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		switch r.Method {
		case http.MethodPut:
			if r.ContentLength <= 0 {
				w.WriteHeader(http.StatusLengthRequired)
				return
			}
			b, _ := io.ReadAll(r.Body)
			store[r.URL.Path] = b
			putHeaders = r.Header.Clone()
		case http.MethodGet:
			b, ok := store[r.URL.Path]
			if !ok {
				w.WriteHeader(http.StatusNotFound)
				io.WriteString(w, "<Error><Code>NoSuchKey</Code></Error>")
				return
			}
			w.Header().Set("ETag", `"e1"`)
			w.Write(b)
		}
	}))
	defer srv.Close()
	src := t.TempDir()
	writeFiles(t, src, map[string]string{"vendor/a.txt": "cached", ".git/x": "no"})
	code, out := runIn(t, src, nil, "cache-archiver", "--key", "k1", "--file", filepath.Join(t.TempDir(), "k1/cache.zip"),
		"--url", srv.URL+"/k1?sig=secret", "--header", "X-Goog-Meta-Cachekey: k1", "--path", "vendor")
	if code != 0 || putHeaders.Get("X-Goog-Meta-Cachekey") != "k1" || strings.Contains(out, "secret") {
		t.Errorf("archive: exit %d, headers %v:\n%s", code, putHeaders, out)
	}
	dst := t.TempDir()
	code, out = runIn(t, dst, nil, "cache-extractor", "--key", "missing", "--url", srv.URL+"/missing?sig=s", "--key", "k1", "--url", srv.URL+"/k1?sig=s")
	if b, _ := os.ReadFile(filepath.Join(dst, "vendor/a.txt")); code != 0 || string(b) != "cached" {
		t.Errorf("extract: exit %d, file %q:\n%s", code, b, out)
	}
	for _, want := range []string{"Checking cache for missing...", "Failed to extract cache", "Checking cache for k1...", "Successfully extracted cache"} {
		if !strings.Contains(out, want) {
			t.Errorf("extract output lacks %q:\n%s", want, out)
		}
	}
	code, out = runIn(t, src, nil, "cache-archiver", "--key", "big", "--file", filepath.Join(t.TempDir(), "big.zip"),
		"--url", srv.URL+"/big", "--path", "vendor", "--max-uploaded-archive-size", "10")
	if _, stored := store["/big"]; code != 0 || stored || !strings.Contains(out, "over the limit of 10 B (10 bytes): it is not uploaded") {
		t.Errorf("oversize: exit %d, stored %v:\n%s", code, stored, out)
	}
}

// TestCacheRetries: a cache store's failures are retried cacheTries times
// in all (through retry, as GitLab's), a missing key not at all.
func TestCacheRetries(t *testing.T) {
	for _, tc := range []struct {
		name      string
		failFirst int // answers 503 to the first calls
		wantCalls int
		wantSaved bool
	}{
		{"stored after two failures", 2, 3, true},
		{"given up after cacheTries", 10, cacheTries, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			calls, saved := 0, false
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				defer mu.Unlock()
				calls++
				io.Copy(io.Discard, r.Body)
				if calls <= tc.failFirst {
					w.WriteHeader(http.StatusServiceUnavailable)
					return
				}
				saved = true
			}))
			defer srv.Close()
			src := t.TempDir()
			writeFiles(t, src, map[string]string{"vendor/a.txt": "cached"})
			_, out := runIn(t, src, nil, "cache-archiver", "--key", "k1", "--file", filepath.Join(t.TempDir(), "k1/cache.zip"),
				"--url", srv.URL+"/k1", "--path", "vendor")
			mu.Lock()
			defer mu.Unlock()
			if calls != tc.wantCalls || saved != tc.wantSaved {
				t.Errorf("%d calls, saved %v; want %d, %v:\n%s", calls, saved, tc.wantCalls, tc.wantSaved, out)
			}
		})
	}
	var mu sync.Mutex
	gets := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		gets++
		mu.Unlock()
		w.WriteHeader(http.StatusNotFound)
	}))
	defer srv.Close()
	runIn(t, t.TempDir(), nil, "cache-extractor", "--key", "missing", "--url", srv.URL+"/missing")
	mu.Lock()
	defer mu.Unlock()
	if gets != 1 {
		t.Errorf("a missing key was asked for %d times, want 1", gets)
	}
}
