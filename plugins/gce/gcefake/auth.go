package gcefake

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"
)

// TokenPath is where the fake serves OAuth 2.0 tokens: the token_uri of
// the service-account key ServiceAccountKey writes.
const TokenPath = "/token"

// ServiceAccountEmail is the client_email of the fake's service account.
const ServiceAccountEmail = "mayfly-test@gcefake.iam.gserviceaccount.com"

// tokenLifetime is how long an access token the fake issues is valid, as
// Google's (expires_in 3600).
const tokenLifetime = time.Hour

var (
	keyOnce sync.Once
	saKey   *rsa.PrivateKey
	saErr   error
)

// serviceAccount returns the fake's service-account key, made once per
// process (every Server trusts it).
func serviceAccount() (*rsa.PrivateKey, error) {
	keyOnce.Do(func() { saKey, saErr = rsa.GenerateKey(rand.Reader, 2048) })
	return saKey, saErr
}

// ServiceAccountKey returns a service-account key file (the JSON the
// Google Cloud console downloads) whose token_uri is the TokenPath of the
// fake served at baseURL. Given to the gce plugin as credentials_file, it
// makes the SDK authenticate as in production: a JWT bearer grant signed
// with the key, then the access token on every API request.
func ServiceAccountKey(baseURL, project string) ([]byte, error) {
	key, err := serviceAccount()
	if err != nil {
		return nil, fmt.Errorf("service account key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("service account key: %w", err)
	}
	return json.Marshal(map[string]string{
		"type":           "service_account",
		"project_id":     project,
		"private_key_id": "gcefake-key-1",
		"private_key":    string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})),
		"client_email":   ServiceAccountEmail,
		"client_id":      "100000000000000000001",
		"token_uri":      strings.TrimSuffix(baseURL, "/") + TokenPath,
	})
}

// jwtClaims are the claims of a service-account JWT the fake reads.
type jwtClaims struct {
	Iss   string `json:"iss"`
	Aud   string `json:"aud"`
	Scope string `json:"scope"`
	Exp   int64  `json:"exp"`
	Iat   int64  `json:"iat"`
}

// verifyJWT checks a JWT signed (RS256) with the fake's service-account
// key and returns its claims.
func verifyJWT(token string) (jwtClaims, error) {
	var c jwtClaims
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return c, errors.New("not a JWT")
	}
	var head struct {
		Alg string `json:"alg"`
	}
	if err := decodeSegment(parts[0], &head); err != nil {
		return c, fmt.Errorf("JWT header: %w", err)
	}
	if head.Alg != "RS256" {
		return c, fmt.Errorf("JWT algorithm %q, want RS256", head.Alg)
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil {
		return c, fmt.Errorf("JWT signature: %w", err)
	}
	key, err := serviceAccount()
	if err != nil {
		return c, err
	}
	sum := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	if err := rsa.VerifyPKCS1v15(&key.PublicKey, crypto.SHA256, sum[:], sig); err != nil {
		return c, errors.New("JWT signature does not verify with the service account's key")
	}
	if err := decodeSegment(parts[1], &c); err != nil {
		return c, fmt.Errorf("JWT claims: %w", err)
	}
	if c.Iss != ServiceAccountEmail {
		return c, fmt.Errorf("JWT issuer %q is not the service account %s", c.Iss, ServiceAccountEmail)
	}
	if time.Now().Unix() > c.Exp {
		return c, errors.New("JWT has expired")
	}
	return c, nil
}

func decodeSegment(seg string, v any) error {
	b, err := base64.RawURLEncoding.DecodeString(seg)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// serveToken answers an OAuth 2.0 token request with the JWT bearer grant
// (RFC 7523) a service account makes.
func (s *Server) serveToken(w http.ResponseWriter, r *http.Request) {
	oauthError := func(code int, kind, desc string) {
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(code)
		_ = json.NewEncoder(w).Encode(map[string]string{"error": kind, "error_description": desc})
	}
	if r.Method != http.MethodPost {
		oauthError(http.StatusMethodNotAllowed, "invalid_request", "token requests are POSTs")
		return
	}
	if err := r.ParseForm(); err != nil {
		oauthError(http.StatusBadRequest, "invalid_request", err.Error())
		return
	}
	if gt := r.PostForm.Get("grant_type"); gt != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
		oauthError(http.StatusBadRequest, "unsupported_grant_type", fmt.Sprintf("grant_type %q", gt))
		return
	}
	claims, err := verifyJWT(r.PostForm.Get("assertion"))
	if err != nil {
		oauthError(http.StatusBadRequest, "invalid_grant", err.Error())
		return
	}
	if !strings.HasSuffix(claims.Aud, TokenPath) {
		oauthError(http.StatusBadRequest, "invalid_grant", fmt.Sprintf("JWT audience %q is not the token URI", claims.Aud))
		return
	}
	if !strings.Contains(claims.Scope, "compute") && !strings.Contains(claims.Scope, "cloud-platform") {
		oauthError(http.StatusBadRequest, "invalid_scope", fmt.Sprintf("scope %q grants no Compute Engine access", claims.Scope))
		return
	}
	b := make([]byte, 24)
	_, _ = rand.Read(b)
	token := "ya29.gcefake-" + hex.EncodeToString(b)
	s.mu.Lock()
	s.tokens[token] = time.Now().Add(tokenLifetime)
	s.tokenGrants++
	s.mu.Unlock()
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"access_token": token, "token_type": "Bearer", "expires_in": int(tokenLifetime / time.Second),
	})
}

// authenticate checks the request's bearer token: an access token the
// fake issued and that has not expired, or a JWT the service account
// signed itself (the self-signed JWT flow). It answers 401 as Compute
// Engine does and returns false otherwise.
func (s *Server) authenticate(w http.ResponseWriter, r *http.Request) bool {
	h := r.Header.Get("Authorization")
	token, ok := strings.CutPrefix(h, "Bearer ")
	if !ok || token == "" {
		writeAuthError(w, "required", "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential.")
		return false
	}
	s.mu.Lock()
	until, issued := s.tokens[token]
	s.mu.Unlock()
	switch {
	case issued && time.Now().Before(until):
		return true
	case !issued && strings.Count(token, ".") == 2:
		if _, err := verifyJWT(token); err == nil {
			return true
		}
	}
	writeAuthError(w, "authError", "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.")
	return false
}

// writeAuthError writes Compute Engine's 401 answer.
func writeAuthError(w http.ResponseWriter, reason, msg string) {
	var e apiError
	e.Error.Code = http.StatusUnauthorized
	e.Error.Message = msg
	e.Error.Status = "UNAUTHENTICATED"
	e.Error.Errors = []apiErrorRow{{Message: msg, Domain: "global", Reason: reason}}
	w.Header().Set("Content-Type", "application/json; charset=UTF-8")
	w.Header().Set("WWW-Authenticate", `Bearer realm="https://accounts.google.com/"`)
	w.WriteHeader(http.StatusUnauthorized)
	_ = json.NewEncoder(w).Encode(e)
}

// TokenGrants returns how many access tokens the fake has issued.
func (s *Server) TokenGrants() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.tokenGrants
}
