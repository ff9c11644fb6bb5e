package aws

import (
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/crypto/ssh"
)

// sshKeys derives the per-instance SSH keys.
//
// Each instance gets its own ed25519 key, made from a random nonce drawn
// for that instance: seed = HMAC-SHA256(secret, "mayfly-aws-ssh-v1:" +
// nonce). The nonce travels as the RunInstances client token (which EC2
// keeps and returns with the instance), so the plugin needs no local state
// to log in again after a restart, provided the secret is the same (see
// Settings.KeySecretFile). The nonce alone is useless without the secret.
//
// The public key reaches the instance in its user data (cloud-init's
// ssh_authorized_keys) rather than through ImportKeyPair: an EC2 key pair
// per instance would cost an ImportKeyPair and a DeleteKeyPair call per
// job on the mutating-API budget and leave key pairs behind whenever the
// plugin dies between the two.
type sshKeys struct {
	secret []byte
	// id names the secret (an HMAC of it, not the secret): instances are
	// tagged with it, so the plugin can tell an instance it cannot log in
	// to from one it can.
	id string
}

const minSecret = 32

// newSSHKeys reads the secret from file, or draws a random one when file
// is empty.
func newSSHKeys(file string) (*sshKeys, error) {
	var secret []byte
	if file == "" {
		secret = make([]byte, minSecret)
		if _, err := rand.Read(secret); err != nil {
			return nil, err
		}
	} else {
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, keyErr("key_secret_file", "%v", err)
		}
		secret = []byte(strings.TrimSpace(string(b)))
		if len(secret) < minSecret {
			return nil, keyErr("key_secret_file", "%s holds %d bytes of secret, need at least %d", file, len(secret), minSecret)
		}
	}
	m := hmac.New(sha256.New, secret)
	m.Write([]byte("mayfly-aws-key-id"))
	return &sshKeys{secret: secret, id: hex.EncodeToString(m.Sum(nil))[:16]}, nil
}

// newNonce returns a fresh per-instance nonce (32 hex digits).
func newNonce() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// key returns the private key of the instance launched with nonce.
func (k *sshKeys) key(nonce string) ed25519.PrivateKey {
	m := hmac.New(sha256.New, k.secret)
	m.Write([]byte("mayfly-aws-ssh-v1:" + nonce))
	return ed25519.NewKeyFromSeed(m.Sum(nil))
}

// authorizedKey returns the instance's public key in authorized_keys form.
func (k *sshKeys) authorizedKey(nonce string) (string, error) {
	pub, err := ssh.NewPublicKey(k.key(nonce).Public())
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub))) + " mayfly", nil
}

// privatePEM returns the instance's private key as an OpenSSH PEM block.
func (k *sshKeys) privatePEM(nonce string) ([]byte, error) {
	block, err := ssh.MarshalPrivateKey(k.key(nonce), "mayfly")
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(block), nil
}

// windowsKey is the RSA key whose public half is the EC2 key pair Windows
// instances encrypt their Administrator password with.
//
// EC2 only encrypts the password for an EC2 key pair named at launch, so
// this key must be imported. It is imported once per plugin (lazily, at
// the first Create), not per instance: per instance would add an
// ImportKeyPair and a DeleteKeyPair call to every job and leave key pairs
// behind after crashes, for no gain, since the private key never leaves
// the manager host. The pair is named after the key's fingerprint, so a
// restarted plugin with the same WindowsKeyFile finds its pair in place.
type windowsKey struct {
	priv      *rsa.PrivateKey
	name      string
	material  []byte // OpenSSH public key, as ImportKeyPair wants it
	ephemeral bool   // generated for this process; deleted on Shutdown
}

func newWindowsKey(file, prefix string) (*windowsKey, error) {
	var priv *rsa.PrivateKey
	ephemeral := file == ""
	if ephemeral {
		var err error
		if priv, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			return nil, fmt.Errorf("generate windows key: %w", err)
		}
	} else {
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, keyErr("windows_key_file", "%v", err)
		}
		if priv, err = parseRSA(b); err != nil {
			return nil, keyErr("windows_key_file", "%s: %v", file, err)
		}
	}
	pub, err := ssh.NewPublicKey(&priv.PublicKey)
	if err != nil {
		return nil, err
	}
	fp := sha256.Sum256(pub.Marshal())
	return &windowsKey{
		priv:      priv,
		name:      fmt.Sprintf("%s-win-%s", prefix, hex.EncodeToString(fp[:8])),
		material:  ssh.MarshalAuthorizedKey(pub),
		ephemeral: ephemeral,
	}, nil
}

func parseRSA(b []byte) (*rsa.PrivateKey, error) {
	block, _ := pem.Decode(b)
	if block == nil {
		return nil, errors.New("no PEM block")
	}
	switch block.Type {
	case "RSA PRIVATE KEY":
		return x509.ParsePKCS1PrivateKey(block.Bytes)
	case "PRIVATE KEY":
		k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			return nil, err
		}
		if rk, ok := k.(*rsa.PrivateKey); ok {
			return rk, nil
		}
		return nil, fmt.Errorf("PKCS #8 key is %T, not RSA", k)
	}
	return nil, fmt.Errorf("PEM block %q is not an RSA private key", block.Type)
}

// decryptPassword decrypts GetPasswordData's PasswordData: base64 of the
// password encrypted with the key pair's public key, PKCS #1 v1.5.
func (w *windowsKey) decryptPassword(data string) (string, error) {
	ct, err := base64.StdEncoding.DecodeString(strings.TrimSpace(data))
	if err != nil {
		return "", fmt.Errorf("password data is not base64: %w", err)
	}
	//nolint:staticcheck // EC2 encrypts Windows passwords with PKCS #1 v1.5; there is no other choice.
	pt, err := rsa.DecryptPKCS1v15(nil, w.priv, ct)
	if err != nil {
		return "", fmt.Errorf("decrypt password data: %w", err)
	}
	return string(pt), nil
}
