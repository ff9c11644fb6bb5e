package aws

import (
	"strings"

	"golang.org/x/crypto/ssh"
)

// Markers of the block in which cloud-init prints the instance's SSH host
// public keys to the console at first boot.
const (
	hostKeysBegin = "-----BEGIN SSH HOST KEY KEYS-----"
	hostKeysEnd   = "-----END SSH HOST KEY KEYS-----"
)

// hostKeyPreference orders the host key algorithms ConnectInfo pins.
var hostKeyPreference = []string{ssh.KeyAlgoED25519, ssh.KeyAlgoECDSA256, ssh.KeyAlgoECDSA384, ssh.KeyAlgoECDSA521, ssh.KeyAlgoRSA}

// parseHostKey returns the preferred host key from the first complete
// host-key block of console output, in authorized_keys form ("type
// base64"), or "" when there is none yet.
//
// Only the first block counts: it is written by cloud-init at first boot,
// before any job runs, whereas anything later on the console could come
// from a job.
func parseHostKey(console string) string {
	_, rest, ok := strings.Cut(console, hostKeysBegin)
	if !ok {
		return ""
	}
	block, _, ok := strings.Cut(rest, hostKeysEnd)
	if !ok {
		return ""
	}
	found := map[string]string{}
	for line := range strings.Lines(block) {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(line))
		if err != nil {
			continue
		}
		if _, dup := found[pub.Type()]; !dup {
			found[pub.Type()] = strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub)))
		}
	}
	for _, alg := range hostKeyPreference {
		if k, ok := found[alg]; ok {
			return k
		}
	}
	return ""
}
