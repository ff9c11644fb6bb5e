// Package gitlab is the client side of the GitLab runner API: registering and
// verifying runners, asking for jobs, and reporting a job's trace and final
// state, as gitlab-runner v14.10 does it (see shared/protocol/runner-api.md).
//
// A Client talks to one GitLab URL and may serve several runner tokens. Every
// call takes a context; 4xx/5xx answers slow the next call down with an
// exponential backoff kept per client, endpoint and runner; 429 answers that
// carry RateLimit-ResetTime are waited out and retried a bounded number of
// times. JobTrace builds the periodic trace upload, cancellation detection,
// heartbeat and final update of one job on top of PatchTrace and UpdateJob.
package gitlab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"mime"
	"net/http"
	"net/url"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// Defaults of a Client.
const (
	// DefaultResponseHeaderTimeout bounds the wait for response headers; long
	// polling of jobs/request must answer well inside it (as the official runner).
	DefaultResponseHeaderTimeout = 10 * time.Minute
	// DefaultHTTPTimeout bounds a whole HTTP exchange (as the official runner).
	DefaultHTTPTimeout = 60 * time.Minute
	// DefaultCallTimeout bounds each attempt of every call except RequestJob.
	DefaultCallTimeout = time.Minute
	// MaxRateLimitRetries is how often a 429 with RateLimit-ResetTime is retried.
	MaxRateLimitRetries = 5
	// DefaultMaxRateLimitWait caps one wait for RateLimit-ResetTime.
	DefaultMaxRateLimitWait = 5 * time.Minute
	// MaxTraceChunk is the largest body PatchTrace sends.
	MaxTraceChunk = 1 << 20
	// maxUpdateInterval caps X-GitLab-Trace-Update-Interval.
	maxUpdateInterval = 15 * time.Minute
	// maxResponseBody caps how much of a response is read (job payloads included).
	maxResponseBody = 32 << 20
)

// Endpoint names used as the "endpoint" metric label.
const (
	EndpointRegisterRunner   = "register_runner"
	EndpointVerifyRunner     = "verify_runner"
	EndpointUnregisterRunner = "unregister_runner"
	EndpointRequestJob       = "request_job"
	EndpointUpdateJob        = "update_job"
	EndpointPatchTrace       = "patch_trace"
)

// ErrForbidden is wrapped by errors of calls GitLab answered with 403.
var ErrForbidden = errors.New("forbidden")

// Clock supplies the current time and waits; tests inject a fake so that
// backoffs, rate-limit waits and final-update retries take no real time.
type Clock interface {
	Now() time.Time
	// Sleep waits d or until ctx is done, whichever comes first, and returns ctx.Err() in the latter case.
	Sleep(ctx context.Context, d time.Duration) error
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

func (realClock) Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Config configures a Client. Only URL is required.
type Config struct {
	// URL is the GitLab URL as written in config.toml ("https://gitlab.com/").
	URL string
	// Version and Branch are mayfly's, shown in the User-Agent.
	Version string
	Branch  string
	// Info is sent as "info" with job requests and job updates (registration
	// sends a reduced copy, see Register).
	Info runnerapi.VersionInfo
	// HTTPClient replaces the default client (for custom TLS); its timeouts are the caller's.
	HTTPClient *http.Client
	// CallTimeout bounds each attempt of every call except RequestJob; 0 means DefaultCallTimeout.
	CallTimeout time.Duration
	// Backoff is applied after 4xx/5xx answers; zero fields take the official runner's values.
	Backoff Backoff
	// MaxRateLimitWait caps one wait for RateLimit-ResetTime; 0 means DefaultMaxRateLimitWait.
	MaxRateLimitWait time.Duration
	// Registerer receives the client's metrics; nil registers none.
	Registerer prometheus.Registerer
	// Logger receives the client's logs; nil means slog.Default().
	Logger *slog.Logger
	// Clock supplies time and sleeping; nil means the real clock.
	Clock Clock
}

// Client calls the runner API of one GitLab instance. It is safe for concurrent use.
type Client struct {
	baseURL     string // ends with "/api/v4/"
	http        *http.Client
	userAgent   string
	info        runnerapi.VersionInfo
	callTimeout time.Duration
	maxRLWait   time.Duration
	backoff     Backoff
	log         *slog.Logger
	clock       Clock
	metrics     *metrics

	mu         sync.Mutex
	lastUpdate map[string]string // runner token -> X-GitLab-Last-Update
	failures   map[string]*backoffState
	jobRunner  map[int64]string // job id -> runner metric label
}

// New returns a Client for cfg.URL.
func New(cfg Config) (*Client, error) {
	base, err := NormalizeURL(cfg.URL)
	if err != nil {
		return nil, err
	}
	c := &Client{
		baseURL:     base,
		http:        cfg.HTTPClient,
		userAgent:   UserAgent(cfg.Version, cfg.Branch),
		info:        cfg.Info,
		callTimeout: cfg.CallTimeout,
		maxRLWait:   cfg.MaxRateLimitWait,
		backoff:     cfg.Backoff.withDefaults(),
		log:         cfg.Logger,
		clock:       cfg.Clock,
		lastUpdate:  map[string]string{},
		failures:    map[string]*backoffState{},
		jobRunner:   map[int64]string{},
	}
	if c.http == nil {
		c.http = defaultHTTPClient()
	}
	if c.callTimeout <= 0 {
		c.callTimeout = DefaultCallTimeout
	}
	if c.maxRLWait <= 0 {
		c.maxRLWait = DefaultMaxRateLimitWait
	}
	if c.log == nil {
		c.log = slog.Default()
	}
	c.log = c.log.With("gitlab_url", base)
	if c.clock == nil {
		c.clock = realClock{}
	}
	if c.metrics, err = newMetrics(cfg.Registerer); err != nil {
		return nil, err
	}
	return c, nil
}

// BaseURL returns the normalised API base URL, ending in "/api/v4/".
func (c *Client) BaseURL() string { return c.baseURL }

// CloseIdleConnections closes idle keep-alive connections of the HTTP client.
func (c *Client) CloseIdleConnections() { c.http.CloseIdleConnections() }

// NormalizeURL turns a config.toml url into the API base URL the way the
// official runner does: trailing "/" and "/ci" removed, "/api/v4/" appended.
// Only http and https URLs with a host are accepted.
func NormalizeURL(raw string) (string, error) {
	if strings.TrimSpace(raw) == "" {
		return "", errors.New("gitlab url: empty")
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("gitlab url %q: %w", raw, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return "", fmt.Errorf("gitlab url %q: scheme must be http or https, got %q", raw, u.Scheme)
	}
	if u.Host == "" {
		return "", fmt.Errorf("gitlab url %q: no host", raw)
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return "", fmt.Errorf("gitlab url %q: must not have a query or fragment", raw)
	}
	p := strings.TrimRight(u.Path, "/")
	p = strings.TrimSuffix(p, "/ci")
	u.Path = p + "/api/v4/"
	u.RawPath = ""
	return u.String(), nil
}

// UserAgent returns the User-Agent mayfly sends, in gitlab-runner's form:
// "mayfly <version> (<branch>; <go version>; <os>/<arch>)".
func UserAgent(version, branch string) string {
	if version == "" {
		version = "development version"
	}
	if branch == "" {
		branch = "HEAD"
	}
	return fmt.Sprintf("mayfly %s (%s; %s; %s/%s)", version, branch, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

func defaultHTTPClient() *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.ResponseHeaderTimeout = DefaultResponseHeaderTimeout
	tr.TLSHandshakeTimeout = 30 * time.Second
	tr.MaxIdleConnsPerHost = 16
	return &http.Client{Transport: tr, Timeout: DefaultHTTPTimeout}
}

// ShortToken returns the part of a token that may appear in logs and metric
// labels: its first 8 characters, or half of it when it is 8 or shorter.
func ShortToken(token string) string {
	if len(token) > 8 {
		return token[:8]
	}
	return token[:len(token)/2]
}

// call describes one API call.
type call struct {
	endpoint    string
	method      string
	path        string // relative to baseURL
	runner      string // metric label
	backoffKey  string
	body        []byte
	contentType string
	accept      bool
	jobToken    string // Job-Token header
	extra       http.Header
	// lastUpdateToken, when set, records X-GitLab-Last-Update for that runner token.
	lastUpdateToken string
	// noCallTimeout leaves the attempt bounded by ctx and the HTTP client only (long polling).
	noCallTimeout bool
}

// response is what a call returns: the final attempt's status, headers and body.
type response struct {
	status int
	header http.Header
	body   []byte
}

// do performs c with rate-limit retries and the 4xx/5xx backoff.
func (c *Client) do(ctx context.Context, cl call) (*response, error) {
	for attempt := 0; ; attempt++ {
		resp, err := c.attempt(ctx, cl)
		if err != nil {
			return nil, err
		}
		if cl.lastUpdateToken != "" {
			if lu := resp.header.Get(runnerapi.HeaderLastUpdate); lu != "" {
				c.mu.Lock()
				c.lastUpdate[cl.lastUpdateToken] = lu
				c.mu.Unlock()
			}
		}
		if resp.status == http.StatusTooManyRequests && attempt < MaxRateLimitRetries {
			if reset, ok := parseResetTime(resp.header); ok {
				wait := min(max(reset.Sub(c.clock.Now()), 0), c.maxRLWait)
				c.log.Warn("rate limited, waiting for reset",
					"endpoint", cl.endpoint, "runner", cl.runner, "wait", wait, "attempt", attempt+1)
				if err := c.clock.Sleep(ctx, wait); err != nil {
					return nil, fmt.Errorf("%s: wait for rate limit reset: %w", cl.endpoint, err)
				}
				continue
			}
		}
		c.applyBackoff(ctx, cl, resp.status)
		return resp, nil
	}
}

// attempt sends one HTTP request and reads the whole response.
func (c *Client) attempt(ctx context.Context, cl call) (*response, error) {
	if !cl.noCallTimeout {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.callTimeout)
		defer cancel()
	}
	var body io.Reader
	if cl.body != nil {
		body = bytes.NewReader(cl.body)
	}
	req, err := http.NewRequestWithContext(ctx, cl.method, c.baseURL+cl.path, body)
	if err != nil {
		return nil, fmt.Errorf("%s: build request: %w", cl.endpoint, err)
	}
	req.Header.Set("User-Agent", c.userAgent)
	if cl.contentType != "" {
		req.Header.Set("Content-Type", cl.contentType)
	}
	if cl.accept {
		req.Header.Set("Accept", "application/json")
	}
	if cl.jobToken != "" {
		req.Header.Set(runnerapi.HeaderJobToken, cl.jobToken)
	}
	for k, v := range cl.extra {
		req.Header[k] = v
	}
	start := time.Now()
	res, err := c.http.Do(req)
	if err != nil {
		c.metrics.observe(cl.runner, cl.endpoint, "error", time.Since(start))
		return nil, fmt.Errorf("%s %s: %w", cl.method, req.URL.Redacted(), err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(io.LimitReader(res.Body, maxResponseBody+1))
	c.metrics.observe(cl.runner, cl.endpoint, strconv.Itoa(res.StatusCode), time.Since(start))
	if err != nil {
		return nil, fmt.Errorf("%s %s: read response (status %d): %w", cl.method, req.URL.Redacted(), res.StatusCode, err)
	}
	if len(b) > maxResponseBody {
		return nil, fmt.Errorf("%s %s: response body larger than %d bytes", cl.method, req.URL.Redacted(), maxResponseBody)
	}
	return &response{status: res.StatusCode, header: res.Header, body: b}, nil
}

// applyBackoff sleeps after a 4xx/5xx answer and resets the backoff otherwise.
func (c *Client) applyBackoff(ctx context.Context, cl call, status int) {
	if status < 400 || status >= 600 {
		c.mu.Lock()
		delete(c.failures, cl.backoffKey)
		c.mu.Unlock()
		return
	}
	now := c.clock.Now()
	c.mu.Lock()
	st := c.failures[cl.backoffKey]
	if st == nil {
		c.pruneFailuresLocked(now)
		st = &backoffState{}
		c.failures[cl.backoffKey] = st
	}
	st.failures++
	st.last = now
	d := c.backoff.delay(st.failures, rand.Float64)
	c.mu.Unlock()
	c.log.Debug("backing off after error status",
		"endpoint", cl.endpoint, "runner", cl.runner, "status", status, "delay", d)
	// A cancelled ctx ends the wait; the answer is still returned to the caller.
	_ = c.clock.Sleep(ctx, d)
}

// pruneFailuresLocked drops backoff states that have been quiet for long.
func (c *Client) pruneFailuresLocked(now time.Time) {
	if len(c.failures) < 256 {
		return
	}
	for k, st := range c.failures {
		if now.Sub(st.last) > 2*c.backoff.Max {
			delete(c.failures, k)
		}
	}
}

// failureCount reports how many consecutive 4xx/5xx answers key has seen.
func (c *Client) failureCount(key string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if st := c.failures[key]; st != nil {
		return st.failures
	}
	return 0
}

// runnerOfJob returns the metric label of the runner that received job id.
func (c *Client) runnerOfJob(id int64) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if r, ok := c.jobRunner[id]; ok {
		return r
	}
	return "unknown"
}

// rememberJob records which runner received job id, for metric labels.
func (c *Client) rememberJob(id int64, runner string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.jobRunner) >= 4096 { // jobs nobody finished through a JobTrace
		clear(c.jobRunner)
	}
	c.jobRunner[id] = runner
}

// ForgetJob drops what the client remembers about job id (metric label,
// backoff state). JobTrace.Finish calls it; callers using UpdateJob directly
// call it once the job is over.
func (c *Client) ForgetJob(id int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.jobRunner, id)
	delete(c.failures, jobBackoffKey(http.MethodPut, id))
	delete(c.failures, jobBackoffKey(http.MethodPatch, id))
}

func jobBackoffKey(method string, id int64) string {
	return fmt.Sprintf("%s jobs/%d", method, id)
}

func runnerBackoffKey(method, path, token string) string {
	return method + " " + path + " " + token
}

// LastUpdate returns the X-GitLab-Last-Update value remembered for token.
func (c *Client) LastUpdate(token string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastUpdate[token]
}

// isJSON reports whether the response's media type is application/json.
func isJSON(h http.Header) bool {
	mt, _, err := mime.ParseMediaType(h.Get("Content-Type"))
	return err == nil && mt == "application/json"
}

// parseResetTime reads RateLimit-ResetTime (an RFC 1123 date).
func parseResetTime(h http.Header) (time.Time, bool) {
	v := h.Get(runnerapi.HeaderRateLimitResetTime)
	if v == "" {
		return time.Time{}, false
	}
	t, err := time.Parse(time.RFC1123, v)
	if err != nil {
		return time.Time{}, false
	}
	return t, true
}

// parseRetryAfter reads Retry-After in seconds (dates are not used by GitLab).
func parseRetryAfter(h http.Header) time.Duration {
	n, err := strconv.Atoi(strings.TrimSpace(h.Get("Retry-After")))
	if err != nil || n <= 0 {
		return 0
	}
	return time.Duration(n) * time.Second
}

// parseUpdateInterval reads X-GitLab-Trace-Update-Interval: 0 when absent,
// not a positive integer, or otherwise unusable; capped at 15 minutes.
func parseUpdateInterval(h http.Header) time.Duration {
	v := h.Get(runnerapi.HeaderTraceUpdateInterval)
	if v == "" {
		return 0
	}
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil || n <= 0 {
		return 0
	}
	if time.Duration(n) > maxUpdateInterval/time.Second {
		return maxUpdateInterval
	}
	return time.Duration(n) * time.Second
}
