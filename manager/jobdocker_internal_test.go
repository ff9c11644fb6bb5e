package manager

import (
	"testing"

	"github.com/mayfly-ci/mayfly/manager/config"
)

// TestImageFeatures: info.features.image and services are true only for
// runners whose VMs run jobs in containers.
func TestImageFeatures(t *testing.T) {
	m := &Manager{}
	for _, tt := range []struct {
		rc   config.Runner
		want bool
	}{
		{config.Runner{Executor: "instance"}, false},
		{config.Runner{Executor: "docker+machine", Docker: &config.Docker{}}, true},
	} {
		f := m.versionInfo(tt.rc).Features
		if f.Image != tt.want || f.Services != tt.want {
			t.Errorf("%s: image %t services %t, want %t", tt.rc.Executor, f.Image, f.Services, tt.want)
		}
	}
}
