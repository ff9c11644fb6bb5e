package helper

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Bounds of the helper's network calls.
const (
	// defaultTimeout bounds one whole transfer (gitlab-runner's artifact
	// upload timeout is 1 h; a cache transfer is as long as the job).
	defaultTimeout = time.Hour
	// responseHeaderTimeout bounds waiting for a server to answer.
	responseHeaderTimeout = 10 * time.Minute
)

func newHTTPClient() *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.ResponseHeaderTimeout = responseHeaderTimeout
	tr.DialContext = (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	return &http.Client{
		Transport: tr,
		Timeout:   defaultTimeout,
		// Redirects are followed for downloads (GitLab sends object
		// storage's URL); the JOB-TOKEN header is not sent to another host.
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if len(via) >= 10 {
				return errors.New("stopped after 10 redirects")
			}
			if req.URL.Host != via[0].URL.Host {
				req.Header.Del("JOB-TOKEN")
			}
			return nil
		},
	}
}

// retryable marks an error worth another try.
type retryable struct{ err error }

func (r retryable) Error() string { return r.err.Error() }
func (r retryable) Unwrap() error { return r.err }

// cleanURL is u without its query (signatures) and credentials, for logs.
func cleanURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(invalid URL)"
	}
	u.RawQuery, u.User, u.Fragment = "", nil, ""
	return u.String()
}

// statusError describes a failed response, with a storage error's code
// and message (GCS, S3 and the local store answer in XML) or GitLab's
// JSON message when there is one.
func statusError(resp *http.Response) error {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 8<<10))
	msg := resp.Status
	var x struct {
		Code    string `xml:"Code"`
		Message string `xml:"Message"`
	}
	var j struct {
		Message any `json:"message"`
		Error   any `json:"error"`
	}
	switch {
	case xml.Unmarshal(body, &x) == nil && (x.Code != "" || x.Message != ""):
		msg += ": " + strings.TrimSpace(x.Code+" "+x.Message)
	case json.Unmarshal(body, &j) == nil && (j.Message != nil || j.Error != nil):
		msg += fmt.Sprintf(": %v", firstNonNil(j.Message, j.Error))
	}
	return fmt.Errorf("%s", msg)
}

func firstNonNil(a, b any) any {
	if a != nil {
		return a
	}
	return b
}

// isTransient reports whether a status is worth retrying.
func isTransient(code int) bool {
	return code >= 500 || code == http.StatusTooManyRequests || code == http.StatusRequestTimeout
}

// download GETs rawURL into a new temporary file in dir and returns it,
// rewound. headers are added to the request. A 404 (or a storage 403 for
// a missing object) is reported with found false and no error.
func download(ctx context.Context, client *http.Client, rawURL string, headers http.Header, dir string) (f *os.File, found bool, resp *http.Response, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		return nil, false, nil, err
	}
	for k, vs := range headers {
		req.Header[k] = vs
	}
	resp, err = client.Do(req)
	if err != nil {
		return nil, false, nil, retryable{err}
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return nil, false, resp, nil
	case resp.StatusCode != http.StatusOK:
		err := statusError(resp)
		if isTransient(resp.StatusCode) {
			err = retryable{err}
		}
		return nil, false, resp, err
	}
	tmp, err := os.CreateTemp(dir, "download-*.tmp")
	if err != nil {
		return nil, false, resp, err
	}
	if _, err := io.Copy(tmp, resp.Body); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return nil, false, resp, retryable{fmt.Errorf("read body: %w", err)}
	}
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return nil, false, resp, err
	}
	return tmp, true, resp, nil
}

// tempDir is where downloads wait to be extracted: $RUNNER_TEMP_PROJECT_DIR
// (the project's .tmp directory) when set, else the system's.
func tempDir(env Env) string {
	if d := env("RUNNER_TEMP_PROJECT_DIR"); d != "" {
		if err := os.MkdirAll(d, 0o700); err == nil {
			return d
		}
	}
	return os.TempDir()
}

// removeTemp closes and deletes a temporary file.
func removeTemp(f *os.File) {
	if f != nil {
		f.Close()
		os.Remove(f.Name())
	}
}

// absWD is the working directory, the project directory.
func absWD() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("working directory: %w", err)
	}
	return filepath.Abs(wd)
}
