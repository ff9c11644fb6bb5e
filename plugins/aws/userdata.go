package aws

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"mime/multipart"
	"net/textproto"
)

// linuxUserData returns the base64 user data that authorises key for the
// image's default user through cloud-init. When extra (the user_data
// setting) is set, both go in a MIME multipart archive, which cloud-init
// processes part by part.
func linuxUserData(key, extra string) (string, error) {
	cloudConfig := "#cloud-config\nssh_authorized_keys:\n  - " + key + "\n"
	if extra == "" {
		return base64.StdEncoding.EncodeToString([]byte(cloudConfig)), nil
	}
	typ, err := userDataType(extra)
	if err != nil {
		return "", fmt.Errorf("user_data: %w", err)
	}
	var body bytes.Buffer
	w := multipart.NewWriter(&body)
	for _, part := range []struct{ typ, text string }{{"text/cloud-config", cloudConfig}, {typ, extra}} {
		h := textproto.MIMEHeader{}
		h.Set("Content-Type", part.typ+`; charset="utf-8"`)
		h.Set("MIME-Version", "1.0")
		pw, err := w.CreatePart(h)
		if err != nil {
			return "", err
		}
		if _, err := pw.Write([]byte(part.text)); err != nil {
			return "", err
		}
	}
	if err := w.Close(); err != nil {
		return "", err
	}
	var out bytes.Buffer
	fmt.Fprintf(&out, "Content-Type: multipart/mixed; boundary=%q\nMIME-Version: 1.0\n\n", w.Boundary())
	out.Write(body.Bytes())
	return base64.StdEncoding.EncodeToString(out.Bytes()), nil
}
