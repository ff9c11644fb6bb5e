package registry

import (
	"crypto/rand"
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"time"
)

// token is an issued Bearer token: the access it was granted.
type token struct {
	expires time.Time
	access  map[string][]string // repository → actions
	admin   bool
}

func (t *token) Can(name, action string) bool { return slices.Contains(t.access[name], action) }
func (t *token) Admin() bool                  { return t.admin }

// authenticate finds what a request may do: a Bearer token issued by the
// realm, HTTP basic credentials checked directly, or anonymous. nil: refused.
func (r *Registry) authenticate(req *http.Request) Grant {
	if h := req.Header.Get("Authorization"); strings.HasPrefix(h, "Bearer ") {
		r.mu.Lock()
		defer r.mu.Unlock()
		t := r.tokens[strings.TrimPrefix(h, "Bearer ")]
		if t == nil || r.cfg.Now().After(t.expires) {
			return nil
		}
		return t
	}
	user, pass, _ := req.BasicAuth()
	g, ok := r.cfg.Auth(user, pass)
	if !ok {
		return nil
	}
	return g
}

// scope is one requested scope, "repository:<name>:<actions>".
type scope struct {
	typ, name string
	actions   []string
}

func parseScopes(values []string) []scope {
	var out []scope
	for _, v := range values {
		for _, s := range strings.Fields(v) {
			typ, rest, ok := strings.Cut(s, ":")
			i := strings.LastIndex(rest, ":")
			if !ok || i <= 0 {
				continue
			}
			out = append(out, scope{typ: typ, name: rest[:i], actions: strings.Split(rest[i+1:], ",")})
		}
	}
	return out
}

// serveToken is the token realm (GET /jwt/auth?service=…&scope=…), as
// Docker's token authentication specifies it: HTTP basic credentials in,
// a Bearer token holding the granted subset of the requested scopes out.
func (r *Registry) serveToken(w http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodGet && req.Method != http.MethodPost {
		w.Header().Set("Allow", "GET, POST")
		writeError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "GET or POST")
		return
	}
	user, pass, hasAuth := req.BasicAuth()
	g, ok := r.cfg.Auth(user, pass)
	if !ok || g == nil {
		if hasAuth {
			r.log.Info("registry login refused", "user", user)
		}
		w.Header().Set("WWW-Authenticate", `Basic realm="GitLab"`)
		writeError(w, http.StatusUnauthorized, "UNAUTHORIZED", "HTTP Basic: Access denied")
		return
	}
	t := &token{expires: r.cfg.Now().Add(tokenLifetime), access: map[string][]string{}}
	for _, sc := range parseScopes(req.URL.Query()["scope"]) {
		switch {
		case sc.typ == "registry" && sc.name == "catalog":
			t.admin = g.Admin()
		case sc.typ == "repository" && nameRE.MatchString(sc.name):
			for _, a := range sc.actions {
				want := []string{a}
				if a == "*" {
					want = []string{ActionPull, ActionPush, ActionDelete}
				}
				for _, x := range want {
					if g.Can(sc.name, x) && !slices.Contains(t.access[sc.name], x) {
						t.access[sc.name] = append(t.access[sc.name], x)
					}
				}
			}
		}
	}
	id := rand.Text() + rand.Text()
	now := r.cfg.Now()
	r.mu.Lock()
	if len(r.tokens) >= maxTokens {
		for k, old := range r.tokens {
			if now.After(old.expires) {
				delete(r.tokens, k)
			}
		}
	}
	full := len(r.tokens) >= maxTokens
	if !full {
		r.tokens[id] = t
	}
	r.mu.Unlock()
	if full {
		writeError(w, http.StatusServiceUnavailable, "UNAVAILABLE", "too many registry tokens; retry later")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"token": id, "access_token": id, "expires_in": int(tokenLifetime / time.Second), "issued_at": now.UTC().Format(time.RFC3339),
	})
}
