package buildscript

import (
	"errors"
	"fmt"
	"os"
	"path"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// CacheURLs are the pre-signed URLs of one cache object.
type CacheURLs struct {
	// Get downloads the archive; Put uploads it with PutHeaders ("Name:
	// value", signed with the URL, to send as they are).
	Get, Put   string
	PutHeaders []string
}

// CacheSigner makes pre-signed URLs for the cache of a project under a
// key (already expanded and sanitized), valid for ttl. The manager holds
// the store's credentials; the URLs are all the job's VM gets.
type CacheSigner interface {
	CacheURLs(projectID int64, key string, ttl time.Duration) (CacheURLs, error)
}

// helperName is the helper's file name on the VM.
func (g *generator) helperName() string {
	if g.windows || g.plan.Shell == ShellPwsh || g.plan.Shell == ShellPowerShell {
		return "mayfly-helper.exe"
	}
	return "mayfly-helper"
}

// SanitizeCacheKey normalizes a cache key as gitlab-runner does: %2F and
// %2E decoded, backslashes made slashes, "." and ".." resolved inside the
// key (never above it), trailing spaces of the last segments dropped.
func SanitizeCacheKey(key string) (string, error) {
	if key == "" {
		return "", nil
	}
	r := strings.NewReplacer("%2f", "/", "%2F", "/", "%2e", ".", "%2E", ".", `\`, "/")
	cleaned := path.Clean("/" + r.Replace(key))
	parts := strings.Split(cleaned[1:], "/")
	n := len(parts)
	for n > 0 {
		parts[n-1] = strings.TrimRightFunc(parts[n-1], unicode.IsSpace)
		if parts[n-1] != "" {
			break
		}
		n--
	}
	out := strings.Join(parts[:n], "/")
	if out == "" {
		return "", fmt.Errorf("cache key %q could not be sanitized", key)
	}
	return out, nil
}

// expand expands $VAR and ${VAR} in s with the job's variables.
func (g *generator) expand(s string) string {
	return os.Expand(s, func(k string) string {
		if k == "$" {
			return "$"
		}
		return g.value(k)
	})
}

// cacheKey is a cache entry's key, expanded and sanitized; ok false skips
// the entry (the reason is already in the script).
func (g *generator) cacheKey(w shellWriter, raw string) (string, bool) {
	if raw == "" {
		raw = path.Join("/", g.job.JobInfo.Name, g.job.GitInfo.Ref)[1:]
	} else {
		raw = g.expand(raw)
	}
	key, err := SanitizeCacheKey(raw)
	switch {
	case err != nil:
		w.warning(err.Error())
		w.notice("Skipping cache extraction due to empty cache key")
		return "", false
	case key != raw:
		w.warning(fmt.Sprintf("cache key %q sanitized to %q", raw, key))
	}
	return key, true
}

// cachePolicy reads a cache entry's policy after expansion; ok false for
// an unknown one (warned in the script).
func (g *generator) cachePolicy(w shellWriter, c runnerapi.Cache) (string, bool) {
	p := g.expand(c.Policy)
	switch p {
	case "":
		return "pull-push", true
	case "pull", "push", "pull-push":
		return p, true
	}
	w.warning(fmt.Sprintf("unknown cache policy %q for %s: want pull, push or pull-push", p, c.Key))
	return "", false
}

// cacheFile is where the helper keeps a cache's archive on the VM.
func (g *generator) cacheFile(key string) string {
	return g.join(g.plan.TmpDir, "cache", key, "cache.zip")
}

// serverURL is GitLab's URL as the job sees it: CI_SERVER_URL from the
// payload, else the runner's url.
func (g *generator) serverURL() string {
	if u := g.value("CI_SERVER_URL"); u != "" {
		return u
	}
	return g.opts.ServerURL
}

// cacheTTL is how long the cache URLs of a job stay valid: the job's
// timeout, plus a margin for the stages after it.
func (g *generator) cacheTTL() time.Duration { return g.plan.JobTimeout + 15*time.Minute }

// restoreCache writes the restore_cache stage: each cache the policy lets
// pull is tried under its key, its fallback_keys, then CACHE_FALLBACK_KEY.
func (g *generator) restoreCache(w shellWriter, caches []runnerapi.Cache) {
	if g.plan.HelperPath == "" {
		w.warning("Extracting cache is not supported by this executor.")
		return
	}
	for _, c := range caches {
		key, ok := g.cacheKey(w, c.Key)
		if !ok {
			continue
		}
		pol, ok := g.cachePolicy(w, c)
		if !ok {
			continue
		}
		if pol == "push" {
			w.notice(fmt.Sprintf("Not downloading cache %s due to policy", key))
			continue
		}
		keys := []string{key}
		for _, fk := range c.FallbackKeys {
			if k, err := SanitizeCacheKey(g.expand(fk)); err == nil && k != "" {
				keys = append(keys, k)
			}
		}
		if fk := g.value("CACHE_FALLBACK_KEY"); fk != "" {
			if strings.HasSuffix(strings.TrimRight(fk, ". "), "-protected") {
				w.warning(fmt.Sprintf("CACHE_FALLBACK_KEY %q not allowed to end in %q", fk, "-protected"))
			} else if k, err := SanitizeCacheKey(fk); err == nil && k != "" {
				keys = append(keys, k)
			}
		}
		args := []string{"cache-extractor"}
		for _, k := range keys {
			args = append(args, "--key", k)
			if g.opts.Cache == nil {
				continue
			}
			urls, err := g.opts.Cache.CacheURLs(g.job.JobInfo.ProjectID, k, g.cacheTTL())
			if err != nil || urls.Get == "" {
				w.warning(fmt.Sprintf("Failed to obtain environment for cache %s: %v", k, errOr(err, "no download URL")))
				args = args[:len(args)-2]
				continue
			}
			args = append(args, "--url", urls.Get)
		}
		if g.opts.Cache == nil {
			args = append(args, "--file", g.cacheFile(key))
		}
		if len(args) == 1 {
			continue
		}
		w.run(g.plan.HelperPath, args...)
		g.plan.NeedsHelper = true
	}
}

// archiveCache writes an archive_cache stage for a job that succeeded
// (ok) or failed: each cache the policy lets push and whose when matches
// is archived and uploaded; a failure is a warning, as in gitlab-runner.
func (g *generator) archiveCache(w shellWriter, caches []runnerapi.Cache, ok bool) {
	if g.plan.HelperPath == "" {
		w.warning("Creating cache is not supported by this executor.")
		return
	}
	for _, c := range caches {
		if !whenMatches(c.When, ok) {
			continue
		}
		key, kok := g.cacheKey(w, c.Key)
		if !kok {
			continue
		}
		pol, pok := g.cachePolicy(w, c)
		if !pok {
			continue
		}
		if pol == "pull" {
			w.notice(fmt.Sprintf("Not uploading cache %s due to policy", key))
			continue
		}
		args := []string{"cache-archiver", "--key", key, "--file", g.cacheFile(key)}
		for _, p := range c.Paths {
			args = append(args, "--path", p)
		}
		if c.Untracked {
			args = append(args, "--untracked")
		}
		if g.opts.MaxCacheArchiveSize != 0 {
			args = append(args, "--max-uploaded-archive-size", strconv.FormatInt(g.opts.MaxCacheArchiveSize, 10))
		}
		if g.opts.Cache != nil {
			urls, err := g.opts.Cache.CacheURLs(g.job.JobInfo.ProjectID, key, g.cacheTTL())
			if err != nil || urls.Put == "" {
				w.warning(fmt.Sprintf("Unable to generate cache upload environment: %v", errOr(err, "no upload URL")))
			} else {
				args = append(args, "--url", urls.Put)
				for _, h := range urls.PutHeaders {
					args = append(args, "--header", h)
				}
			}
		}
		g.plan.NeedsHelper = true
		w.notice(fmt.Sprintf("Creating cache %s...", key))
		w.ifCmdShown(g.plan.HelperPath, args...)
		w.notice("Created cache")
		w.orElse()
		w.warning("Failed to create cache")
		w.endIf()
	}
}

// downloadArtifacts writes the download_artifacts stage: the artifacts of
// every dependency that has some, with the token GitLab sent for it.
func (g *generator) downloadArtifacts(w shellWriter) {
	if g.plan.HelperPath == "" {
		w.warning("Artifacts downloading is not supported by this executor.")
		return
	}
	for _, d := range g.job.Dependencies {
		if d.ArtifactsFile.Filename == "" {
			continue
		}
		w.notice(fmt.Sprintf("Downloading artifacts for %s (%d)...", d.Name, d.ID))
		args := []string{"artifacts-downloader", "--url", g.serverURL(), "--id", strconv.FormatInt(d.ID, 10)}
		if d.Token != "" && d.Token != g.job.Token {
			args = append(args, "--token", d.Token)
		}
		w.run(g.plan.HelperPath, args...)
		g.plan.NeedsHelper = true
	}
}

// uploadArtifacts writes an upload_artifacts stage for a job that
// succeeded (ok) or failed.
func (g *generator) uploadArtifacts(w shellWriter, ok bool) {
	if g.plan.HelperPath == "" {
		w.warning("Uploading artifacts is not supported by this executor.")
		return
	}
	for _, a := range g.job.Artifacts {
		if !whenMatches(a.When, ok) || len(a.Paths) == 0 && !a.Untracked {
			continue
		}
		args := []string{"artifacts-uploader", "--url", g.serverURL(), "--id", strconv.FormatInt(g.job.ID, 10)}
		for _, p := range a.Paths {
			args = append(args, "--path", p)
		}
		for _, p := range a.Exclude {
			args = append(args, "--exclude", p)
		}
		if a.Untracked {
			args = append(args, "--untracked")
		}
		if a.Name != "" {
			args = append(args, "--name", a.Name)
		}
		if a.ExpireIn != "" {
			args = append(args, "--expire-in", a.ExpireIn)
		}
		if a.Format != "" {
			args = append(args, "--artifact-format", a.Format)
		}
		if a.Type != "" {
			args = append(args, "--artifact-type", a.Type)
		}
		w.notice("Uploading artifacts...")
		w.run(g.plan.HelperPath, args...)
		g.plan.NeedsHelper = true
	}
}

func errOr(err error, msg string) error {
	if err != nil {
		return err
	}
	return errors.New(msg)
}
