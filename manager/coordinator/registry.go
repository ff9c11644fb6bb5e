package coordinator

import (
	"fmt"
	"net/http"
	"path/filepath"
	"strings"

	"github.com/mayfly-ci/mayfly/manager/coordinator/registry"
)

// RegistryConfig configures the coordinator's container registry.
type RegistryConfig struct {
	// MaxBytes bounds the registry's blobs on disk (StateDir/registry).
	// 0: registry.DefaultMaxBytes (10 GiB).
	MaxBytes int64
	// AnonymousPull lets requests without credentials pull (as for a public
	// GitLab project); they can never push.
	AnonymousPull bool
}

func (s *Server) openRegistry() error {
	if s.cfg.StateDir == "" {
		return &FieldError{Source: "config", Field: "StateDir", Msg: "is needed by the registry"}
	}
	reg, err := registry.New(registry.Config{
		Dir:      filepath.Join(s.cfg.StateDir, "registry"),
		MaxBytes: s.cfg.Registry.MaxBytes,
		Auth:     s.registryAuth,
		Realm:    func(r *http.Request) string { return s.baseURL(r) + registry.TokenPath },
		Log:      s.log,
		Now:      s.now,
	})
	if err != nil {
		return fmt.Errorf("coordinator registry: %w", err)
	}
	s.registry = reg
	return nil
}

// registryGrant is what a credential may do in the registry.
type registryGrant struct {
	admin    bool
	pullOnly bool
	project  string // a job's project path, lowercase: it pushes there
}

func (g registryGrant) Can(repo, action string) bool {
	switch {
	case g.admin:
		return true
	case action == registry.ActionPull:
		return true
	case g.pullOnly || action != registry.ActionPush:
		return false
	}
	return repo == g.project || strings.HasPrefix(repo, g.project+"/")
}

func (g registryGrant) Admin() bool { return g.admin }

// registryAuth checks registry credentials as GitLab does: gitlab-ci-token
// with the token of a running job pulls every image and pushes to its own
// project's repositories (CI_REGISTRY_IMAGE and below); the push token (or
// admin token), with any user name, does anything; without credentials,
// pulls only with AnonymousPull.
func (s *Server) registryAuth(user, password string) (registry.Grant, bool) {
	if user == "" && password == "" {
		if s.cfg.Registry.AnonymousPull {
			return registryGrant{pullOnly: true}, true
		}
		return nil, true
	}
	if s.adminCredential(password) {
		return registryGrant{admin: true}, true
	}
	if user != "gitlab-ci-token" {
		return nil, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	j := s.jobsByToken[password]
	if j == nil || !j.processing() {
		return nil, false
	}
	return registryGrant{project: strings.ToLower(j.pipeline.project.fullPath())}, true
}
