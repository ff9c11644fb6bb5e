package containerrun

import (
	"slices"
	"testing"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

func TestServiceAliases(t *testing.T) {
	for _, tt := range []struct {
		name, alias string
		want        []string
	}{
		{"postgres:14", "", []string{"postgres"}},
		{"postgres", "db", []string{"postgres", "db"}},
		{"tutum/wordpress:latest", "", []string{"tutum__wordpress", "tutum-wordpress"}},
		{"registry.example.com:5000/group/redis:7@sha256:" + sha, "cache, kv", []string{"registry.example.com__group__redis", "registry.example.com-group-redis", "cache", "kv"}},
		{"10.0.2.2:8929/mayfly/redis:bookworm", "db", []string{"10.0.2.2__mayfly__redis", "10.0.2.2-mayfly-redis", "db"}},
	} {
		if got := serviceAliases(runnerapi.Image{Name: tt.name, Alias: tt.alias}); !slices.Equal(got, tt.want) {
			t.Errorf("aliases of %s (alias %q) = %q, want %q", tt.name, tt.alias, got, tt.want)
		}
	}
}

const sha = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func TestReferences(t *testing.T) {
	for _, tt := range []struct{ ref, host, tagged string }{
		{"debian", "", "debian:latest"},
		{"debian:bookworm", "", "debian:bookworm"},
		{"library/debian", "", "library/debian:latest"},
		{"10.0.2.2:8929/mayfly/debian:bookworm", "10.0.2.2:8929", "10.0.2.2:8929/mayfly/debian:bookworm"},
		{"localhost/x", "localhost", "localhost/x:latest"},
		{"registry.example.com/x@sha256:" + sha, "registry.example.com", "registry.example.com/x@sha256:" + sha},
	} {
		if h := registryHost(tt.ref); h != tt.host {
			t.Errorf("registryHost(%s) = %q, want %q", tt.ref, h, tt.host)
		}
		if r := withTag(tt.ref); r != tt.tagged {
			t.Errorf("withTag(%s) = %q, want %q", tt.ref, r, tt.tagged)
		}
	}
}

func TestClassifyPullFailure(t *testing.T) {
	for msg, want := range map[string]string{
		"Get http://10.0.2.2:8929/v2/: dial tcp 10.0.2.2:8929: connect: connection refused": runnerapi.FailureRunnerSystemFailure,
		"manifest unknown: manifest unknown":                                                runnerapi.FailureRunnerConfigurationError,
		"unauthorized: authentication required":                                             runnerapi.FailureRunnerConfigurationError,
		"failed to register layer: no space left on device":                                 runnerapi.FailureImagePullFailure,
	} {
		if got := classifyPullFailure(errorString(msg)); got != want {
			t.Errorf("%q: %s, want %s", msg, got, want)
		}
	}
}

type errorString string

func (e errorString) Error() string { return string(e) }
