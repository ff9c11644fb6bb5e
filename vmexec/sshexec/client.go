// Package sshexec runs scripts and uploads files on a machine over SSH.
//
// The server's host key is always pinned; there is no trust on first use. A
// script is sent on the session's stdin to "SHELL -s" started through setsid,
// so it runs in its own process group; when the context ends that group is
// killed through a second session, because neither OpenSSH nor dropbear
// reliably deliver signals to the remote command. Only POSIX sh, setsid, kill,
// cat, wc, chmod, mv and mkdir are needed remotely: busybox is enough.
package sshexec

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/vmexec"
)

// Defaults applied to zero fields of Target.
const (
	DefaultConnectTimeout    = 2 * time.Minute
	DefaultAttemptTimeout    = 15 * time.Second
	DefaultKeepaliveInterval = 10 * time.Second
	DefaultKillGrace         = 2 * time.Second
	DefaultDrainTimeout      = 5 * time.Second
)

const (
	minBackoff = 100 * time.Millisecond
	maxBackoff = 2 * time.Second
	maxStderr  = 4 << 10 // stderr kept from helper commands for error messages
	// maxExecAttempts bounds opening a session whose exec request the
	// server answered by closing it.
	maxExecAttempts = 5
)

// Target says where and how to connect.
type Target struct {
	// Addr is host:port of the SSH server.
	Addr string
	// User is the login name.
	User string
	// Signer is the client key. When nil, PrivateKey is parsed instead.
	Signer ssh.Signer
	// PrivateKey is an unencrypted PEM or OpenSSH private key.
	PrivateKey []byte
	// HostKey is the server's public host key in authorized_keys format
	// ("ssh-ed25519 AAAA... comment"). Any other key is refused.
	HostKey string

	// ConnectTimeout bounds Dial including all retries (default 2m).
	ConnectTimeout time.Duration
	// AttemptTimeout bounds one TCP connect plus SSH handshake (default 15s).
	AttemptTimeout time.Duration
	// RetryAuth keeps retrying while the server rejects the client key, for
	// images that install keys after sshd starts. By default it fails at once.
	RetryAuth bool

	// KeepaliveInterval is the time between keepalive@openssh.com requests
	// (default 10s; negative disables keepalives).
	KeepaliveInterval time.Duration
	// KeepaliveTimeout is how long a keepalive may stay unanswered before the
	// connection is declared dead and closed (default 3 × KeepaliveInterval).
	KeepaliveTimeout time.Duration

	// KillGrace is how long an aborted script's process group gets between
	// SIGTERM and SIGKILL, rounded up to whole seconds (default 2s).
	KillGrace time.Duration
	// KillTimeout bounds the whole abort procedure (default KillGrace + 15s).
	KillTimeout time.Duration
	// DrainTimeout is how long output may stay open after the script exited
	// (held by background processes) before the leftover process group is
	// killed (default 5s).
	DrainTimeout time.Duration

	// Logger receives connection events; nil means slog.Default().
	Logger *slog.Logger
}

// HostKeyError reports that the server presented a host key other than the pinned one.
type HostKeyError struct {
	Addr string
	// Want and Got are SHA256 fingerprints (ssh.FingerprintSHA256).
	Want, Got string
	// GotType is the algorithm of the presented key.
	GotType string
}

// Error implements error.
func (e *HostKeyError) Error() string {
	return fmt.Sprintf("host key mismatch for %s: expected %s, got %s %s", e.Addr, e.Want, e.GotType, e.Got)
}

// ErrAuth is wrapped by Dial errors when the server rejected the client key.
var ErrAuth = errors.New("ssh authentication failed")

// ErrConnectionLost is wrapped when an established connection died.
var ErrConnectionLost = errors.New("ssh connection lost")

// ErrClosed is wrapped by operations on a closed Client.
var ErrClosed = errors.New("ssh client closed")

// Client is one SSH connection to a machine. It implements vmexec.Executor and
// is safe for concurrent use; concurrent Runs use separate sessions.
type Client struct {
	t      Target
	log    *slog.Logger
	client *ssh.Client

	done   chan struct{} // closed when the connection is gone
	stopKA chan struct{}
	wg     sync.WaitGroup
	once   sync.Once

	mu  sync.Mutex
	err error // why the connection is gone

	spares spareState
}

var _ vmexec.Executor = (*Client)(nil)

func (t *Target) setDefaults() {
	if t.ConnectTimeout <= 0 {
		t.ConnectTimeout = DefaultConnectTimeout
	}
	if t.AttemptTimeout <= 0 {
		t.AttemptTimeout = DefaultAttemptTimeout
	}
	if t.KeepaliveInterval == 0 {
		t.KeepaliveInterval = DefaultKeepaliveInterval
	}
	if t.KeepaliveTimeout <= 0 {
		t.KeepaliveTimeout = 3 * t.KeepaliveInterval
	}
	if t.KillGrace <= 0 {
		t.KillGrace = DefaultKillGrace
	}
	if t.KillTimeout <= 0 {
		t.KillTimeout = t.KillGrace + 15*time.Second
	}
	if t.DrainTimeout <= 0 {
		t.DrainTimeout = DefaultDrainTimeout
	}
	if t.Logger == nil {
		t.Logger = slog.Default()
	}
}

// clientConfig checks t and builds the handshake configuration.
func (t *Target) clientConfig() (*ssh.ClientConfig, ssh.PublicKey, error) {
	if t.Addr == "" {
		return nil, nil, errors.New("Target.Addr is empty")
	}
	if _, _, err := net.SplitHostPort(t.Addr); err != nil {
		return nil, nil, fmt.Errorf("Target.Addr %q: %w", t.Addr, err)
	}
	if t.User == "" {
		return nil, nil, errors.New("Target.User is empty")
	}
	signer := t.Signer
	if signer == nil {
		if len(t.PrivateKey) == 0 {
			return nil, nil, errors.New("Target.Signer and Target.PrivateKey are both empty")
		}
		s, err := ssh.ParsePrivateKey(t.PrivateKey)
		if err != nil {
			return nil, nil, fmt.Errorf("Target.PrivateKey: %w", err)
		}
		signer = s
	}
	if strings.TrimSpace(t.HostKey) == "" {
		return nil, nil, errors.New("Target.HostKey is empty: the host key must be pinned")
	}
	pinned, _, _, _, err := ssh.ParseAuthorizedKey([]byte(t.HostKey))
	if err != nil {
		return nil, nil, fmt.Errorf("Target.HostKey: %w", err)
	}
	if _, ok := pinned.(*ssh.Certificate); ok {
		return nil, nil, errors.New("Target.HostKey: certificates are not supported, pin the plain key")
	}
	algos := []string{pinned.Type()}
	if pinned.Type() == ssh.KeyAlgoRSA {
		algos = []string{ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256, ssh.KeyAlgoRSA}
	}
	want := string(pinned.Marshal())
	addr := t.Addr
	cfg := &ssh.ClientConfig{
		User: t.User,
		Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback: func(_ string, _ net.Addr, got ssh.PublicKey) error {
			if string(got.Marshal()) == want {
				return nil
			}
			return &HostKeyError{
				Addr:    addr,
				Want:    ssh.FingerprintSHA256(pinned),
				Got:     ssh.FingerprintSHA256(got),
				GotType: got.Type(),
			}
		},
		HostKeyAlgorithms: algos,
		Timeout:           t.AttemptTimeout,
	}
	return cfg, pinned, nil
}

// Dial connects to t.Addr, retrying with backoff until the server accepts or
// t.ConnectTimeout passes. A host key mismatch is never retried; an
// authentication failure only with t.RetryAuth. Failures are *vmexec.SystemError
// unless ctx ended, in which case the error wraps context.Cause(ctx).
func Dial(ctx context.Context, t Target) (*Client, error) {
	t.setDefaults()
	op := "ssh dial " + t.Addr
	cfg, _, err := t.clientConfig()
	if err != nil {
		return nil, &vmexec.SystemError{Op: op, Err: err}
	}
	log := t.Logger.With("addr", t.Addr, "user", t.User)
	dctx, cancel := context.WithTimeout(ctx, t.ConnectTimeout)
	defer cancel()
	start := time.Now()
	backoff := minBackoff
	var lastErr error
	for attempt := 1; ; attempt++ {
		sc, chans, reqs, err := dialOnce(dctx, t.Addr, cfg, t.AttemptTimeout)
		if err == nil {
			log.Debug("ssh connected", "attempts", attempt, "elapsed", time.Since(start))
			return newClient(t, log, ssh.NewClient(sc, chans, reqs)), nil
		}
		var hk *HostKeyError
		if errors.As(err, &hk) {
			return nil, &vmexec.SystemError{Op: op, Err: err}
		}
		if isAuthError(err) {
			err = fmt.Errorf("%w: %w", ErrAuth, err)
			if !t.RetryAuth {
				return nil, &vmexec.SystemError{Op: op, Err: err}
			}
		}
		// An attempt cut short by the deadline says less than the one before it.
		if dctx.Err() == nil || lastErr == nil {
			lastErr = err
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%s: %w (last error: %w)", op, context.Cause(ctx), lastErr)
		}
		if dctx.Err() == nil {
			log.Debug("ssh dial failed, retrying", "attempt", attempt, "backoff", backoff, "err", err)
			// Jitter of ±20% keeps many managers from retrying in lockstep.
			sleep := backoff - backoff/5 + rand.N(backoff*2/5+1)
			tm := time.NewTimer(sleep)
			select {
			case <-tm.C:
			case <-dctx.Done():
				tm.Stop()
			}
			backoff = min(2*backoff, maxBackoff)
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%s: %w (last error: %w)", op, context.Cause(ctx), lastErr)
		}
		if dctx.Err() != nil {
			return nil, &vmexec.SystemError{Op: op, Err: fmt.Errorf(
				"no connection within %s after %d attempts: %w", t.ConnectTimeout, attempt, lastErr)}
		}
	}
}

func isAuthError(err error) bool {
	return strings.Contains(err.Error(), "unable to authenticate")
}

// dialOnce makes one TCP connection and SSH handshake bounded by timeout.
func dialOnce(ctx context.Context, addr string, cfg *ssh.ClientConfig, timeout time.Duration) (ssh.Conn, <-chan ssh.NewChannel, <-chan *ssh.Request, error) {
	actx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(actx, "tcp", addr)
	if err != nil {
		return nil, nil, nil, err
	}
	if dl, ok := actx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(actx, func() { conn.Close() })
	sc, chans, reqs, err := ssh.NewClientConn(conn, addr, cfg)
	if !stop() {
		if err == nil {
			sc.Close()
		}
		return nil, nil, nil, fmt.Errorf("ssh handshake: %w", context.Cause(actx))
	}
	if err != nil {
		conn.Close()
		return nil, nil, nil, err
	}
	conn.SetDeadline(time.Time{})
	return sc, chans, reqs, nil
}

func newClient(t Target, log *slog.Logger, sc *ssh.Client) *Client {
	c := &Client{
		t:      t,
		log:    log,
		client: sc,
		done:   make(chan struct{}),
		stopKA: make(chan struct{}),
	}
	c.wg.Add(1)
	go func() { // owner of done: ends when the connection closes
		defer c.wg.Done()
		err := sc.Wait()
		c.setErr(fmt.Errorf("%w: %v", ErrConnectionLost, errOrEOF(err)))
		close(c.done)
	}()
	if t.KeepaliveInterval > 0 {
		c.wg.Add(1)
		go func() { defer c.wg.Done(); c.keepalive() }()
	}
	return c
}

func errOrEOF(err error) error {
	if err == nil {
		return io.EOF
	}
	return err
}

// setErr records the first reason the connection is gone.
func (c *Client) setErr(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
	}
}

// fail records err and closes the connection, which ends every session.
func (c *Client) fail(err error) {
	c.setErr(err)
	c.client.Close()
}

// keepalive sends keepalive@openssh.com requests and closes the connection
// when one stays unanswered for KeepaliveTimeout. Any reply, also a failure
// reply, proves the server is alive.
func (c *Client) keepalive() {
	tick := time.NewTicker(c.t.KeepaliveInterval)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
		case <-c.stopKA:
			return
		case <-c.done:
			return
		}
		res := make(chan error, 1)
		go func() { // ends when the reply arrives or the connection closes
			_, _, err := c.client.SendRequest("keepalive@openssh.com", true, nil)
			res <- err
		}()
		tm := time.NewTimer(c.t.KeepaliveTimeout)
		select {
		case err := <-res:
			tm.Stop()
			if err != nil {
				c.fail(fmt.Errorf("%w: keepalive: %v", ErrConnectionLost, err))
				return
			}
		case <-tm.C:
			c.log.Warn("ssh keepalive unanswered, closing connection", "timeout", c.t.KeepaliveTimeout)
			c.fail(fmt.Errorf("%w: no keepalive reply within %s", ErrConnectionLost, c.t.KeepaliveTimeout))
			return
		case <-c.stopKA:
			tm.Stop()
			return
		}
	}
}

// Done is closed when the connection is gone, by Close or by failure.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns why the connection is gone, or nil while it is up.
func (c *Client) Err() error {
	select {
	case <-c.done:
	default:
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close closes the connection and waits for the client's goroutines.
func (c *Client) Close() error {
	c.once.Do(func() {
		c.setErr(ErrClosed)
		close(c.stopKA)
		c.client.Close()
	})
	c.wg.Wait()
	return nil
}

// DialContext opens a connection from the machine to addr over this SSH
// connection: network "tcp" asks the server to connect to host:port
// (direct-tcpip), "unix" to the Unix socket at the path addr
// (direct-streamlocal, an OpenSSH extension that dropbear lacks). The
// manager reaches the VM's Docker Engine this way, and services'
// ports on the VM's container networks. ctx bounds the dial only.
func (c *Client) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	if err := c.Err(); err != nil {
		return nil, fmt.Errorf("dial %s %s on the machine: %w", network, addr, err)
	}
	switch network {
	case "tcp", "tcp4", "tcp6", "unix":
	default:
		return nil, fmt.Errorf("dial %s %s on the machine: network %q: want tcp or unix", network, addr, network)
	}
	conn, err := c.client.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s %s on the machine: %w", network, addr, c.connErr(err))
	}
	return conn, nil
}

// Ping checks that the connection is up and answers a keepalive before ctx
// ends (and within AttemptTimeout). A connection that does not is closed,
// and Ping returns why.
func (c *Client) Ping(ctx context.Context) error {
	if err := c.Err(); err != nil {
		return err
	}
	res := make(chan error, 1)
	go func() { // ends when the reply arrives or the connection closes
		_, _, err := c.client.SendRequest("keepalive@openssh.com", true, nil)
		res <- err
	}()
	tm := time.NewTimer(c.t.AttemptTimeout)
	defer tm.Stop()
	select {
	case err := <-res:
		if err != nil {
			c.fail(fmt.Errorf("%w: %v", ErrConnectionLost, err))
			<-c.done
			return c.Err()
		}
		return nil
	case <-tm.C:
		c.fail(fmt.Errorf("%w: no keepalive reply within %s", ErrConnectionLost, c.t.AttemptTimeout))
		<-c.done
		return c.Err()
	case <-ctx.Done():
		c.fail(fmt.Errorf("%w: no keepalive reply before %v", ErrConnectionLost, context.Cause(ctx)))
		<-c.done
		return c.Err()
	case <-c.done:
		return c.Err()
	}
}

// probe checks the connection answers a keepalive within AttemptTimeout, so
// that a channel closed by a dying connection is reported as ErrConnectionLost.
func (c *Client) probe() error {
	res := make(chan error, 1)
	go func() { // ends when the reply arrives or the connection closes
		_, _, err := c.client.SendRequest("keepalive@openssh.com", true, nil)
		res <- err
	}()
	tm := time.NewTimer(c.t.AttemptTimeout)
	defer tm.Stop()
	select {
	case err := <-res:
		if err != nil {
			c.fail(fmt.Errorf("%w: %v", ErrConnectionLost, err))
			<-c.done
			return c.Err()
		}
		return nil
	case <-tm.C:
		c.fail(fmt.Errorf("%w: no keepalive reply within %s", ErrConnectionLost, c.t.AttemptTimeout))
		<-c.done
		return c.Err()
	case <-c.done:
		return c.Err()
	}
}

// endedWithoutStatus explains a channel that closed without an exit status.
func (c *Client) endedWithoutStatus() error {
	if err := c.probe(); err != nil {
		return err
	}
	return errors.New("remote command ended without an exit status")
}

// connErr returns the connection's failure if it is gone, else err.
func (c *Client) connErr(err error) error {
	if e := c.Err(); e != nil {
		return e
	}
	return err
}
