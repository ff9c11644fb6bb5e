package coordinator

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"testing"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// BenchmarkJobRequest measures POST /api/v4/jobs/request through the handler
// (decode, queue pick, assignment, payload, encode) with 10 000 queued jobs
// in 100 projects. Every 1000 handed-out jobs, untimed, they are finished and
// as many new ones queued, so 9 000 to 10 000 jobs are always waiting.
func BenchmarkJobRequest(b *testing.B) {
	cases := []struct {
		name  string
		token func(s *Server) string // registration token
		tags  string
		hit   bool
	}{
		{"instance-fair-usage", func(s *Server) string { return s.RegistrationToken() }, "", true},
		{"group-fifo", func(s *Server) string { return s.groupsByPath["bench"].regToken }, "", true},
		{"no-matching-job-204", func(s *Server) string { return s.RegistrationToken() }, "gpu", false},
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			s, err := New(Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if err != nil {
				b.Fatal(err)
			}
			if _, err := s.CreateGroup(GroupSpec{Path: "bench"}); err != nil {
				b.Fatal(err)
			}
			for p := 0; p < 100; p++ {
				var js []JobSpec
				for k := 0; k < 100; k++ {
					js = append(js, JobSpec{Name: fmt.Sprintf("job-%d", k), Script: []string{"make test"}, Variables: []VariableSpec{{Key: "A", Value: "b"}}})
				}
				_, err := s.CreateProject(ProjectSpec{Name: fmt.Sprintf("p%d", p), Group: "bench", Pipelines: []PipelineSpec{{Jobs: js}}})
				if err != nil {
					b.Fatal(err)
				}
			}
			rn, err := s.RegisterRunner(RunnerOptions{RegistrationToken: tc.token(s), Tags: []string{tc.tags}, RunUntagged: tc.tags == ""})
			if err != nil {
				b.Fatal(err)
			}
			body, _ := json.Marshal(runnerapi.JobRequest{Token: rn.Token, Info: runnerapi.VersionInfo{Name: "gitlab-runner", Executor: "shell"}})
			b.ReportAllocs()
			b.ResetTimer()
			var handed []int64
			for i := 0; i < b.N; i++ {
				req := httptest.NewRequest("POST", "/api/v4/jobs/request", bytes.NewReader(body))
				req.Header.Set("Content-Type", "application/json")
				w := httptest.NewRecorder()
				s.ServeHTTP(w, req)
				want := 204
				if tc.hit {
					want = 201
				}
				if w.Code != want {
					b.Fatalf("status %d, want %d", w.Code, want)
				}
				if !tc.hit {
					continue
				}
				var j struct {
					ID int64 `json:"id"`
				}
				if err := json.Unmarshal(w.Body.Bytes(), &j); err != nil {
					b.Fatal(err)
				}
				if handed = append(handed, j.ID); len(handed) == 1000 {
					b.StopTimer()
					refill(b, s, handed)
					handed = handed[:0]
					b.StartTimer()
				}
			}
		})
	}
}

// refill finishes the handed-out jobs and queues as many new ones in their projects.
func refill(b *testing.B, s *Server, ids []int64) {
	for _, id := range ids {
		s.mu.Lock()
		j := s.jobs[id]
		s.finish(j, StatusSuccess)
		pid := j.pipeline.project.id
		s.mu.Unlock()
		if _, err := s.EnqueuePipeline(pid, PipelineSpec{Jobs: []JobSpec{{Name: "again", Script: []string{"x"}}}}); err != nil {
			b.Fatal(err)
		}
	}
}
