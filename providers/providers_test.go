package providers

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

func TestErrorClassification(t *testing.T) {
	wrapped := func(err error) error { return fmt.Errorf("create instance: %w", err) }
	tests := []struct {
		name      string
		err       error
		kind      Kind
		transient bool
		permanent bool
	}{
		{"nil", nil, KindUnknown, false, false},
		{"plain", errors.New("x"), KindUnknown, false, false},
		{"sentinel not found", ErrNotFound, KindNotFound, false, false},
		{"not found", wrapped(NotFound("i")), KindNotFound, false, false},
		{"quota", wrapped(QuotaExceeded("r", nil)), KindQuotaExceeded, true, false},
		{"rate", wrapped(RateLimited(time.Second, nil)), KindRateLimited, true, false},
		{"capacity", wrapped(CapacityExhausted("z", nil)), KindCapacityExhausted, true, false},
		{"transient", wrapped(Transient(errors.New("x"))), KindTransient, true, false},
		{"permanent", wrapped(Permanent(errors.New("x"))), KindPermanent, false, true},
		{"invalid", wrapped(InvalidArgument(errors.New("x"))), KindInvalidArgument, false, true},
		{"deadline", wrapped(context.DeadlineExceeded), KindTransient, true, false},
		{"closed", wrapped(ErrClosed), KindPermanent, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := KindOf(tt.err); got != tt.kind {
				t.Errorf("KindOf = %s, want %s", got, tt.kind)
			}
			if got := IsTransient(tt.err); got != tt.transient {
				t.Errorf("IsTransient = %v", got)
			}
			if got := IsPermanent(tt.err); got != tt.permanent {
				t.Errorf("IsPermanent = %v", got)
			}
		})
	}
	if !errors.Is(wrapped(NotFound("i")), ErrNotFound) {
		t.Error("errors.Is(NotFound, ErrNotFound) = false")
	}
	if ra, ok := IsRateLimited(wrapped(RateLimited(3*time.Second, nil))); !ok || ra != 3*time.Second {
		t.Errorf("IsRateLimited = %s, %v", ra, ok)
	}
	if _, ok := IsRateLimited(Transient(nil)); ok {
		t.Error("IsRateLimited(transient) = true")
	}
	if s, ok := IsCapacityExhausted(CapacityExhausted("us-east1-b", nil)); !ok || s != "us-east1-b" {
		t.Errorf("IsCapacityExhausted = %q, %v", s, ok)
	}
	cause := errors.New("HTTP 403 QUOTA_EXCEEDED")
	err := QuotaExceeded("us-east1", cause)
	if !errors.Is(err, cause) || err.Error() != "quota exceeded in us-east1: HTTP 403 QUOTA_EXCEEDED" {
		t.Errorf("QuotaExceeded message %q / cause lost", err)
	}
	for k := range kindNames {
		if got, err := ParseKind(k.String()); err != nil || got != k {
			t.Errorf("ParseKind(%s) = %v, %v", k, got, err)
		}
	}
}

func TestDecodeSettings(t *testing.T) {
	type settings struct {
		Zone    string   `json:"zone"`
		Count   int      `json:"count"`
		Timeout Duration `json:"timeout"`
	}
	tests := []struct {
		in      string
		want    settings
		wantErr string
	}{
		{``, settings{}, ""},
		{`null`, settings{}, ""},
		{`{"zone":"a","count":2,"timeout":"1m30s"}`, settings{"a", 2, Duration(90 * time.Second)}, ""},
		{`{"zone":"a","region":"b"}`, settings{}, `unknown key "region"`},
		{`{"count":"two"}`, settings{}, `key "count"`},
		{`{"timeout":30}`, settings{}, `key "timeout"`},
		{`{"timeout":"-1s"}`, settings{}, `key "timeout"`},
		{`{"zone":`, settings{}, "malformed JSON"},
		{`{} {}`, settings{}, "trailing data"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			var got settings
			err := DecodeSettings(json.RawMessage(tt.in), &got)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || KindOf(err) != KindInvalidArgument {
					t.Fatalf("error %v, want invalid argument containing %s", err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

func TestConnectInfoValidate(t *testing.T) {
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	block, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		t.Fatal(err)
	}
	key := pem.EncodeToMemory(block)
	hostPub, _, _ := ed25519.GenerateKey(rand.Reader)
	sshPub, _ := ssh.NewPublicKey(hostPub)
	hostKey := string(ssh.MarshalAuthorizedKey(sshPub))
	good := ConnectInfo{ID: "i", Address: "127.0.0.1", Port: 22, Protocol: ProtocolSSH, OS: "linux", Arch: "amd64",
		Username: "root", PrivateKey: key, HostKey: hostKey}

	tests := []struct {
		name    string
		mod     func(*ConnectInfo)
		wantErr string
	}{
		{"good", func(*ConnectInfo) {}, ""},
		{"no address", func(c *ConnectInfo) { c.Address = "" }, "address"},
		{"port", func(c *ConnectInfo) { c.Port = 70000 }, "port"},
		{"protocol", func(c *ConnectInfo) { c.Protocol = "rdp" }, "protocol"},
		{"no credentials", func(c *ConnectInfo) { c.PrivateKey = nil }, "private_key or password"},
		{"bad key", func(c *ConnectInfo) { c.PrivateKey = []byte("junk") }, "private_key"},
		{"bad host key", func(c *ConnectInfo) { c.HostKey = "ssh-ed25519 !!!" }, "host_key"},
		{"winrm needs password", func(c *ConnectInfo) { c.Protocol = ProtocolWinRM }, "winrm needs password"},
		{"bad cert", func(c *ConnectInfo) { c.TLSCert = []byte("nope") }, "tls_cert"},
		{"no os", func(c *ConnectInfo) { c.OS = "" }, "os"},
		{"ipv6 loopback", func(c *ConnectInfo) { c.Address = "::1" }, ""},
		{"private address", func(c *ConnectInfo) { c.Address = "10.128.0.7" }, ""},
		{"host name", func(c *ConnectInfo) { c.Address = "vm-1.internal" }, ""},
		{"metadata server", func(c *ConnectInfo) { c.Address = "169.254.169.254" }, "link-local"},
		{"ipv6 link-local", func(c *ConnectInfo) { c.Address = "fe80::1" }, "link-local"},
		{"mapped link-local", func(c *ConnectInfo) { c.Address = "::ffff:169.254.169.254" }, "link-local"},
		{"unspecified", func(c *ConnectInfo) { c.Address = "0.0.0.0" }, "unspecified"},
		{"multicast", func(c *ConnectInfo) { c.Address = "224.0.0.1" }, "multicast"},
		{"broadcast", func(c *ConnectInfo) { c.Address = "255.255.255.255" }, "broadcast"},
		{"zone", func(c *ConnectInfo) { c.Address = "fe80::1%eth0" }, "zone"},
		{"address with a port", func(c *ConnectInfo) { c.Address = "10.0.0.1:22" }, "neither an IP address nor a host name"},
		{"address with a path", func(c *ConnectInfo) { c.Address = "host/../x" }, "neither an IP address nor a host name"},
		{"address with an option", func(c *ConnectInfo) { c.Address = "-oProxyCommand=x" }, "neither an IP address nor a host name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := good
			tt.mod(&c)
			err := c.Validate()
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Validate = %v, want error containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestInstanceHelpers(t *testing.T) {
	in := Instance{ID: "a", Labels: map[string]string{LabelManager: "m", LabelRunner: "r"}}
	if !in.HasLabels(map[string]string{LabelManager: "m"}) || in.HasLabels(map[string]string{LabelManager: "other"}) {
		t.Error("HasLabels wrong")
	}
	c := in.Clone()
	c.Labels["x"] = "y"
	if _, ok := in.Labels["x"]; ok {
		t.Error("Clone shares labels")
	}
	for _, s := range []State{StateCreating, StateRunning, StateDeleting, StateFailed, StateGone} {
		if !s.Valid() {
			t.Errorf("%s not valid", s)
		}
	}
	if State("booting").Valid() {
		t.Error("booting valid")
	}
}
