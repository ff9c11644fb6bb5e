package config

import (
	"os"
	"testing"
)

func BenchmarkParseHosted(b *testing.B) {
	data, err := os.ReadFile("../../testdata/hosted-gcp-linux.toml")
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Parse("hosted.toml", data); err != nil {
			b.Fatal(err)
		}
	}
}
