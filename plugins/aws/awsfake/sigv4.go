package awsfake

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
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

// verify signs again, with the SDK's own SigV4 signer and secret, the parts
// of r the client signed (its method, URL, the signed headers and body),
// at the time the client signed it, and compares the signatures.
func (s sigV4) verify(r *http.Request, body []byte, secret string) error {
	amzDate := r.Header.Get("X-Amz-Date")
	at, err := time.Parse("20060102T150405Z", amzDate)
	if err != nil {
		return fmt.Errorf("X-Amz-Date %q: %w", amzDate, err)
	}
	if at.Format("20060102") != s.Date {
		return fmt.Errorf("X-Amz-Date %s does not match the credential date %s", amzDate, s.Date)
	}
	again, err := http.NewRequest(r.Method, r.URL.String(), nil)
	if err != nil {
		return fmt.Errorf("copy the request: %w", err)
	}
	again.Host = r.Host
	for _, h := range s.SignedHeaders {
		switch h {
		case "host":
		case "content-length":
			again.ContentLength = r.ContentLength
		default:
			again.Header[http.CanonicalHeaderKey(h)] = r.Header.Values(h)
		}
	}
	payload := r.Header.Get("X-Amz-Content-Sha256")
	if payload == "" {
		sum := sha256.Sum256(body)
		payload = hex.EncodeToString(sum[:])
	}
	creds := aws.Credentials{AccessKeyID: s.AccessKeyID, SecretAccessKey: secret, SessionToken: r.Header.Get("X-Amz-Security-Token")}
	if err := v4.NewSigner().SignHTTP(context.Background(), creds, again, payload, s.Service, s.Region, at); err != nil {
		return fmt.Errorf("sign the request again: %w", err)
	}
	want, err := parseSigV4(again.Header.Get("Authorization"))
	if err != nil {
		return fmt.Errorf("the signer's own header: %w", err)
	}
	if !slices.Equal(want.SignedHeaders, s.SignedHeaders) {
		return fmt.Errorf("signed headers %s, the request carries %s", strings.Join(s.SignedHeaders, ";"), strings.Join(want.SignedHeaders, ";"))
	}
	if !hmac.Equal([]byte(want.Signature), []byte(s.Signature)) {
		return errors.New("signature does not match")
	}
	return nil
}
