package sshexec_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/vmexec"
	"github.com/mayfly-ci/mayfly/vmexec/sshexec"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
	"golang.org/x/crypto/ssh"
)

func TestHostKeyMismatchRefused(t *testing.T) {
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	other, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		var logs logBuf
		tg := srv.Target()
		tg.HostKey = string(ssh.MarshalAuthorizedKey(other))
		tg.Logger = testLogger(t, &logs)
		c, err := sshexec.Dial(context.Background(), tg)
		if err == nil {
			c.Close()
			t.Fatal("Dial succeeded with the wrong pinned host key")
		}
		var hk *sshexec.HostKeyError
		if !errors.As(err, &hk) || !vmexec.IsSystemFailure(err) {
			t.Fatalf("err %v (%T), want a SystemError wrapping *HostKeyError", err, err)
		}
		real, _, _, _, _ := ssh.ParseAuthorizedKey([]byte(srv.HostKey))
		if hk.Want != ssh.FingerprintSHA256(other) || hk.Got != ssh.FingerprintSHA256(real) {
			t.Errorf("fingerprints want=%s got=%s, expected want=%s got=%s", hk.Want, hk.Got, ssh.FingerprintSHA256(other), ssh.FingerprintSHA256(real))
		}
		if !strings.Contains(err.Error(), hk.Want) || !strings.Contains(err.Error(), hk.Got) {
			t.Errorf("error %q does not name both fingerprints", err)
		}
		if n := logs.count("retrying"); n != 0 {
			t.Errorf("host key mismatch was retried %d times", n)
		}
	})
}

func TestWrongClientKeyRefused(t *testing.T) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	wrong, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		for _, retry := range []bool{false, true} {
			t.Run(fmt.Sprintf("RetryAuth=%v", retry), func(t *testing.T) {
				var logs logBuf
				tg := srv.Target()
				tg.Signer = wrong
				tg.RetryAuth = retry
				tg.ConnectTimeout = 5 * time.Second // room for a handshake on a loaded machine
				tg.Logger = testLogger(t, &logs)
				c, err := sshexec.Dial(context.Background(), tg)
				if err == nil {
					c.Close()
					t.Fatal("Dial succeeded with an unauthorized client key")
				}
				if !errors.Is(err, sshexec.ErrAuth) || !vmexec.IsSystemFailure(err) {
					t.Fatalf("err %v, want a SystemError wrapping ErrAuth", err)
				}
				retries := logs.count("retrying")
				if !retry && retries != 0 {
					t.Errorf("auth failure retried %d times without RetryAuth", retries)
				}
				if retry && (retries < 1 || !strings.Contains(err.Error(), "attempts")) {
					t.Errorf("RetryAuth: %d retries, err %v; want retries until the connect timeout", retries, err)
				}
			})
		}
	})
}

func TestDialPrivateKeyPEM(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		c := dial(t, srv, func(tg *sshexec.Target) { tg.Signer, tg.PrivateKey = nil, srv.ClientKeyPEM })
		if code, out, _, err := run(t, c, vmexec.Command{Script: "echo ok"}); err != nil || code != 0 || out != "ok\n" {
			t.Errorf("code %d out %q err %v", code, out, err)
		}
	})
}

func TestDialRetriesUntilServerUp(t *testing.T) {
	for _, k := range kinds {
		t.Run(string(k), func(t *testing.T) {
			srv := sshtest.New(t, k)
			started := make(chan error, 1)
			go func() { // owned by the test: it waits on started below
				time.Sleep(time.Second)
				started <- srv.Start()
			}()
			var logs logBuf
			tg := srv.Target()
			tg.ConnectTimeout = 15 * time.Second
			tg.Logger = testLogger(t, &logs)
			c, err := sshexec.Dial(context.Background(), tg)
			if serr := <-started; serr != nil {
				t.Fatal(serr)
			}
			if err != nil {
				t.Fatalf("Dial: %v\n%s", err, srv.Log())
			}
			defer c.Close()
			if n := logs.count("retrying"); n < 2 {
				t.Errorf("%d retries logged, want several while the server was down", n)
			}
			if code, out, _, err := run(t, c, vmexec.Command{Script: "echo up"}); err != nil || code != 0 || out != "up\n" {
				t.Errorf("code %d out %q err %v", code, out, err)
			}
		})
	}
}

func TestDialGivesUp(t *testing.T) {
	// A port nobody listens on: the listener is closed right away.
	addr := func() string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return l.Addr().String()
	}()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	hostKey := string(ssh.MarshalAuthorizedKey(signer.PublicKey()))
	t.Run("connect timeout", func(t *testing.T) {
		var logs logBuf
		start := time.Now()
		_, err := sshexec.Dial(context.Background(), sshexec.Target{
			Addr: addr, User: "root", Signer: signer, HostKey: hostKey,
			ConnectTimeout: time.Second, Logger: testLogger(t, &logs),
		})
		if !vmexec.IsSystemFailure(err) || !strings.Contains(err.Error(), "attempts") || !strings.Contains(err.Error(), "refused") {
			t.Fatalf("err %v, want a SystemError saying how many attempts failed", err)
		}
		if n := logs.count("retrying"); n < 2 {
			t.Errorf("%d retries in 1s, want several", n)
		}
		t.Logf("gave up after %v: %v", time.Since(start), err)
	})
	t.Run("context canceled", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		_, err := sshexec.Dial(ctx, sshexec.Target{Addr: addr, User: "root", Signer: signer, HostKey: hostKey})
		if !errors.Is(err, context.DeadlineExceeded) || vmexec.IsSystemFailure(err) {
			t.Fatalf("err %v, want context.DeadlineExceeded and no SystemError", err)
		}
	})
}

func TestKeepaliveDetectsFrozenServer(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		c := dial(t, srv, func(tg *sshexec.Target) {
			tg.KeepaliveInterval = 200 * time.Millisecond
			tg.KeepaliveTimeout = time.Second
		})
		// The connection stays up while idle: keepalives are answered.
		time.Sleep(600 * time.Millisecond)
		if err := c.Err(); err != nil {
			t.Fatalf("idle connection reported dead: %v", err)
		}
		out := newSignalWriter("started\n")
		res := make(chan error, 1)
		go func() {
			_, err := c.Run(context.Background(), vmexec.Command{Script: "echo started; sleep " + uniqueSleep(t), Stdout: out})
			res <- err
		}()
		<-out.ready
		// Frozen, the server keeps the TCP connection open but answers nothing:
		// only the keepalive can notice.
		srv.Freeze()
		defer srv.Thaw()
		select {
		case err := <-res:
			if !vmexec.IsSystemFailure(err) || !errors.Is(err, sshexec.ErrConnectionLost) || !strings.Contains(err.Error(), "keepalive") {
				t.Fatalf("Run: %v, want a SystemError wrapping ErrConnectionLost from the keepalive", err)
			}
		case <-time.After(15 * time.Second):
			t.Fatal("Run did not fail within 15s of the server freezing")
		}
		select {
		case <-c.Done():
		default:
			t.Fatal("Done not closed after the connection died")
		}
		if !errors.Is(c.Err(), sshexec.ErrConnectionLost) {
			t.Errorf("Err() = %v, want ErrConnectionLost", c.Err())
		}
		if _, _, _, err := run(t, c, vmexec.Command{Script: "true"}); !vmexec.IsSystemFailure(err) {
			t.Errorf("Run on a dead connection: %v, want a SystemError", err)
		}
	})
}

func TestServerKilledDuringRun(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		c := dial(t, srv, nil)
		out := newSignalWriter("started\n")
		res := make(chan error, 1)
		go func() {
			_, err := c.Run(context.Background(), vmexec.Command{Script: "echo started; sleep " + uniqueSleep(t), Stdout: out})
			res <- err
		}()
		<-out.ready
		srv.Kill()
		select {
		case err := <-res:
			if !vmexec.IsSystemFailure(err) || !errors.Is(err, sshexec.ErrConnectionLost) {
				t.Fatalf("Run: %v, want a SystemError wrapping ErrConnectionLost", err)
			}
		case <-time.After(15 * time.Second):
			t.Fatal("Run did not fail within 15s of the server dying")
		}
	})
}

func TestClose(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *sshtest.Server) {
		c := dial(t, srv, nil)
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		c.Close() // idempotent
		_, _, _, err := run(t, c, vmexec.Command{Script: "true"})
		if !vmexec.IsSystemFailure(err) || !errors.Is(err, sshexec.ErrClosed) {
			t.Errorf("Run after Close: %v, want a SystemError wrapping ErrClosed", err)
		}
		if err := c.Upload(context.Background(), "/tmp/x", nil, 0o644); !errors.Is(err, sshexec.ErrClosed) {
			t.Errorf("Upload after Close: %v, want ErrClosed", err)
		}
	})
}
