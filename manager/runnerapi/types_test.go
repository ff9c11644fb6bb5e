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
