package gcefake

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"math/big"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"
)

// windowsKey is one windows-keys metadata entry.
type windowsKey struct {
	UserName     string `json:"userName"`
	Modulus      string `json:"modulus"`
	Exponent     string `json:"exponent"`
	Email        string `json:"email"`
	ExpireOn     string `json:"expireOn"`
	HashFunction string `json:"hashFunction,omitempty"`
}

// credentials is the line the agent writes to serial port 4.
type credentials struct {
	ErrorMessage      string `json:"errorMessage,omitempty"`
	EncryptedPassword string `json:"encryptedPassword,omitempty"`
	UserName          string `json:"userName,omitempty"`
	PasswordFound     bool   `json:"passwordFound,omitempty"`
	Exponent          string `json:"exponent,omitempty"`
	Modulus           string `json:"modulus,omitempty"`
	HashFunction      string `json:"hashFunction,omitempty"`
}

func metadata(in *instance, key string) string {
	for _, it := range in.res.GetMetadata().GetItems() {
		if it.GetKey() == key {
			return it.GetValue()
		}
	}
	return ""
}

// bootAgentLocked starts the guest agent of an instance that just reached
// RUNNING.
func (s *Server) bootAgentLocked(in *instance) {
	if in.windows {
		s.queueWindowsKeysLocked(in, in.runningAt)
		if len(s.opts.WindowsCertPEM) > 0 && strings.EqualFold(metadata(in, "enable-guest-attributes"), "true") &&
			strings.Contains(metadata(in, "windows-startup-script-ps1"), "guest-attributes/"+WinRMCertAttribute) {
			cert := string(s.opts.WindowsCertPEM)
			in.agentDue = append(in.agentDue, agentTask{at: in.runningAt.Add(s.opts.AgentDelay), run: func(in *instance) { in.attrs[WinRMCertAttribute] = cert }})
		}
		return
	}
	if strings.EqualFold(metadata(in, "enable-guest-attributes"), "true") {
		keys := s.opts.HostKeys
		in.agentDue = append(in.agentDue, agentTask{at: in.runningAt.Add(s.opts.AgentDelay), run: func(in *instance) { publishHostKeys(in, keys) }})
	}
}

// WinRMCertAttribute is the guest attribute (namespace/key) where mayfly's
// Windows startup script publishes the WinRM certificate.
const WinRMCertAttribute = "mayfly/winrm-cert"

// publishHostKeys publishes the host keys (authorized_keys form), or new
// ones when there are none, as guest attributes hostkeys/<type> = <base64
// blob>, as the Linux guest agent does.
func publishHostKeys(in *instance, keys []string) {
	if len(keys) > 0 {
		for _, k := range keys {
			pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(k))
			if err != nil {
				continue // as the agent skips a key file it cannot read
			}
			blob := base64.StdEncoding.EncodeToString(pub.Marshal())
			in.attrs["hostkeys/"+pub.Type()] = blob
			in.hostKeys[pub.Type()] = pub.Type() + " " + blob
		}
		return
	}
	_, edPriv, _ := ed25519.GenerateKey(rand.Reader)
	ecPriv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for _, pk := range []any{edPriv.Public(), &ecPriv.PublicKey} {
		pub, err := ssh.NewPublicKey(pk)
		if err != nil {
			continue
		}
		blob := base64.StdEncoding.EncodeToString(pub.Marshal())
		in.attrs["hostkeys/"+pub.Type()] = blob
		in.hostKeys[pub.Type()] = pub.Type() + " " + blob
	}
}

// queueWindowsKeysLocked schedules an answer to every windows-keys entry
// not answered before.
func (s *Server) queueWindowsKeysLocked(in *instance, from time.Time) {
	for line := range strings.Lines(metadata(in, "windows-keys")) {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		var k windowsKey
		if json.Unmarshal([]byte(line), &k) != nil {
			continue // the real agent logs and skips malformed entries
		}
		id := k.UserName + "|" + k.Modulus + "|" + k.ExpireOn
		if in.answered[id] {
			continue
		}
		in.answered[id] = true
		in.agentDue = append(in.agentDue, agentTask{at: from.Add(s.opts.AgentDelay), run: func(in *instance) { answerWindowsKey(in, k, s.opts.WindowsPassword) }})
	}
}

// answerWindowsKey sets a new password for the key's user (fixed, when
// fixed is not empty) and writes it, encrypted to the key, to serial port 4.
func answerWindowsKey(in *instance, k windowsKey, fixed string) {
	if exp, err := time.Parse(time.RFC3339, k.ExpireOn); err != nil || exp.Before(time.Now()) {
		return // expired or unreadable: ignored, as by the real agent
	}
	creds := credentials{UserName: k.UserName, Modulus: k.Modulus, Exponent: k.Exponent, HashFunction: k.HashFunction}
	pw, enc, err := encryptNewPassword(k, fixed)
	if err != nil {
		creds.ErrorMessage = err.Error()
	} else {
		in.passwords[k.UserName] = pw
		creds.PasswordFound = true
		creds.EncryptedPassword = enc
		if creds.HashFunction == "" {
			creds.HashFunction = "sha1"
		}
	}
	b, _ := json.Marshal(creds)
	in.serial[4] = append(append(in.serial[4], b...), '\n')
}

func encryptNewPassword(k windowsKey, fixed string) (pw, enc string, err error) {
	mod, err := base64.StdEncoding.DecodeString(k.Modulus)
	if err != nil {
		return "", "", fmt.Errorf("error decoding modulus: %w", err)
	}
	exp, err := base64.StdEncoding.DecodeString(k.Exponent)
	if err != nil {
		return "", "", fmt.Errorf("error decoding exponent: %w", err)
	}
	e := new(big.Int).SetBytes(exp)
	if !e.IsInt64() || e.Int64() < 3 || e.Int64() > 1<<31-1 {
		return "", "", errors.New("bad exponent")
	}
	pub := &rsa.PublicKey{N: new(big.Int).SetBytes(mod), E: int(e.Int64())}
	var h hash.Hash
	switch k.HashFunction {
	case "", "sha1":
		h = sha1.New()
	case "sha256":
		h = sha256.New()
	case "sha512":
		h = sha512.New()
	default:
		return "", "", fmt.Errorf("unknown hash function requested: %q", k.HashFunction)
	}
	pw = fixed
	if pw == "" {
		if pw, err = newPassword(); err != nil {
			return "", "", err
		}
	}
	ct, err := rsa.EncryptOAEP(h, rand.Reader, pub, []byte(pw), nil)
	if err != nil {
		return "", "", fmt.Errorf("error encrypting password: %w", err)
	}
	return pw, base64.StdEncoding.EncodeToString(ct), nil
}

// newPassword returns 15 random characters from at least three of the
// classes Windows requires (lower, upper, digits, symbols).
func newPassword() (string, error) {
	classes := []string{"abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", "~!@#$%^&*_-+=|(){}[]:;<>,.?/"}
	all := strings.Join(classes, "")
	for {
		b := make([]byte, 15)
		for i := range b {
			n, err := rand.Int(rand.Reader, big.NewInt(int64(len(all))))
			if err != nil {
				return "", err
			}
			b[i] = all[n.Int64()]
		}
		got := 0
		for _, c := range classes {
			if strings.ContainsAny(string(b), c) {
				got++
			}
		}
		if got >= 3 {
			return string(b), nil
		}
	}
}
