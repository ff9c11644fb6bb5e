package gitlabci

import (
	"fmt"
	"strings"
	"testing"
)

// BenchmarkParseManyJobs parses a file of 5000 jobs that extend a hidden
// job: the loader must stay linear in the number of jobs.
func BenchmarkParseManyJobs(b *testing.B) {
	var sb strings.Builder
	sb.WriteString(".base: {tags: [linux], variables: {A: b}}\n")
	for i := 0; i < 5000; i++ {
		fmt.Fprintf(&sb, "job%d: {extends: .base, script: [make %d]}\n", i, i)
	}
	data := []byte(sb.String())
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, err := Parse("many.yml", data, Options{}); err != nil {
			b.Fatal(err)
		}
	}
}
