package helper

import (
	"context"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/mayfly-ci/mayfly/manager/helper/archive"
)

// Tries of an artifacts transfer on answers that are not transient (as
// gitlab-runner's helper makes them: 3); transient ones (GitLab away) are
// retried for a time budget instead, see retry.
const (
	artifactTries            = 3
	defaultArtifactsBaseName = "artifacts"
)

// apiBase turns a GitLab URL (with or without /api/v4, a trailing / or
// /ci) into its API base.
func apiBase(raw string) (string, error) {
	u, err := url.Parse(strings.TrimSpace(raw))
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", fmt.Errorf("--url %q: want GitLab's http(s) URL", raw)
	}
	p := strings.TrimRight(u.Path, "/")
	p = strings.TrimSuffix(p, "/api/v4")
	p = strings.TrimSuffix(p, "/ci")
	u.Path, u.RawQuery = p+"/api/v4", ""
	return u.String(), nil
}

// expand replaces $VAR and ${VAR} from env, as gitlab-runner expands
// artifact names and paths.
func expand(s string, env Env) string { return os.Expand(s, func(k string) string { return env(k) }) }

type jobFlags struct {
	url, token string
	id         int64
}

func (j *jobFlags) register(c *cli, fs interface {
	StringVar(*string, string, string, string)
	Int64Var(*int64, string, int64, string)
}) {
	fs.StringVar(&j.url, "url", "", "GitLab's URL")
	fs.StringVar(&j.token, "token", "", "job token (default $CI_JOB_TOKEN)")
	fs.Int64Var(&j.id, "id", 0, "job ID")
}

func (j *jobFlags) check(c *cli) (string, error) {
	if j.token == "" {
		j.token = c.env("CI_JOB_TOKEN")
	}
	if j.token == "" || j.id <= 0 {
		return "", errors.New("missing runner credentials: --id and --token (or CI_JOB_TOKEN) are required")
	}
	return apiBase(j.url)
}

func runArtifactsUploader(ctx context.Context, c *cli, args []string) error {
	fs := newFlags(c, "artifacts-uploader")
	var (
		job                      jobFlags
		paths, exclude           strList
		untracked                bool
		name, expireIn, format   string
		typ                      string
		level                    = int(archive.LevelDefault)
		maxRedirectsBeforeFailed = 3
	)
	job.register(c, fs)
	fs.Var(&paths, "path", "glob of files to archive; repeatable")
	fs.Var(&exclude, "exclude", "glob of files to leave out; repeatable")
	fs.BoolVar(&untracked, "untracked", false, "add the files git does not track")
	fs.StringVar(&name, "name", defaultArtifactsBaseName, "name of the archive")
	fs.StringVar(&expireIn, "expire-in", "", "when the artifacts expire, as GitLab reads it")
	fs.StringVar(&format, "artifact-format", archive.FormatZip, "zip, gzip or raw")
	fs.StringVar(&typ, "artifact-type", "archive", "archive or a report type (junit, dotenv, …)")
	fs.IntVar(&level, "compression-level", level, "flate level: -1 default, 1 fastest … 9 smallest")
	if err := parse(fs, args); err != nil {
		return err
	}
	base, err := job.check(c)
	if err != nil {
		return err
	}
	wd, err := absWD()
	if err != nil {
		return err
	}
	sel := archive.Selection{Dir: wd, Untracked: untracked}
	for _, p := range paths {
		sel.Paths = append(sel.Paths, expand(p, c.env))
	}
	for _, p := range exclude {
		sel.Exclude = append(sel.Exclude, expand(p, c.env))
	}
	entries, err := archive.Select(ctx, sel, c.logf)
	if err != nil {
		return err
	}
	if len(entries) == 0 {
		c.logf("ERROR: No files to upload")
		return nil
	}
	filename := artifactFilename(expand(name, c.env), format)
	client := newHTTPClient()
	q := url.Values{}
	if expireIn != "" {
		q.Set("expire_in", expireIn)
	}
	q.Set("artifact_format", format)
	q.Set("artifact_type", typ)
	endpoint := fmt.Sprintf("%s/jobs/%d/artifacts?%s", base, job.id, q.Encode())
	redirects := 0
	what := fmt.Sprintf("Uploading artifacts as %q to coordinator", typ)
	err = retry(ctx, c, what, artifactTries, func(int) error {
		for {
			status, location, header, err := uploadOnce(ctx, client, endpoint, job.token, filename, format, wd, entries, archive.CompressionLevel(level))
			var aerr archiveError
			switch {
			case errors.Is(err, archive.ErrTooManyRawFiles):
				return err
			case errors.As(err, &aerr):
				return retryable{err}
			case err != nil:
				// No answer: GitLab is down, restarting or out of reach.
				return transient{err: err}
			case status == http.StatusCreated:
				c.logf("Uploading artifacts as %q to coordinator... 201 Created  id=%d responseStatus=201 Created", typ, job.id)
				return nil
			case status == http.StatusTemporaryRedirect && location != "" && redirects < maxRedirectsBeforeFailed:
				// GitLab asks to send it elsewhere: same path on that host.
				redirects++
				nu, perr := url.Parse(location)
				if perr != nil {
					return fmt.Errorf("upload redirected to an invalid location %q", location)
				}
				eu, _ := url.Parse(endpoint)
				eu.Scheme, eu.Host = nu.Scheme, nu.Host
				endpoint = eu.String()
				c.logf("Upload request redirected to %s", cleanURL(endpoint))
				continue
			case status == http.StatusForbidden:
				return errors.New("403 Forbidden (is the job still running?)")
			case status == http.StatusRequestEntityTooLarge:
				return errors.New("413 Request Entity Too Large: the archive is larger than GitLab allows")
			}
			serr := fmt.Errorf("%d %s", status, http.StatusText(status))
			if isTransient(status) {
				return transient{err: serr, after: retryAfter(header.Get("Retry-After"), time.Now())}
			}
			return retryable{serr}
		}
	})
	if err != nil {
		return fmt.Errorf("uploading artifacts as %q to coordinator... %w", typ, err)
	}
	return nil
}

// artifactFilename is the file name GitLab gets: name (its base) with the
// format's extension, as gitlab-runner forms it.
func artifactFilename(name, format string) string {
	name = filepath.Base(name)
	if name == "" || name == "." || name == "/" {
		name = "default"
	}
	switch format {
	case archive.FormatZip, "":
		return name + ".zip"
	case archive.FormatGzip:
		return name + ".gz"
	}
	return name
}

// uploadOnce streams one multipart upload: the archive is written into the
// request body as it is sent, never held whole.
func uploadOnce(ctx context.Context, client *http.Client, endpoint, token, filename, format, dir string, entries []archive.Entry, level archive.CompressionLevel) (status int, location string, header http.Header, err error) {
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	done := make(chan error, 1)
	go func() {
		part, err := mw.CreateFormFile("file", filename)
		if err == nil {
			_, err = archive.Write(ctx, part, format, dir, entries, level)
		}
		if err == nil {
			err = mw.Close()
		}
		pw.CloseWithError(err)
		done <- err
	}()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, pr)
	if err != nil {
		pr.CloseWithError(err)
		<-done
		return 0, "", nil, archiveError{err}
	}
	req.Header.Set("Content-Type", mw.FormDataContentType())
	req.Header.Set("JOB-TOKEN", token)
	req.Header.Set("User-Agent", "mayfly-helper "+version())
	resp, err := client.Do(req)
	// The writer stops at once if the request ended early.
	pr.CloseWithError(errors.New("request ended"))
	werr := <-done
	if err != nil {
		if werr != nil && !strings.Contains(werr.Error(), "request ended") {
			return 0, "", nil, archiveError{werr}
		}
		return 0, "", nil, err
	}
	defer resp.Body.Close()
	if werr != nil && resp.StatusCode == http.StatusCreated {
		return 0, "", nil, archiveError{werr}
	}
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusTemporaryRedirect {
		return resp.StatusCode, "", resp.Header, nil
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, resp.Header.Get("Location"), resp.Header, nil
}

// archiveError is a failure to write the archive (a file unreadable, the
// request not made), not of GitLab.
type archiveError struct{ err error }

func (e archiveError) Error() string { return "archive: " + e.err.Error() }
func (e archiveError) Unwrap() error { return e.err }

func runArtifactsDownloader(ctx context.Context, c *cli, args []string) error {
	fs := newFlags(c, "artifacts-downloader")
	var job jobFlags
	job.register(c, fs)
	var maxBytes int64
	fs.Int64Var(&maxBytes, "max-extract-bytes", archive.DefaultMaxBytes, "refuse an archive that would write more than this")
	if err := parse(fs, args); err != nil {
		return err
	}
	base, err := job.check(c)
	if err != nil {
		return err
	}
	wd, err := absWD()
	if err != nil {
		return err
	}
	client := newHTTPClient()
	endpoint := fmt.Sprintf("%s/jobs/%d/artifacts", base, job.id)
	var file *os.File
	err = retry(ctx, c, "Downloading artifacts from coordinator", artifactTries, func(int) error {
		f, found, resp, err := download(ctx, client, endpoint, http.Header{"Job-Token": {job.token}, "User-Agent": {"mayfly-helper " + version()}}, tempDir(c.env))
		switch {
		case err != nil && resp != nil && resp.StatusCode == http.StatusForbidden:
			return fmt.Errorf("downloading artifacts from coordinator... forbidden: %v", err)
		case err != nil && resp != nil && isTransient(resp.StatusCode):
			return transientStatus(resp, err, time.Now())
		case err != nil && errors.As(err, new(retryable)):
			// No answer, or the body cut: GitLab is down, restarting or out of reach.
			return transient{err: err}
		case err != nil:
			return err
		case !found:
			return fmt.Errorf("downloading artifacts from coordinator... not found  id=%d", job.id)
		}
		file = f
		return nil
	})
	if err != nil {
		return err
	}
	defer removeTemp(file)
	c.logf("Downloading artifacts from coordinator... ok  id=%d responseStatus=200 OK", job.id)
	fi, err := file.Stat()
	if err != nil {
		return err
	}
	st, err := archive.ExtractZip(ctx, file, fi.Size(), wd, archive.Limits{MaxBytes: maxBytes}, c.logf)
	if err != nil {
		return fmt.Errorf("extract the artifacts of job %d: %w", job.id, err)
	}
	c.logf("%d files and %d directories extracted (%s)", st.Files+st.Links, st.Dirs, humanBytes(st.Bytes))
	return nil
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
