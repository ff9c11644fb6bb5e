package winrm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"

	"github.com/mayfly-ci/mayfly/vmexec"
)

// Upload writes content to path, creating its directory, through a
// temporary file beside it that replaces path only when its size and SHA-256
// match. path is absolute: C:\dir\file, C:/dir/file, \\server\share\file, or
// /dir/file for pwsh on Linux or macOS. mode is ignored: Windows files have
// no POSIX permission bits. Chunks that fail in transport are sent again, at
// most Target.UploadAttempts times each. When ctx ends the upload stops with a
// *vmexec.AbortedError, and the temporary file may remain.
func (c *Client) Upload(ctx context.Context, path string, content []byte, mode fs.FileMode) error {
	if err := validateUploadPath(path); err != nil {
		return &vmexec.SystemError{Op: "upload", Err: err}
	}
	op := "upload " + path
	if ctx.Err() != nil {
		return &vmexec.AbortedError{Cause: context.Cause(ctx), Killed: true}
	}
	if !c.begin() {
		return &vmexec.SystemError{Op: op, Err: ErrClosed}
	}
	defer c.ops.Done()
	octx, done := c.opContext(ctx)
	defer done()

	u := &uploader{c: c, ctx: ctx, octx: octx, op: op}
	defer u.dropShell()
	tmp := path + ".mayfly-" + newToken() + ".tmp"
	for off := 0; off == 0 || off < len(content); {
		n := min(c.t.UploadChunkSize, len(content)-off)
		script := helperPrelude(psVar{"mayflyTemp", tmp}, psVar{"mayflyOffset", off}, psVar{"mayflyLength", n}) + chunkBody
		if err := u.step(fmt.Sprintf("chunk at offset %d", off), script, base64Lines(content[off:off+n])); err != nil {
			u.cleanup(tmp)
			return err
		}
		off += n
		if n == 0 {
			break
		}
	}
	sum := sha256.Sum256(content)
	script := helperPrelude(psVar{"mayflyTemp", tmp}, psVar{"mayflyPath", path},
		psVar{"mayflyLength", len(content)}, psVar{"mayflySHA256", hex.EncodeToString(sum[:])}) + finalizeBody
	if err := u.step("finalize", script, nil); err != nil {
		u.cleanup(tmp)
		return err
	}
	c.log.Debug("winrm upload done", "path", path, "bytes", len(content), "mode_ignored", mode)
	return nil
}

// uploader runs the steps of one upload in one shell, replacing the shell
// when a step fails in transport.
type uploader struct {
	c         *Client
	ctx, octx context.Context
	op        string
	shellID   string
}

// step runs a helper script with stdin, retrying transport failures.
func (u *uploader) step(name, script string, stdin []byte) error {
	c := u.c
	line, err := encodeCommand(DefaultShell, script)
	if err != nil {
		return &vmexec.SystemError{Op: u.op, Err: fmt.Errorf("%s: %w", name, err)}
	}
	backoff := minBackoff
	var last error
	for attempt := 1; attempt <= c.t.UploadAttempts; attempt++ {
		if attempt > 1 {
			c.log.Debug("winrm upload step failed, retrying", "step", name, "attempt", attempt, "err", last)
			if !sleep(u.octx, backoff) {
				break
			}
			backoff = min(2*backoff, maxBackoff)
		}
		if u.shellID == "" {
			id, err := c.createShell(u.octx)
			if err != nil {
				last = err
				if u.octx.Err() != nil || errors.Is(err, ErrAuth) {
					break
				}
				continue
			}
			u.shellID = id
		}
		stderr := &capWriter{max: maxStderr}
		code, err := c.execute(u.octx, u.shellID, line, stdin, &outputs{stderr: stderr})
		if err == nil {
			if code != 0 {
				return &vmexec.SystemError{Op: u.op, Err: fmt.Errorf("%s: remote exit status %d: %s", name, code, stderr)}
			}
			return nil
		}
		last = err
		kerr := c.kill(u.shellID, err) // a fresh shell for the next attempt
		u.shellID = ""
		if u.octx.Err() != nil {
			return c.failure(u.ctx, u.op, fmt.Errorf("%s: %w", name, err), &kerr)
		}
	}
	return c.failure(u.ctx, u.op, fmt.Errorf("%s: %w", name, last), nil)
}

// cleanup removes the temporary file of a failed upload, best effort.
func (u *uploader) cleanup(tmp string) {
	if u.octx.Err() != nil {
		return // the client is closing or the caller gave up: do not linger
	}
	line, err := encodeCommand(DefaultShell, helperPrelude(psVar{"mayflyTemp", tmp})+cleanupBody)
	if err != nil || u.shellID == "" {
		return
	}
	kctx, cancel := u.c.killContext()
	defer cancel()
	if _, err := u.c.execute(kctx, u.shellID, line, nil, &outputs{}); err != nil {
		u.c.log.Debug("winrm upload clean-up", "temp", tmp, "err", err)
	}
}

// dropShell deletes the upload's shell, if any.
func (u *uploader) dropShell() {
	if u.shellID == "" {
		return
	}
	kctx, cancel := u.c.killContext()
	defer cancel()
	if err := u.c.deleteShell(kctx, u.shellID); err != nil {
		u.c.log.Warn("winrm delete shell after upload", "shell", u.shellID, "err", err)
	}
	u.shellID = ""
}

// capWriter keeps the first max bytes written to it.
type capWriter struct {
	max int
	b   []byte
}

func (w *capWriter) Write(p []byte) (int, error) {
	if room := w.max - len(w.b); room > 0 {
		w.b = append(w.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

func (w *capWriter) String() string { return string(trimSpace(w.b)) }

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}
