package wsmantest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"
)

// TestServer is a Server listening on 127.0.0.1 through httptest.
type TestServer struct {
	*Server
	// HTTP is the underlying httptest server.
	HTTP *httptest.Server
	// Host and Port are where it listens; URL is its /wsman endpoint.
	Host string
	Port int
	URL  string
	// CertPEM is the server's self-signed certificate (TLS servers only).
	CertPEM []byte

	mu     sync.Mutex
	closed bool
	extra  []*httptest.Server // endpoints added by ServeTLS
}

// CertName is the only DNS name in the certificates StartTLS generates. It
// deliberately does not match 127.0.0.1, as Windows' self-signed WinRM
// certificates name the computer, not the address it is reached at.
const CertName = "wsmantest.invalid"

// Start serves a new Server over plain HTTP until the test ends.
func Start(tb testing.TB, cfg Config) *TestServer {
	tb.Helper()
	return start(tb, cfg, false)
}

// StartTLS serves a new Server over HTTPS with a freshly generated
// self-signed certificate until the test ends.
func StartTLS(tb testing.TB, cfg Config) *TestServer {
	tb.Helper()
	return start(tb, cfg, true)
}

func start(tb testing.TB, cfg Config, useTLS bool) *TestServer {
	tb.Helper()
	srv, err := New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	hs := httptest.NewUnstartedServer(srv)
	// Refused TLS handshakes are what some tests are about; do not log them.
	hs.Config.ErrorLog = log.New(io.Discard, "", 0)
	ts := &TestServer{Server: srv, HTTP: hs}
	if useTLS {
		cert, certPEM, err := SelfSignedCert(CertName)
		if err != nil {
			tb.Fatal(err)
		}
		hs.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
		hs.StartTLS()
		ts.CertPEM = certPEM
	} else {
		hs.Start()
	}
	tb.Cleanup(func() {
		srv.Close() // ends long-polls so that the listener can close
		hs.Close()
		ts.mu.Lock()
		ts.closed = true
		extra := ts.extra
		ts.mu.Unlock()
		for _, e := range extra {
			e.Close()
		}
	})
	addr := hs.Listener.Addr().(*net.TCPAddr)
	ts.Host, ts.Port = addr.IP.String(), addr.Port
	ts.URL = hs.URL + "/wsman"
	return ts
}

// SelfSignedCert makes an ECDSA P-256 self-signed server certificate for
// dnsName, valid for a day, and returns it with its PEM encoding.
func SelfSignedCert(dnsName string) (tls.Certificate, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("generate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("serial: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: dnsName},
		DNSNames:     []string{dnsName},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("create certificate: %w", err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("marshal key: %w", err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	return cert, certPEM, err
}

// ServeTLS serves the same Server over HTTPS with cert on another port of
// 127.0.0.1, until the test ends, and returns that endpoint's host:port.
// Tests in which every machine has a certificate of its own (made by the
// code under test) play them all with one Server this way: shells,
// commands and events are shared. It may be called from any goroutine.
func (ts *TestServer) ServeTLS(cert tls.Certificate) (string, error) {
	if len(cert.Certificate) == 0 || cert.PrivateKey == nil {
		return "", errors.New("wsmantest: ServeTLS: the certificate has no chain or no private key")
	}
	hs := httptest.NewUnstartedServer(ts.Server)
	hs.Config.ErrorLog = log.New(io.Discard, "", 0)
	hs.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.closed {
		hs.Listener.Close()
		return "", errors.New("wsmantest: ServeTLS: the test server is closed")
	}
	hs.StartTLS()
	ts.extra = append(ts.extra, hs)
	return hs.Listener.Addr().String(), nil
}

// Addr returns host:port of the server.
func (ts *TestServer) Addr() string { return net.JoinHostPort(ts.Host, strconv.Itoa(ts.Port)) }
