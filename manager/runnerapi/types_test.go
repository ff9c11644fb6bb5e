package runnerapi

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

// captureDir holds a byte-exact capture of what gitlab-runner v14.10.1 sent
// (copied from the shared protocol notes).
const captureDir = "../../testdata/gitlab-capture"

func TestTraceChecksumMatchesCapture(t *testing.T) {
	tests := []struct {
		file string
		want string
		size int
	}{
		{"job-1.trace", "crc32:fba0a951", 1163},
		{"job-2.trace", "crc32:29454bc3", 1116},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join(captureDir, tt.file))
			if err != nil {
				t.Fatalf("read capture: %v", err)
			}
			if len(b) != tt.size {
				t.Errorf("size = %d, want %d", len(b), tt.size)
			}
			if got := TraceChecksum(b); got != tt.want {
				t.Errorf("TraceChecksum = %s, want %s", got, tt.want)
			}
		})
	}
}

// TestCaptureBodiesDecode decodes every JSON body the official runner sent
// into our types and re-encodes it, checking no field the runner sent is lost.
func TestCaptureBodiesDecode(t *testing.T) {
	f, err := os.Open(filepath.Join(captureDir, "requests.jsonl"))
	if err != nil {
		t.Fatalf("open capture: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	seen := map[string]int{}
	for line := 1; sc.Scan(); line++ {
		var rec struct {
			Method string          `json:"method"`
			Path   string          `json:"path"`
			JSON   json.RawMessage `json:"json"`
		}
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			t.Fatalf("line %d: %v", line, err)
		}
		var target any
		switch {
		case rec.Method == "POST" && rec.Path == "/api/v4/runners":
			target = &RegisterRunnerRequest{}
		case rec.Method == "POST" && rec.Path == "/api/v4/jobs/request":
			target = &JobRequest{}
		case rec.Method == "PUT":
			target = &UpdateJobRequest{}
		case rec.Path == "/api/v4/runners/verify" || rec.Method == "DELETE":
			target = &RunnerTokenRequest{}
		default:
			continue
		}
		seen[rec.Method+" "+rec.Path]++
		dec := json.NewDecoder(bytes.NewReader(rec.JSON))
		dec.DisallowUnknownFields()
		if err := dec.Decode(target); err != nil {
			t.Errorf("line %d %s %s: %v", line, rec.Method, rec.Path, err)
			continue
		}
		// Every key the runner sent must survive a round trip.
		var orig, again map[string]any
		_ = json.Unmarshal(rec.JSON, &orig)
		out, _ := json.Marshal(target)
		_ = json.Unmarshal(out, &again)
		for k := range orig {
			if _, ok := again[k]; !ok {
				t.Errorf("line %d: key %q lost in round trip", line, k)
			}
		}
	}
	if seen["POST /api/v4/jobs/request"] == 0 || seen["POST /api/v4/runners"] == 0 {
		t.Errorf("capture did not contain the expected requests: %v", seen)
	}
}

// The payload fields GitLab sends only when set are encoded the same way.
func TestJobPayloadOptionalFieldShapes(t *testing.T) {
	tests := []struct {
		name string
		v    any
		want string
	}{
		{"dependency without artifacts", Dependency{ID: 1, Token: "t", Name: "a"}, `{"id":1,"token":"t","name":"a"}`},
		{"dependency with artifacts", Dependency{ID: 1, Token: "t", Name: "a", ArtifactsFile: ArtifactsFile{Filename: "artifacts.zip", Size: 9}},
			`{"id":1,"token":"t","name":"a","artifacts_file":{"filename":"artifacts.zip","size":9}}`},
		{"artifact without exclude", Artifact{Paths: []string{"bin/"}, When: "on_success", Type: "archive", Format: "zip"},
			`{"name":"","untracked":false,"paths":["bin/"],"when":"on_success","artifact_type":"archive","artifact_format":"zip","expire_in":""}`},
		{"cache with no fallback keys", Cache{Key: "default-non_protected", Policy: "pull-push", Paths: []string{}, When: "on_success", FallbackKeys: []string{}},
			`{"key":"default-non_protected","untracked":false,"policy":"pull-push","paths":[],"when":"on_success","fallback_keys":[]}`},
		{"service", Image{Name: "postgres:15", Alias: "db", Variables: []Variable{{Key: "POSTGRES_DB", Value: "app"}}, PullPolicy: []string{"if-not-present"}},
			`{"name":"postgres:15","alias":"db","variables":[{"key":"POSTGRES_DB","value":"app","public":false,"file":false,"masked":false,"raw":false}],"pull_policy":["if-not-present"]}`},
		{"hook", Hook{Name: HookPreGetSourcesScript, Script: []string{"echo hi"}}, `{"name":"pre_get_sources_script","script":["echo hi"]}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := json.Marshal(tt.v)
			if err != nil {
				t.Fatal(err)
			}
			if string(b) != tt.want {
				t.Errorf("got  %s\nwant %s", b, tt.want)
			}
		})
	}
	b, err := json.Marshal(JobResponse{})
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(b, []byte(`"hooks"`)) || bytes.Contains(b, []byte(`repo_object_format`)) {
		t.Errorf("empty hooks or object format sent: %s", b)
	}
}
