// Package winrm runs PowerShell scripts and uploads files on a Windows
// machine over WinRM (WS-Management remote shells), using the SOAP requests
// of github.com/masterzen/winrm sent through this package's own HTTP client.
//
// masterzen/winrm's Client has no contexts: its requests cannot be cancelled
// and are bounded only by a response-header timeout. So this package builds
// the requests with masterzen's constructors (NewOpenShellRequest,
// NewExecuteCommandRequest, NewSendInputRequest, NewGetOutputRequest,
// NewSignalRequest, NewDeleteShellRequest), posts them with a context per
// request, and parses the responses itself where masterzen's parsers lose
// information (the order of interleaved stdout and stderr, faults).
//
// Scripts. Run starts "powershell -EncodedCommand <loader>", a short fixed
// loader, and sends the program, the $env: assignments followed by the
// script, on the command's stdin as base64 of its UTF-8 text. The loader
// parses the whole program and dot-sources it, so the program runs as
// -EncodedCommand text would, whatever its size: cmd.exe, which WinRM starts
// commands through, limits a command line to 8191 characters (barely 3000
// characters of script once UTF-16LE and base64 encoded), and stdin has no
// such limit, needs no temporary file and no clean-up. A script should end
// with "exit N": without it PowerShell exits 0 if the last statement
// succeeded and 1 otherwise.
//
// Uploads. Upload sends the file in chunks (Target.UploadChunkSize, 1 MiB by
// default), each to a PowerShell command that decodes the base64 it reads on
// stdin and writes it at the chunk's offset of a temporary file beside the
// destination. A chunk whose request failed in transport is sent again in a
// new shell, at most Target.UploadAttempts times. A last command checks the
// size and SHA-256 of the temporary file and moves it over the destination.
// Windows has no POSIX permission bits: the mode argument is ignored.
//
// TLS. With HTTPS, a certificate given in Target.ServerCertPEM is pinned:
// the server must present exactly that certificate, whatever names it
// carries (Windows' self-signed WinRM certificates name the computer, not the
// address it is reached at), and any other is refused with a
// *CertificateError. Without one the system roots verify the certificate for
// Target.TLSServerName (default: Target.Addr).
//
// Cancellation. When Run's context ends, the command gets the terminate
// signal and its shell is deleted, which ends every process it started;
// Run then returns a *vmexec.AbortedError. Transport failures are
// *vmexec.SystemError.
package winrm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/Azure/go-ntlmssp"
	"github.com/masterzen/winrm"
	"github.com/masterzen/winrm/soap"

	"github.com/mayfly-ci/mayfly/vmexec"
)

// Defaults applied to zero fields of Target.
const (
	DefaultHTTPPort         = 5985
	DefaultHTTPSPort        = 5986
	DefaultConnectTimeout   = 2 * time.Minute
	DefaultAttemptTimeout   = 15 * time.Second
	DefaultRequestTimeout   = 30 * time.Second
	DefaultOperationTimeout = 20 * time.Second
	DefaultKillTimeout      = 30 * time.Second
	DefaultMaxEnvelopeSize  = 153600
	DefaultUploadChunkSize  = 1 << 20
	DefaultUploadAttempts   = 3
)

const (
	minBackoff  = 100 * time.Millisecond
	maxBackoff  = 2 * time.Second
	maxResponse = 64 << 20 // bytes read of one HTTP response
	maxStderr   = 4 << 10  // stderr kept from helper commands for error messages
)

// Auth selects the HTTP authentication scheme.
type Auth string

// Authentication schemes.
const (
	// AuthBasic sends the password with every request (WinRM's Basic must be
	// enabled; over plain HTTP also AllowUnencrypted).
	AuthBasic Auth = "basic"
	// AuthNTLM negotiates NTLM with the server when it offers it and falls
	// back to basic when it does not. Messages are not sealed with NTLM, so
	// over plain HTTP the server must allow unencrypted traffic.
	AuthNTLM Auth = "ntlm"
)

// Target says where and how to connect.
type Target struct {
	// Addr is the host name or IP address of the machine.
	Addr string
	// Port is the WinRM port (default 5985, or 5986 with HTTPS).
	Port int
	// HTTPS selects TLS.
	HTTPS bool
	// Username and Password authenticate; for NTLM the user may be DOMAIN\user.
	Username, Password string
	// Auth is the scheme (default AuthBasic).
	Auth Auth
	// ServerCertPEM pins the server's certificate (PEM, one CERTIFICATE
	// block). Only with HTTPS.
	ServerCertPEM []byte
	// TLSServerName is the name verified against system roots when no
	// certificate is pinned (default Addr).
	TLSServerName string

	// ConnectTimeout bounds Dial including all retries (default 2m).
	ConnectTimeout time.Duration
	// AttemptTimeout bounds one TCP connect plus TLS handshake, and each
	// request of Dial's probe (default 15s).
	AttemptTimeout time.Duration
	// RetryAuth makes Dial retry while the server rejects the credentials,
	// for machines whose password is set after WinRM starts.
	RetryAuth bool
	// RequestTimeout bounds each request other than Receive (default 30s).
	RequestTimeout time.Duration
	// OperationTimeout is the WS-Management OperationTimeout: how long the
	// server may hold a Receive without output (default 20s). A Receive
	// request is bounded by OperationTimeout + RequestTimeout.
	OperationTimeout time.Duration
	// KillTimeout bounds terminating and deleting the shell of an aborted
	// command (default 30s).
	KillTimeout time.Duration
	// MaxEnvelopeSize is the largest SOAP message, in bytes, sent to or
	// accepted from the server (default 153600, WinRM's smallest default).
	MaxEnvelopeSize int
	// UploadChunkSize is the number of file bytes per upload command
	// (default 1 MiB).
	UploadChunkSize int
	// UploadAttempts is how many times an upload step is tried when the
	// transport fails (default 3).
	UploadAttempts int

	// Logger receives connection events; nil means slog.Default().
	Logger *slog.Logger
}

// CertificateError reports that the server presented a TLS certificate other
// than the pinned one.
type CertificateError struct {
	Addr string
	// Want and Got are SHA-256 fingerprints of the DER certificates.
	Want, Got string
	// Subject is the presented certificate's subject.
	Subject string
}

// Error implements error.
func (e *CertificateError) Error() string {
	return fmt.Sprintf("TLS certificate of %s is not the pinned one: expected SHA256:%s, got SHA256:%s (%s)",
		e.Addr, e.Want, e.Got, e.Subject)
}

// FaultError is a WS-Management fault returned by the server.
type FaultError struct {
	// Status is the HTTP status (500 for faults).
	Status int
	// Code and Subcode are the SOAP fault codes, such as "s:Receiver" and
	// "w:TimedOut".
	Code, Subcode string
	// WSManCode is the numeric code of the WSManFault detail, if any.
	WSManCode uint32
	// Message is the fault reason.
	Message string
}

// Error implements error.
func (e *FaultError) Error() string {
	s := "wsman fault " + e.Subcode
	if e.WSManCode != 0 {
		s += fmt.Sprintf(" (0x%08X)", e.WSManCode)
	}
	return s + ": " + e.Message
}

// TimedOut reports whether the fault is the w:TimedOut of a Receive that
// waited OperationTimeout without output.
func (e *FaultError) TimedOut() bool {
	return strings.HasSuffix(e.Subcode, ":TimedOut") || e.WSManCode == 0x80338029
}

// HTTPError reports an HTTP response that is neither a SOAP response nor a
// fault.
type HTTPError struct {
	Status int
	// Body is the start of the response body.
	Body string
}

// Error implements error.
func (e *HTTPError) Error() string {
	return fmt.Sprintf("http status %d: %s", e.Status, e.Body)
}

// ErrAuth is wrapped by errors when the server rejected the credentials.
var ErrAuth = errors.New("winrm authentication failed")

// ErrClosed is wrapped by operations on a closed Client.
var ErrClosed = errors.New("winrm client closed")

// Client runs commands on one machine over WinRM. It implements
// vmexec.Executor and is safe for concurrent use; each Run has its own shell.
type Client struct {
	t      Target
	log    *slog.Logger
	url    string
	hc     *http.Client
	tr     *http.Transport
	params *winrm.Parameters

	closeCtx  context.Context
	closeFn   context.CancelFunc
	closeOnce sync.Once
	mu        sync.Mutex // guards closed and the Add of ops
	closed    bool
	ops       sync.WaitGroup
}

var _ vmexec.Executor = (*Client)(nil)

func (t *Target) setDefaults() {
	if t.Port == 0 {
		t.Port = DefaultHTTPPort
		if t.HTTPS {
			t.Port = DefaultHTTPSPort
		}
	}
	if t.Auth == "" {
		t.Auth = AuthBasic
	}
	if t.ConnectTimeout <= 0 {
		t.ConnectTimeout = DefaultConnectTimeout
	}
	if t.AttemptTimeout <= 0 {
		t.AttemptTimeout = DefaultAttemptTimeout
	}
	if t.RequestTimeout <= 0 {
		t.RequestTimeout = DefaultRequestTimeout
	}
	if t.OperationTimeout <= 0 {
		t.OperationTimeout = DefaultOperationTimeout
	}
	if t.KillTimeout <= 0 {
		t.KillTimeout = DefaultKillTimeout
	}
	if t.MaxEnvelopeSize <= 0 {
		t.MaxEnvelopeSize = DefaultMaxEnvelopeSize
	}
	if t.UploadChunkSize <= 0 {
		t.UploadChunkSize = DefaultUploadChunkSize
	}
	if t.UploadAttempts <= 0 {
		t.UploadAttempts = DefaultUploadAttempts
	}
	if t.Logger == nil {
		t.Logger = slog.Default()
	}
}

// check validates t after defaults.
func (t *Target) check() error {
	switch {
	case t.Addr == "":
		return errors.New("Target.Addr is empty")
	case strings.ContainsAny(t.Addr, "/ \t@[]"):
		return fmt.Errorf("Target.Addr %q: want a host name or IP address without port or scheme", t.Addr)
	case t.Port < 1 || t.Port > 65535:
		return fmt.Errorf("Target.Port %d is out of range", t.Port)
	case t.Username == "":
		return errors.New("Target.Username is empty")
	case t.Auth != AuthBasic && t.Auth != AuthNTLM:
		return fmt.Errorf("Target.Auth %q: want %q or %q", t.Auth, AuthBasic, AuthNTLM)
	case len(t.ServerCertPEM) > 0 && !t.HTTPS:
		return errors.New("Target.ServerCertPEM is set but Target.HTTPS is false: a certificate can only be pinned over HTTPS")
	case t.MaxEnvelopeSize < 16384:
		return fmt.Errorf("Target.MaxEnvelopeSize %d is below 16384", t.MaxEnvelopeSize)
	case t.UploadChunkSize > 64<<20:
		return fmt.Errorf("Target.UploadChunkSize %d is above 64 MiB", t.UploadChunkSize)
	}
	return nil
}

// parsePin returns the one certificate in pemBytes.
func parsePin(pemBytes []byte) (*x509.Certificate, error) {
	var certs []*x509.Certificate
	rest := pemBytes
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("Target.ServerCertPEM: unexpected PEM block %q", b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("Target.ServerCertPEM: %w", err)
		}
		certs = append(certs, c)
	}
	if len(certs) != 1 {
		return nil, fmt.Errorf("Target.ServerCertPEM: want exactly one CERTIFICATE block, found %d", len(certs))
	}
	return certs[0], nil
}

func fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return base64.RawStdEncoding.EncodeToString(sum[:])
}

// New checks t and returns a Client without contacting the server.
func New(t Target) (*Client, error) {
	t.setDefaults()
	if err := t.check(); err != nil {
		return nil, &vmexec.SystemError{Op: "winrm", Err: err}
	}
	hostPort := net.JoinHostPort(t.Addr, strconv.Itoa(t.Port))
	tr := &http.Transport{
		Proxy: nil, // machines are reached directly
		DialContext: (&net.Dialer{
			Timeout:   t.AttemptTimeout,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		TLSHandshakeTimeout: t.AttemptTimeout,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     90 * time.Second,
	}
	scheme := "http"
	if t.HTTPS {
		scheme = "https"
		cfg := &tls.Config{MinVersion: tls.VersionTLS12}
		if len(t.ServerCertPEM) > 0 {
			pin, err := parsePin(t.ServerCertPEM)
			if err != nil {
				return nil, &vmexec.SystemError{Op: "winrm", Err: err}
			}
			want := fingerprint(pin.Raw)
			// Names are not checked: the pinned certificate is the identity.
			cfg.InsecureSkipVerify = true
			cfg.VerifyConnection = func(cs tls.ConnectionState) error {
				if len(cs.PeerCertificates) == 0 {
					return &CertificateError{Addr: hostPort, Want: want, Got: "none", Subject: "no certificate"}
				}
				got := cs.PeerCertificates[0]
				if !bytes.Equal(got.Raw, pin.Raw) {
					return &CertificateError{Addr: hostPort, Want: want, Got: fingerprint(got.Raw), Subject: got.Subject.String()}
				}
				return nil
			}
		} else {
			cfg.ServerName = t.TLSServerName
			if cfg.ServerName == "" {
				cfg.ServerName = t.Addr
			}
		}
		tr.TLSClientConfig = cfg
	}
	var rt http.RoundTripper = tr
	if t.Auth == AuthNTLM {
		rt = ntlmssp.Negotiator{RoundTripper: tr}
	}
	ctx, cancel := context.WithCancel(context.Background())
	timeout := t.OperationTimeout.Seconds()
	return &Client{
		t:        t,
		log:      t.Logger.With("addr", hostPort, "user", t.Username),
		url:      scheme + "://" + hostPort + "/wsman",
		hc:       &http.Client{Transport: rt},
		tr:       tr,
		params:   winrm.NewParameters(fmt.Sprintf("PT%.3fS", timeout), "en-US", t.MaxEnvelopeSize),
		closeCtx: ctx,
		closeFn:  cancel,
	}, nil
}

// Dial returns a Client once the server accepted the credentials and created
// and deleted a shell, retrying with backoff until t.ConnectTimeout passes. A
// certificate that does not match the pin or fails verification is never
// retried, an authentication failure only with t.RetryAuth. Failures are *vmexec.SystemError unless ctx ended, in which
// case the error wraps context.Cause(ctx).
func Dial(ctx context.Context, t Target) (*Client, error) {
	c, err := New(t)
	if err != nil {
		return nil, err
	}
	op := "winrm dial " + c.url
	dctx, cancel := context.WithTimeout(ctx, c.t.ConnectTimeout)
	defer cancel()
	start := time.Now()
	backoff := minBackoff
	var last error // the last failure not caused by the end of dctx
	for attempt := 1; ; attempt++ {
		err := c.probe(dctx)
		if err == nil {
			c.log.Debug("winrm connected", "attempts", attempt, "elapsed", time.Since(start))
			return c, nil
		}
		var ce *CertificateError
		var ve *tls.CertificateVerificationError
		if errors.As(err, &ce) || errors.As(err, &ve) || (errors.Is(err, ErrAuth) && !c.t.RetryAuth) {
			c.Close()
			return nil, &vmexec.SystemError{Op: op, Err: err}
		}
		if dctx.Err() == nil || last == nil {
			last = err
		}
		if ctx.Err() != nil {
			c.Close()
			return nil, fmt.Errorf("%s: %w (last error: %v)", op, context.Cause(ctx), last)
		}
		if dctx.Err() != nil {
			c.Close()
			return nil, &vmexec.SystemError{Op: op, Err: fmt.Errorf(
				"no connection within %s after %d attempts: %w", c.t.ConnectTimeout, attempt, last)}
		}
		c.log.Debug("winrm dial failed, retrying", "attempt", attempt, "backoff", backoff, "err", err)
		if !sleep(dctx, backoff) {
			continue // the next probe fails at once and reports the context
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// sleep waits d with ±20% jitter, so that many managers do not retry in
// lockstep; false if ctx ended first.
func sleep(ctx context.Context, d time.Duration) bool {
	d = d - d/5 + rand.N(d*2/5+1)
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-tm.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// probe creates and deletes a shell, each request bounded by AttemptTimeout.
func (c *Client) probe(ctx context.Context) error {
	actx, cancel := context.WithTimeout(ctx, 2*c.t.AttemptTimeout)
	defer cancel()
	id, err := c.createShell(actx)
	if err != nil {
		return err
	}
	return c.deleteShell(actx, id)
}

// Close stops the operations in progress, which fail with a *vmexec.SystemError
// wrapping ErrClosed after their remote commands were terminated (bounded by
// KillTimeout), and releases the connections.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.closed = true
		c.mu.Unlock()
		c.closeFn()
	})
	c.ops.Wait()
	c.tr.CloseIdleConnections()
	return nil
}

// begin registers an operation; false when the Client is closed.
func (c *Client) begin() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.ops.Add(1)
	return true
}

// opContext returns a context for an operation's requests that also ends,
// with cause ErrClosed, when the Client is closed.
func (c *Client) opContext(ctx context.Context) (context.Context, func()) {
	octx, cancel := context.WithCancelCause(ctx)
	stop := context.AfterFunc(c.closeCtx, func() { cancel(ErrClosed) })
	return octx, func() { stop(); cancel(nil) }
}

// killContext is for clean-up requests, which must run after the
// operation's context ended; they are bounded by KillTimeout.
func (c *Client) killContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), c.t.KillTimeout)
}

// post sends one SOAP message and returns the response envelope.
func (c *Client) post(ctx context.Context, msg *soap.SoapMessage, timeout time.Duration) ([]byte, error) {
	body := msg.String()
	if len(body) > c.t.MaxEnvelopeSize {
		return nil, fmt.Errorf("request of %d bytes exceeds MaxEnvelopeSize %d", len(body), c.t.MaxEnvelopeSize)
	}
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodPost, c.url, strings.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/soap+xml;charset=UTF-8")
	req.SetBasicAuth(c.t.Username, c.t.Password)
	resp, err := c.hc.Do(req)
	if err != nil {
		if cerr := context.Cause(rctx); cerr != nil && ctx.Err() == nil {
			return nil, fmt.Errorf("no response within %s: %w", timeout, err)
		}
		return nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return nil, fmt.Errorf("read response: %w", err)
	}
	isSOAP := strings.Contains(resp.Header.Get("Content-Type"), "application/soap+xml")
	switch {
	case resp.StatusCode == http.StatusOK && isSOAP:
		return data, nil
	case resp.StatusCode == http.StatusUnauthorized:
		return nil, fmt.Errorf("%w: http status 401 for user %q", ErrAuth, c.t.Username)
	case isSOAP:
		if f := parseFault(data); f != nil {
			f.Status = resp.StatusCode
			return nil, f
		}
	}
	return nil, &HTTPError{Status: resp.StatusCode, Body: truncate(strings.TrimSpace(string(data)), 512)}
}

type faultEnvelope struct {
	Fault *struct {
		Code    string `xml:"http://www.w3.org/2003/05/soap-envelope Code>Value"`
		Subcode string `xml:"http://www.w3.org/2003/05/soap-envelope Code>Subcode>Value"`
		Reason  string `xml:"http://www.w3.org/2003/05/soap-envelope Reason>Text"`
		Detail  struct {
			WSManFault struct {
				Code    string `xml:"Code,attr"`
				Message string `xml:"http://schemas.microsoft.com/wbem/wsman/1/wsmanfault Message"`
			} `xml:"http://schemas.microsoft.com/wbem/wsman/1/wsmanfault WSManFault"`
		} `xml:"http://www.w3.org/2003/05/soap-envelope Detail"`
	} `xml:"http://www.w3.org/2003/05/soap-envelope Body>Fault"`
}

func parseFault(data []byte) *FaultError {
	var env faultEnvelope
	if xml.Unmarshal(data, &env) != nil || env.Fault == nil {
		return nil
	}
	f := env.Fault
	fe := &FaultError{
		Code:    strings.TrimSpace(f.Code),
		Subcode: strings.TrimSpace(f.Subcode),
		Message: strings.TrimSpace(f.Reason),
	}
	if m := strings.TrimSpace(f.Detail.WSManFault.Message); m != "" {
		fe.Message = m
	}
	if n, err := strconv.ParseUint(strings.TrimSpace(f.Detail.WSManFault.Code), 10, 32); err == nil {
		fe.WSManCode = uint32(n)
	}
	return fe
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// createShell creates a cmd shell and returns its id.
func (c *Client) createShell(ctx context.Context) (string, error) {
	resp, err := c.post(ctx, winrm.NewOpenShellRequest(c.url, c.params), c.t.RequestTimeout)
	if err != nil {
		return "", fmt.Errorf("create shell: %w", err)
	}
	id, err := winrm.ParseOpenShellResponse(string(resp))
	if err != nil || strings.TrimSpace(id) == "" {
		return "", fmt.Errorf("create shell: no ShellId in the response (%v)", err)
	}
	return strings.TrimSpace(id), nil
}

// deleteShell deletes a shell, which ends its processes. A shell the server
// no longer knows counts as deleted.
func (c *Client) deleteShell(ctx context.Context, id string) error {
	_, err := c.post(ctx, winrm.NewDeleteShellRequest(c.url, id, c.params), c.t.RequestTimeout)
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("delete shell %s: %w", id, err)
	}
	return nil
}

func isNotFound(err error) bool {
	var fe *FaultError
	return errors.As(err, &fe) && strings.HasSuffix(fe.Subcode, ":InvalidSelectors")
}
