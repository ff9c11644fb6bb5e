package awsfake

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"
)

// sigV4 is a parsed AWS Signature Version 4 Authorization header.
type sigV4 struct {
	AccessKeyID   string
	Date          string // yyyymmdd of the credential scope
	Region        string
	Service       string
	SignedHeaders []string
	Signature     string
}

const sigV4Algorithm = "AWS4-HMAC-SHA256"

// parseSigV4 parses an Authorization header of the form
//
//	AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/ec2/aws4_request, SignedHeaders=host;x-amz-date, Signature=hex
func parseSigV4(header string) (sigV4, error) {
	var s sigV4
	rest, ok := strings.CutPrefix(header, sigV4Algorithm+" ")
	if !ok {
		return s, fmt.Errorf("authorization header does not start with %s", sigV4Algorithm)
	}
	fields := map[string]string{}
	for part := range strings.SplitSeq(rest, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return s, fmt.Errorf("authorization header component %q is not key=value", part)
		}
		fields[k] = v
	}
	cred := strings.Split(fields["Credential"], "/")
	if len(cred) != 5 || cred[4] != "aws4_request" || cred[0] == "" {
		return s, fmt.Errorf("authorization header credential %q is not AKID/date/region/service/aws4_request", fields["Credential"])
	}
	s.AccessKeyID, s.Date, s.Region, s.Service = cred[0], cred[1], cred[2], cred[3]
	if fields["SignedHeaders"] == "" {
		return s, errors.New("authorization header has no SignedHeaders")
	}
	s.SignedHeaders = strings.Split(fields["SignedHeaders"], ";")
	if !slices.Contains(s.SignedHeaders, "host") {
		return s, errors.New("authorization header does not sign the host header")
	}
	s.Signature = fields["Signature"]
	if len(s.Signature) != 64 {
		return s, fmt.Errorf("authorization header signature %q is not 64 hex digits", s.Signature)
	}
	if _, err := hex.DecodeString(s.Signature); err != nil {
		return s, fmt.Errorf("authorization header signature: %w", err)
	}
	return s, nil
}

// verify recomputes the signature of r (whose body is body) with secret and
// compares it with the one in the header.
func (s sigV4) verify(r *http.Request, body []byte, secret string) error {
	amzDate := r.Header.Get("X-Amz-Date")
	t, err := time.Parse("20060102T150405Z", amzDate)
	if err != nil {
		return fmt.Errorf("X-Amz-Date %q: %w", amzDate, err)
	}
	if t.Format("20060102") != s.Date {
		return fmt.Errorf("X-Amz-Date %s does not match the credential date %s", amzDate, s.Date)
	}
	var canon strings.Builder
	canon.WriteString(r.Method + "\n")
	uri := r.URL.EscapedPath()
	if uri == "" {
		uri = "/"
	}
	canon.WriteString(uri + "\n")
	canon.WriteString(canonicalQuery(r) + "\n")
	for _, h := range s.SignedHeaders {
		var v string
		if h == "host" {
			v = r.Host
		} else {
			vals := r.Header.Values(h)
			for i := range vals {
				vals[i] = strings.Join(strings.Fields(vals[i]), " ")
			}
			v = strings.Join(vals, ",")
		}
		canon.WriteString(h + ":" + v + "\n")
	}
	canon.WriteString("\n" + strings.Join(s.SignedHeaders, ";") + "\n")
	payload := sha256.Sum256(body)
	canon.WriteString(hex.EncodeToString(payload[:]))

	scope := strings.Join([]string{s.Date, s.Region, s.Service, "aws4_request"}, "/")
	canonHash := sha256.Sum256([]byte(canon.String()))
	toSign := sigV4Algorithm + "\n" + amzDate + "\n" + scope + "\n" + hex.EncodeToString(canonHash[:])

	key := hmacSHA256([]byte("AWS4"+secret), s.Date)
	key = hmacSHA256(key, s.Region)
	key = hmacSHA256(key, s.Service)
	key = hmacSHA256(key, "aws4_request")
	want := hex.EncodeToString(hmacSHA256(key, toSign))
	if !hmac.Equal([]byte(want), []byte(s.Signature)) {
		return errors.New("signature does not match")
	}
	return nil
}

func canonicalQuery(r *http.Request) string {
	q := r.URL.Query()
	keys := make([]string, 0, len(q))
	for k := range q {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var parts []string
	for _, k := range keys {
		vals := slices.Clone(q[k])
		slices.Sort(vals)
		for _, v := range vals {
			parts = append(parts, awsEscape(k)+"="+awsEscape(v))
		}
	}
	return strings.Join(parts, "&")
}

// awsEscape percent-encodes s as SigV4 requires (RFC 3986 unreserved
// characters are kept).
func awsEscape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.' || c == '~' {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

func hmacSHA256(key []byte, data string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(data))
	return m.Sum(nil)
}
