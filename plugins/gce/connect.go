package gce

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"hash"
	"math/big"
	"strings"
	"sync"
	"time"

	"cloud.google.com/go/compute/apiv1/computepb"
	"golang.org/x/crypto/ssh"
	"google.golang.org/protobuf/proto"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/pluginkit"
)

// Metadata keys read by the GCE guest agent.
const (
	metadataSSHKeys         = "ssh-keys"
	metadataWindowsKeys     = "windows-keys"
	metadataGuestAttributes = "enable-guest-attributes"
)

const (
	// hostKeysPath is the guest-attributes namespace where the guest agent
	// publishes the SSH host keys: key = key type, value = base64 blob.
	hostKeysPath = "hostkeys/"
	// passwordPort is the serial port the Windows guest agent writes the
	// encrypted password to, one JSON object per line.
	passwordPort = 4
	// winrmHTTPSPort is the WinRM HTTPS port.
	winrmHTTPSPort = 5986
	rsaBits        = 2048
)

// hostKeyPreference orders the host key types the guest agent publishes.
var hostKeyPreference = []string{ssh.KeyAlgoED25519, ssh.KeyAlgoECDSA256, ssh.KeyAlgoRSA}

// secret is the key material of one instance. It lives only in the
// plugin's memory; after a plugin restart ConnectInfo installs new keys.
type secret struct {
	mu      sync.Mutex
	created time.Time

	// Linux: the ephemeral SSH key and the pinned host key once known.
	sshPriv []byte // PEM (OpenSSH format)
	sshPub  string // authorized_keys form, without comment
	hostKey string

	// Windows: the RSA key of the password-reset request and its result,
	// and the pinned WinRM certificate (PEM) once known.
	tlsCert    []byte
	rsaKey     *rsa.PrivateKey
	password   string
	serialNext int64
	partial    string
}

// newSecret makes the key material for a new instance: an ed25519 SSH key
// (Linux) or an RSA key for the password reset (Windows).
func newSecret(s Settings) (*secret, error) {
	sec := &secret{created: time.Now()}
	if s.OS == "windows" {
		return sec, sec.newRSA()
	}
	return sec, sec.newSSH()
}

func (sec *secret) newSSH() error {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return fmt.Errorf("generate ssh key: %w", err)
	}
	block, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		return fmt.Errorf("encode ssh key: %w", err)
	}
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		return fmt.Errorf("encode ssh public key: %w", err)
	}
	sec.sshPriv = pem.EncodeToMemory(block)
	sec.sshPub = strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sshPub)))
	return nil
}

func (sec *secret) newRSA() error {
	k, err := rsa.GenerateKey(rand.Reader, rsaBits)
	if err != nil {
		return fmt.Errorf("generate rsa key: %w", err)
	}
	sec.rsaKey, sec.password, sec.serialNext, sec.partial = k, "", 0, ""
	return nil
}

// sshKeysEntry is the ssh-keys metadata line "user:ssh-ed25519 AAAA... user".
func (sec *secret) sshKeysEntry(user string) string {
	return fmt.Sprintf("%s:%s %s", user, sec.sshPub, user)
}

// windowsKey is one entry of the windows-keys metadata value, as the
// Windows guest agent reads it.
type windowsKey struct {
	UserName string `json:"userName"`
	Modulus  string `json:"modulus"`
	Exponent string `json:"exponent"`
	Email    string `json:"email"`
	ExpireOn string `json:"expireOn"`
}

// windowsCreds is the line the Windows guest agent writes to serial port 4.
type windowsCreds struct {
	ErrorMessage      string `json:"errorMessage,omitempty"`
	EncryptedPassword string `json:"encryptedPassword,omitempty"`
	UserName          string `json:"userName,omitempty"`
	PasswordFound     bool   `json:"passwordFound,omitempty"`
	Exponent          string `json:"exponent,omitempty"`
	Modulus           string `json:"modulus,omitempty"`
	HashFunction      string `json:"hashFunction,omitempty"`
}

func (sec *secret) modulus() string {
	return base64.StdEncoding.EncodeToString(sec.rsaKey.N.Bytes())
}

// windowsKeyEntry is the JSON entry asking the guest agent to create or
// reset user's password, valid until expire.
func (sec *secret) windowsKeyEntry(user string, expire time.Time) (string, error) {
	b, err := json.Marshal(windowsKey{
		UserName: user,
		Modulus:  sec.modulus(),
		Exponent: base64.StdEncoding.EncodeToString(big.NewInt(int64(sec.rsaKey.E)).Bytes()),
		Email:    user + "@mayfly.invalid",
		ExpireOn: expire.UTC().Format(time.RFC3339),
	})
	return string(b), err
}

// decryptPassword decrypts the agent's RSA-OAEP encrypted password.
func (sec *secret) decryptPassword(c windowsCreds) (string, error) {
	ct, err := base64.StdEncoding.DecodeString(c.EncryptedPassword)
	if err != nil {
		return "", fmt.Errorf("encrypted password: %w", err)
	}
	var h hash.Hash
	switch c.HashFunction {
	case "", "sha1":
		h = sha1.New()
	case "sha256":
		h = sha256.New()
	case "sha512":
		h = sha512.New()
	default:
		return "", fmt.Errorf("unknown hash function %q", c.HashFunction)
	}
	pt, err := rsa.DecryptOAEP(h, nil, sec.rsaKey, ct, nil)
	if err != nil {
		return "", fmt.Errorf("decrypt password: %w", err)
	}
	return string(pt), nil
}

func (p *Provider) putSecret(id string, sec *secret) {
	p.mu.Lock()
	p.secrets[id] = sec
	p.mu.Unlock()
}

// secretFor returns the secret of id, adding an empty one when there is
// none (after a plugin restart).
func (p *Provider) secretFor(id string) *secret {
	p.mu.Lock()
	defer p.mu.Unlock()
	sec := p.secrets[id]
	if sec == nil {
		sec = &secret{created: time.Now()}
		p.secrets[id] = sec
	}
	return sec
}

func (p *Provider) cached(id string) *computepb.Instance {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cache[id]
}

// address returns the IP to connect to: the first interface's internal
// IP (internal), else its first external (NAT) IP; "" when there is none
// yet.
func address(inst *computepb.Instance, internal bool) string {
	for _, nic := range inst.GetNetworkInterfaces() {
		if internal {
			if ip := nic.GetNetworkIP(); ip != "" {
				return ip
			}
			continue
		}
		for _, ac := range nic.GetAccessConfigs() {
			if ip := ac.GetNatIP(); ip != "" {
				return ip
			}
		}
	}
	return ""
}

// ConnectInfo implements providers.Provider.
//
// Linux: SSH on port 22 as Username with the instance's ephemeral ed25519
// key. The address comes from the last List when it had one (no call),
// else from instances.get. HostKey is read from the guest attributes the
// GCE guest agent publishes under hostkeys/ (one getGuestAttributes call
// until found). GCE offers no host key before the guest has booted, so
// ConnectInfo returns an empty HostKey while the guest has not published
// it (or the image has no guest agent); what to do then is the caller's
// policy.
//
// Windows: WinRM over HTTPS on port 5986 as Username with the password the
// guest agent set in answer to the windows-keys entry (put in metadata at
// creation), read from serial port 4 and decrypted with RSA-OAEP. It waits
// at most PasswordTimeout and then fails with a transient error: Windows
// takes minutes to boot and the caller retries. TLSCert is the certificate
// of the WinRM HTTPS listener, which the startup script (winrmCertScript)
// makes and publishes in the guest attribute mayfly/winrm-cert (one
// getGuestAttributes call until found); it is empty while not published,
// as HostKey on Linux.
//
// After a plugin restart the keys are gone from memory; ConnectInfo then
// installs new ones with instances.setMetadata (ssh-keys or windows-keys).
func (p *Provider) ConnectInfo(ctx context.Context, id string) (providers.ConnectInfo, error) {
	s, _, _, err := p.client()
	if err != nil {
		return providers.ConnectInfo{}, err
	}
	zone, name, ok := splitID(id)
	if !ok {
		return providers.ConnectInfo{}, providers.NotFound(id)
	}
	inst := p.cached(id)
	if inst == nil || address(inst, !*s.UseExternalIP) == "" {
		if inst, err = p.getInstance(ctx, s, zone, name); err != nil {
			return providers.ConnectInfo{}, err
		}
	}
	addr := address(inst, !*s.UseExternalIP)
	if addr == "" {
		return providers.ConnectInfo{}, providers.Transient(fmt.Errorf("connect info %s: instance (%s) has no address yet", id, inst.GetStatus()))
	}
	ci := providers.ConnectInfo{ID: id, Address: addr, OS: s.OS, Arch: s.Arch, Username: s.Username}
	sec := p.secretFor(id)
	sec.mu.Lock()
	defer sec.mu.Unlock()
	if s.OS == "windows" {
		pw, err := p.windowsPassword(ctx, s, zone, name, sec)
		if err != nil {
			return providers.ConnectInfo{}, fmt.Errorf("connect info %s: %w", id, err)
		}
		if sec.tlsCert == nil {
			cert, err := p.winrmCert(ctx, s, zone, name)
			if err != nil {
				return providers.ConnectInfo{}, fmt.Errorf("connect info %s: %w", id, err)
			}
			sec.tlsCert = cert
		}
		ci.Protocol, ci.Port, ci.Password = providers.ProtocolWinRM, winrmHTTPSPort, pw
		ci.TLSCert = sec.tlsCert
		return ci, nil
	}
	if sec.sshPriv == nil {
		if err := p.installSSHKey(ctx, s, zone, name, sec); err != nil {
			return providers.ConnectInfo{}, fmt.Errorf("connect info %s: %w", id, err)
		}
	}
	if sec.hostKey == "" {
		hk, err := p.hostKey(ctx, s, zone, name)
		if err != nil {
			return providers.ConnectInfo{}, fmt.Errorf("connect info %s: %w", id, err)
		}
		sec.hostKey = hk
	}
	ci.Protocol, ci.Port = providers.ProtocolSSH, 22
	ci.PrivateKey, ci.HostKey = sec.sshPriv, sec.hostKey
	return ci, nil
}

// hostKey reads the instance's SSH host key from its guest attributes; ""
// when the guest has published none.
func (p *Provider) hostKey(ctx context.Context, s Settings, zone, name string) (string, error) {
	_, ic, _, err := p.client()
	if err != nil {
		return "", err
	}
	cctx, cancel := context.WithTimeout(ctx, apiCallTimeout)
	defer cancel()
	ga, err := ic.GetGuestAttributes(cctx, &computepb.GetGuestAttributesInstanceRequest{
		Project: s.Project, Zone: zone, Instance: name, QueryPath: proto.String(hostKeysPath),
	}, noRetry)
	if err != nil {
		err = p.throttle(classify(err, zone))
		if providers.IsNotFound(err) {
			return "", nil // not published (yet)
		}
		return "", fmt.Errorf("read host keys: %w", err)
	}
	keys := map[string]string{}
	for _, it := range ga.GetQueryValue().GetItems() {
		if it.GetNamespace() == strings.TrimSuffix(hostKeysPath, "/") {
			keys[it.GetKey()] = strings.TrimSpace(it.GetValue())
		}
	}
	for _, typ := range hostKeyPreference {
		if v := keys[typ]; v != "" {
			line := typ + " " + v
			if _, _, _, _, err := ssh.ParseAuthorizedKey([]byte(line)); err == nil {
				return line, nil
			}
			p.log.Warn("malformed host key in guest attributes", "instance", instanceID(zone, name), "type", typ)
		}
	}
	return "", nil
}

// setMetadata replaces the value of key in the instance's metadata with
// edit(old value), with the fingerprint read by instances.get, and waits
// for the operation.
func (p *Provider) setMetadata(ctx context.Context, s Settings, zone, name, key string, edit func(string) string) error {
	inst, err := p.getInstance(ctx, s, zone, name)
	if err != nil {
		return err
	}
	md := proto.CloneOf(inst.GetMetadata())
	if md == nil {
		md = &computepb.Metadata{}
	}
	found := false
	for _, it := range md.Items {
		if it.GetKey() == key {
			it.Value = proto.String(edit(it.GetValue()))
			found = true
		}
	}
	if !found {
		md.Items = append(md.Items, &computepb.Items{Key: proto.String(key), Value: proto.String(edit(""))})
	}
	_, ic, _, err := p.client()
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, apiCallTimeout)
	op, err := ic.SetMetadata(cctx, &computepb.SetMetadataInstanceRequest{
		Project: s.Project, Zone: zone, Instance: name, MetadataResource: md,
	}, noRetry)
	cancel()
	if err != nil {
		return fmt.Errorf("set metadata %s: %w", key, p.throttle(classify(err, zone)))
	}
	if err := p.waitOp(ctx, s, zone, op.Proto()); err != nil {
		return fmt.Errorf("set metadata %s: %w", key, err)
	}
	return nil
}

// installSSHKey gives the instance a new ephemeral key (the old one was
// lost with a plugin restart), replacing Username's ssh-keys lines.
func (p *Provider) installSSHKey(ctx context.Context, s Settings, zone, name string, sec *secret) error {
	fresh := &secret{}
	if err := fresh.newSSH(); err != nil {
		return err
	}
	err := p.setMetadata(ctx, s, zone, name, metadataSSHKeys, func(old string) string {
		var keep []string
		for line := range strings.Lines(old) {
			line = strings.TrimRight(line, "\r\n")
			if line != "" && !strings.HasPrefix(line, s.Username+":") {
				keep = append(keep, line)
			}
		}
		return strings.Join(append(keep, fresh.sshKeysEntry(s.Username)), "\n")
	})
	if err != nil {
		return err
	}
	sec.sshPriv, sec.sshPub = fresh.sshPriv, fresh.sshPub
	p.log.Info("installed a new ssh key", "instance", instanceID(zone, name))
	return nil
}

// windowsPassword returns the instance's Windows password, asking the guest
// agent for a new one first when the RSA key was lost with a restart.
func (p *Provider) windowsPassword(ctx context.Context, s Settings, zone, name string, sec *secret) (string, error) {
	if sec.password != "" {
		return sec.password, nil
	}
	if sec.rsaKey == nil {
		if err := sec.newRSA(); err != nil {
			return "", err
		}
		entry, err := sec.windowsKeyEntry(s.Username, time.Now().Add(time.Hour))
		if err != nil {
			return "", err
		}
		err = p.setMetadata(ctx, s, zone, name, metadataWindowsKeys, func(old string) string {
			if old = strings.TrimSpace(old); old != "" {
				return old + "\n" + entry
			}
			return entry
		})
		if err != nil {
			sec.rsaKey = nil
			return "", err
		}
		p.log.Info("requested a windows password reset", "instance", instanceID(zone, name))
	}
	deadline := time.Now().Add(time.Duration(s.PasswordTimeout))
	for {
		pw, err := p.readPassword(ctx, s, zone, name, sec)
		if err != nil || pw != "" {
			return pw, err
		}
		if !time.Now().Add(time.Duration(s.PollInterval)).Before(deadline) {
			return "", providers.Transient(errors.New("windows password not yet on serial port 4"))
		}
		if err := pluginkit.Sleep(ctx, time.Duration(s.PollInterval)); err != nil {
			return "", providers.Transient(fmt.Errorf("waiting for the windows password: %w", err))
		}
	}
}

// readPassword reads serial port 4 from where the last read ended and
// returns the password once the agent's answer to our key is there.
func (p *Provider) readPassword(ctx context.Context, s Settings, zone, name string, sec *secret) (string, error) {
	_, ic, _, err := p.client()
	if err != nil {
		return "", err
	}
	cctx, cancel := context.WithTimeout(ctx, apiCallTimeout)
	out, err := ic.GetSerialPortOutput(cctx, &computepb.GetSerialPortOutputInstanceRequest{
		Project: s.Project, Zone: zone, Instance: name,
		Port: proto.Int32(passwordPort), Start: proto.Int64(sec.serialNext),
	}, noRetry)
	cancel()
	if err != nil {
		err = p.throttle(classify(err, zone))
		if providers.IsNotFound(err) {
			return "", providers.NotFound(instanceID(zone, name))
		}
		return "", fmt.Errorf("read serial port %d: %w", passwordPort, err)
	}
	if out.GetStart() != sec.serialNext {
		sec.partial = "" // the buffer rolled over; a cut line is lost
	}
	lines := strings.Split(sec.partial+out.GetContents(), "\n")
	sec.partial = lines[len(lines)-1]
	sec.serialNext = out.GetNext()
	mod := sec.modulus()
	for _, line := range lines[:len(lines)-1] {
		var c windowsCreds
		if json.Unmarshal([]byte(strings.TrimSpace(line)), &c) != nil || c.Modulus != mod {
			continue
		}
		if !c.PasswordFound {
			return "", providers.Permanent(fmt.Errorf("guest agent could not set the password of %s: %s", c.UserName, c.ErrorMessage))
		}
		pw, err := sec.decryptPassword(c)
		if err != nil {
			return "", providers.Permanent(err)
		}
		sec.password = pw
		return pw, nil
	}
	return "", nil
}
