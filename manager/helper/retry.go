package helper

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"
)

// How the helper's calls to GitLab (artifact upload and download) ride out
// GitLab being away. gitlab-runner's helper gives up on an artifact upload
// after 6 tries while GitLab answers 503 (3 on other errors) with 1 to 5 s
// between them, so a GitLab restart or a minute of 503s fails jobs whose
// script succeeded. mayfly's helper keeps trying transient failures (5xx,
// 429, 408, a connection refused or cut) for a time budget instead, with
// exponential backoff capped at gitlabMaxRetryWait and GitLab's Retry-After
// respected, so it rides out an outage of several minutes; 403 and 413 still
// fail at once, and other answers after gitlab-runner's 3 tries.
const (
	// GitLabRetryBudget bounds the time one transfer spends retrying.
	GitLabRetryBudget = 5 * time.Minute
	// GitLabMaxRetryWait caps one pause (but for a longer Retry-After).
	GitLabMaxRetryWait = 15 * time.Second
)

// transient marks a failure worth retrying within the budget: GitLab away
// or overloaded. after is its Retry-After, if it sent one.
type transient struct {
	err   error
	after time.Duration
}

func (e transient) Error() string { return e.err.Error() }
func (e transient) Unwrap() error { return e.err }

// transientStatus returns a transient error for a transient answer (5xx,
// 429, 408) with its Retry-After, or err unchanged.
func transientStatus(resp *http.Response, err error, now time.Time) error {
	if resp == nil || !isTransient(resp.StatusCode) {
		return err
	}
	return transient{err: err, after: retryAfter(resp.Header.Get("Retry-After"), now)}
}

// retryAfter reads a Retry-After header: seconds or an HTTP date; 0 when
// absent or unreadable.
func retryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if n, err := strconv.Atoi(v); err == nil {
		return time.Duration(max(n, 0)) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(t.Sub(now), 0)
	}
	return 0
}

// retry calls f until it succeeds or fails with an error that is neither
// transient nor retryable: a retryable error (a storage or GitLab answer
// that may be right next time) is retried up to tries times in all, a
// transient one (GitLab away) until the budget (c.retryBudget, default
// 5 min, counted from the first call) is spent. Pauses start at
// c.retryWait and double up to c.retryMaxWait (default 15 s); a
// Retry-After replaces the pause, within what is left of the budget.
// Every transfer of the helper, to GitLab or to a cache store, retries
// through it.
func retry(ctx context.Context, c *cli, what string, tries int, f func(attempt int) error) error {
	budget := c.retryBudget
	if budget <= 0 {
		budget = GitLabRetryBudget
	}
	maxWait := c.retryMaxWait
	if maxWait <= 0 {
		maxWait = GitLabMaxRetryWait
	}
	start := time.Now()
	deadline := start.Add(budget)
	wait := max(c.retryWait, time.Millisecond)
	otherFailures := 0
	for attempt := 1; ; attempt++ {
		err := f(attempt)
		if err == nil {
			return nil
		}
		var tr transient
		var re retryable
		switch {
		case ctx.Err() != nil:
			return err
		case errors.As(err, &tr):
		case errors.As(err, &re):
			if otherFailures++; otherFailures >= tries {
				return err
			}
		default:
			return err
		}
		pause := wait
		if tr.after > 0 {
			pause = tr.after
		}
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Errorf("%w (gave up after %d attempts in %s)", err, attempt, time.Since(start).Round(time.Second))
		}
		pause = min(pause, left)
		c.logf("WARNING: %s: %v; retrying in %s (attempt %d; giving up %s after the first)", what, err, pause.Round(time.Millisecond), attempt+1, budget)
		if err := sleepCtx(ctx, pause); err != nil {
			return err
		}
		wait = min(wait*2, maxWait)
	}
}
