package gitlab

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// Defaults of a JobTrace.
const (
	// DefaultTraceInterval is how often the trace is sent unless GitLab steers it.
	DefaultTraceInterval = 3 * time.Second
	// DefaultForceSendInterval is the silence after which a PUT state=running heartbeat is sent.
	DefaultForceSendInterval = 30 * time.Second
	// DefaultOutputLimit caps the trace (gitlab-runner's output_limit default, 4096 KiB).
	DefaultOutputLimit = 4 << 20
	// DefaultFinalUpdateTimeout bounds Finish.
	DefaultFinalUpdateTimeout = 5 * time.Minute
	// DefaultMaxFinalAttempts bounds the PUT attempts of Finish.
	DefaultMaxFinalAttempts = 200
)

var (
	// ErrJobAborted is wrapped by Finish's error when GitLab refused the final
	// update because the job is no longer running (canceled, failed, 403/404):
	// the expected end of a canceled job.
	ErrJobAborted = errors.New("job aborted by GitLab")
	// ErrTraceClosed is returned by Write after Finish started.
	ErrTraceClosed = errors.New("job trace closed")
	// ErrTraceAbandoned is wrapped by Finish after Abandon.
	ErrTraceAbandoned = errors.New("job trace abandoned")
)

// TraceOptions tune a JobTrace; zero fields take the defaults.
type TraceOptions struct {
	// Interval between trace uploads until GitLab sends X-GitLab-Trace-Update-Interval.
	Interval time.Duration
	// ForceSendInterval is the silence (no successful PATCH or PUT) after which a heartbeat is sent.
	ForceSendInterval time.Duration
	// OutputLimit caps the trace in bytes; output beyond it is dropped after a notice.
	OutputLimit int
	// FinalUpdateTimeout bounds Finish in time.
	FinalUpdateTimeout time.Duration
	// MaxFinalAttempts bounds Finish in count.
	MaxFinalAttempts int
	// ObservePatch, if set, is called with the duration of every PATCH of
	// the trace (for the job's phase timings).
	ObservePatch func(time.Duration)
	// Acked, if set, is called with the trace offset GitLab acknowledged
	// after every PATCH it accepted.
	Acked func(offset int)
}

func (o TraceOptions) withDefaults() TraceOptions {
	if o.Interval <= 0 {
		o.Interval = DefaultTraceInterval
	}
	if o.ForceSendInterval <= 0 {
		o.ForceSendInterval = DefaultForceSendInterval
	}
	if o.OutputLimit <= 0 {
		o.OutputLimit = DefaultOutputLimit
	}
	if o.FinalUpdateTimeout <= 0 {
		o.FinalUpdateTimeout = DefaultFinalUpdateTimeout
	}
	if o.MaxFinalAttempts <= 0 {
		o.MaxFinalAttempts = DefaultMaxFinalAttempts
	}
	return o
}

// JobTrace uploads one job's trace. The job lifecycle writes already-masked
// output into it (io.Writer, safe for concurrent use); a goroutine sends the
// unsent bytes every interval, resynchronises on 416, reports cancellation
// through Canceled, and heartbeats with PUT state=running after silence.
// Finish sends the rest and the final state. The goroutine ends when Finish
// is called or the context given to StartJobTrace is done.
type JobTrace struct {
	c     *Client
	id    int64
	token string
	opts  TraceOptions
	log   *slog.Logger

	mu          sync.Mutex
	buf         []byte // the whole trace, append-only
	truncated   bool
	closed      bool // Finish started, or abandoned: no more writes
	abandoned   bool
	sent        int // bytes GitLab acknowledged
	interval    time.Duration
	lastSuccess time.Time
	aborted     bool
	jobStatus   string

	canceled   chan struct{}
	cancelOnce sync.Once

	sendMu     sync.Mutex // serialises uploads: loop, Flush, Finish
	cancelLoop context.CancelFunc
	loopDone   chan struct{}
	wake       chan struct{} // FlushSoon: send without waiting for the interval
	abandonCh  chan struct{} // closed by Abandon: a Finish in progress gives up
}

// StartJobTrace starts uploading the trace of job id (jobToken is the job's
// token). The upload goroutine stops on Finish or when ctx is done; the
// caller must do one of the two.
func (c *Client) StartJobTrace(ctx context.Context, id int64, jobToken string, opts TraceOptions) (*JobTrace, error) {
	switch {
	case id <= 0:
		return nil, fmt.Errorf("start job trace: id must be positive, got %d", id)
	case jobToken == "":
		return nil, fmt.Errorf("start job trace of job %d: job token is empty", id)
	}
	opts = opts.withDefaults()
	t := &JobTrace{
		c:           c,
		id:          id,
		token:       jobToken,
		opts:        opts,
		log:         c.log.With("job", id),
		buf:         make([]byte, 0, min(opts.OutputLimit, 64<<10)),
		interval:    opts.Interval,
		lastSuccess: c.clock.Now(),
		canceled:    make(chan struct{}),
		loopDone:    make(chan struct{}),
		wake:        make(chan struct{}, 1),
		abandonCh:   make(chan struct{}),
	}
	loopCtx, cancel := context.WithCancel(ctx)
	t.cancelLoop = cancel
	go t.run(loopCtx)
	return t, nil
}

// Write appends p to the trace. Past the output limit it writes a notice
// once and drops the rest, still reporting len(p) so the job goes on.
func (t *JobTrace) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return 0, ErrTraceClosed
	}
	if t.truncated {
		return len(p), nil
	}
	room := t.opts.OutputLimit - len(t.buf)
	if len(p) <= room {
		t.grow(len(p))
		t.buf = append(t.buf, p...)
		return len(p), nil
	}
	t.grow(room + truncationNoticeRoom)
	t.buf = append(t.buf, cutUTF8(p, room)...)
	t.buf = append(t.buf, LimitNotice(t.opts.OutputLimit)...)
	t.truncated = true
	t.log.Warn("job trace truncated", "limit", t.opts.OutputLimit)
	return len(p), nil
}

// truncationNoticeRoom is what the truncation notice may take beyond the limit.
const truncationNoticeRoom = 256

// LimitNotice is what ends a trace that reached its output limit of limit
// bytes: gitlab-runner's notice, word for word and in its colours (bold
// yellow, then reset), so that what users and their tools look for in a
// truncated log is there.
func LimitNotice(limit int) string {
	return fmt.Sprintf("\n\x1b[33;1mJob's log exceeded limit of %d bytes.\n"+
		"Job execution will continue but no more output will be collected.\x1b[0;m\n", limit)
}

// cutUTF8 returns p cut to n bytes, less the start of a UTF-8 character
// the cut would split (as gitlab-runner cuts); bytes that are not UTF-8
// are cut where n says.
func cutUTF8(p []byte, n int) []byte {
	p = p[:n]
	for i := 1; i <= utf8.UTFMax-1 && i <= len(p); i++ {
		if utf8.RuneStart(p[len(p)-i]) {
			if !utf8.FullRune(p[len(p)-i:]) {
				return p[:len(p)-i]
			}
			return p
		}
	}
	return p
}

// grow makes room for n more bytes, doubling the buffer (append grows large
// slices by only 1.25x, which costs several copies of a 4 MiB trace) but
// never far beyond the output limit. t.mu must be held.
func (t *JobTrace) grow(n int) {
	need := len(t.buf) + n
	if need <= cap(t.buf) {
		return
	}
	c := max(2*cap(t.buf), need)
	c = max(min(c, t.opts.OutputLimit+truncationNoticeRoom), need)
	nb := make([]byte, len(t.buf), c)
	copy(nb, t.buf)
	t.buf = nb
}

// Canceled is closed when GitLab asked to cancel the job (Job-Status
// canceling) or refused it further updates (403, Job-Status canceled/failed).
func (t *JobTrace) Canceled() <-chan struct{} { return t.canceled }

// Aborted reports whether GitLab refused the job further updates.
func (t *JobTrace) Aborted() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.aborted
}

// JobStatus returns the last Job-Status GitLab sent ("" if none).
func (t *JobTrace) JobStatus() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.jobStatus
}

// Interval returns the current upload interval.
func (t *JobTrace) Interval() time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.interval
}

// Len returns the trace's length in bytes (notice included).
func (t *JobTrace) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.buf)
}

// Sent returns how many bytes GitLab has acknowledged.
func (t *JobTrace) Sent() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.sent
}

// Abandon stops the trace without a word to GitLab: the upload goroutine
// ends, later writes are dropped and Finish refuses. A manager handing its
// jobs over to the next one abandons their traces; the next one writes
// them again.
func (t *JobTrace) Abandon() {
	t.mu.Lock()
	t.closed = true
	first := !t.abandoned
	t.abandoned = true
	t.mu.Unlock()
	if first {
		close(t.abandonCh)
	}
	t.cancelLoop()
	<-t.loopDone
	t.c.ForgetJob(t.id)
}

// FlushSoon asks the upload goroutine to send the unsent trace now rather
// than at the next interval, without waiting for it: the first output of a
// job's script reaches GitLab at once.
func (t *JobTrace) FlushSoon() {
	select {
	case t.wake <- struct{}{}:
	default:
	}
}

// Flush sends the unsent trace now and reports whether all of it was accepted.
func (t *JobTrace) Flush(ctx context.Context) error {
	t.sendMu.Lock()
	defer t.sendMu.Unlock()
	if t.Aborted() {
		return fmt.Errorf("flush trace of job %d: %w", t.id, ErrJobAborted)
	}
	switch r := t.flushLocked(ctx); r {
	case flushDone:
		return nil
	case flushAborted:
		return fmt.Errorf("flush trace of job %d: %w", t.id, ErrJobAborted)
	default:
		return fmt.Errorf("flush trace of job %d: %s, %d of %d bytes sent", t.id, r, t.Sent(), t.Len())
	}
}

// run is the upload goroutine; ctx is cancelled by Finish.
func (t *JobTrace) run(ctx context.Context) {
	defer close(t.loopDone)
	defer t.cancelLoop()
	timer := time.NewTimer(t.Interval())
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		case <-t.wake:
			timer.Stop() // Reset below; since Go 1.23 no stale tick is left
		}
		t.tick(ctx)
		if t.Aborted() {
			return // GitLab takes no more updates; Finish still reports the end
		}
		timer.Reset(t.Interval())
	}
}

// tick sends the unsent trace and, after a silence, a heartbeat.
func (t *JobTrace) tick(ctx context.Context) {
	t.sendMu.Lock()
	defer t.sendMu.Unlock()
	if t.Aborted() {
		return
	}
	if t.flushLocked(ctx) != flushDone {
		return
	}
	t.mu.Lock()
	silent := t.c.clock.Now().Sub(t.lastSuccess) > t.opts.ForceSendInterval
	t.mu.Unlock()
	if silent {
		t.heartbeat(ctx)
	}
}

type flushResult int

const (
	flushDone flushResult = iota
	flushPending
	flushNotFound
	flushAborted
)

func (r flushResult) String() string {
	return [...]string{"done", "pending", "not found", "aborted"}[r]
}

// flushLocked PATCHes the unsent bytes in chunks; sendMu must be held.
func (t *JobTrace) flushLocked(ctx context.Context) flushResult {
	for {
		t.mu.Lock()
		start := t.sent
		chunk := t.buf[start:min(len(t.buf), start+MaxTraceChunk)]
		t.mu.Unlock()
		if len(chunk) == 0 {
			return flushDone
		}
		began := t.c.clock.Now()
		res, err := t.c.PatchTrace(ctx, t.id, t.token, start, chunk)
		if t.opts.ObservePatch != nil {
			t.opts.ObservePatch(t.c.clock.Now().Sub(began))
		}
		t.applyRemote(res.StatusCode, res.UpdateInterval, res.JobStatus)
		if err != nil {
			t.log.Warn("patch trace failed", "offset", start, "error", err)
			return flushPending
		}
		switch res.State {
		case PatchSucceeded:
			t.mu.Lock()
			t.sent = res.NewOffset
			t.lastSuccess = t.c.clock.Now()
			t.mu.Unlock()
			if t.opts.Acked != nil {
				t.opts.Acked(res.NewOffset)
			}
		case PatchRangeMismatch:
			t.mu.Lock()
			t.sent = min(res.NewOffset, len(t.buf))
			t.mu.Unlock()
			t.log.Warn("patch trace: range mismatch, resuming", "offset", start, "resume_at", res.NewOffset)
			return flushPending
		case PatchNotFound:
			t.log.Warn("patch trace: job not found, keeping on", "offset", start)
			return flushNotFound
		case PatchAborted:
			t.abort(res.JobStatus)
			return flushAborted
		default:
			t.log.Warn("patch trace: will retry", "offset", start, "status", res.StatusCode)
			return flushPending
		}
	}
}

// heartbeat sends PUT state=running so GitLab knows a silent job is alive.
func (t *JobTrace) heartbeat(ctx context.Context) {
	res, err := t.c.UpdateJob(ctx, t.id, runnerapi.UpdateJobRequest{Token: t.token, State: runnerapi.StateRunning})
	t.applyRemote(res.StatusCode, res.UpdateInterval, res.JobStatus)
	if err != nil {
		t.log.Warn("heartbeat failed", "error", err)
		return
	}
	switch res.State {
	case UpdateSucceeded:
		t.mu.Lock()
		t.lastSuccess = t.c.clock.Now()
		t.mu.Unlock()
	case UpdateAborted:
		t.abort(res.JobStatus)
	default:
		t.log.Warn("heartbeat not accepted", "status", res.StatusCode)
	}
}

// applyRemote takes the interval and Job-Status of an answer into account.
func (t *JobTrace) applyRemote(status int, interval time.Duration, jobStatus string) {
	if status == 0 {
		return
	}
	t.mu.Lock()
	if interval > 0 && interval != t.interval {
		t.log.Debug("trace update interval changed", "interval", interval)
		t.interval = interval
	}
	if jobStatus != "" {
		t.jobStatus = jobStatus
	}
	t.mu.Unlock()
	if jobStatus == runnerapi.StateCanceling {
		t.signalCancel("cancel requested")
	}
}

// abort records that GitLab refuses further updates and signals cancellation.
func (t *JobTrace) abort(jobStatus string) {
	t.mu.Lock()
	t.aborted = true
	if jobStatus != "" {
		t.jobStatus = jobStatus
	}
	t.mu.Unlock()
	t.signalCancel("aborted by GitLab")
}

func (t *JobTrace) signalCancel(why string) {
	t.cancelOnce.Do(func() {
		t.log.Info("job "+why, "job_status", t.JobStatus())
		close(t.canceled)
	})
}

// Finish stops the upload goroutine, sends the remaining trace and the final
// PUT (state success or failed, failureReason, exitCode, output checksum and
// bytesize of the whole trace). It re-sends on 202 and 5xx after the interval,
// re-sends the whole trace on 412, and gives up with an error after
// FinalUpdateTimeout or MaxFinalAttempts. When GitLab answers that the job is
// no longer running the error wraps ErrJobAborted. Finish may be called once.
func (t *JobTrace) Finish(ctx context.Context, state, failureReason string, exitCode int) error {
	if state != runnerapi.StateSuccess && state != runnerapi.StateFailed {
		return fmt.Errorf("finish job %d: state must be %q or %q, got %q", t.id, runnerapi.StateSuccess, runnerapi.StateFailed, state)
	}
	t.mu.Lock()
	if t.abandoned {
		t.mu.Unlock()
		return fmt.Errorf("finish job %d: %w", t.id, ErrTraceAbandoned)
	}
	if t.closed {
		t.mu.Unlock()
		return fmt.Errorf("finish job %d: already finished", t.id)
	}
	t.closed = true
	t.interval = t.opts.Interval // let the server steer the final loop afresh
	trace := t.buf
	t.mu.Unlock()
	// Interrupting an upload in flight is safe: the trace is re-sent from
	// the last acknowledged offset, which GitLab overwrites.
	t.cancelLoop()
	<-t.loopDone
	defer t.c.ForgetJob(t.id)

	t.sendMu.Lock()
	defer t.sendMu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, t.opts.FinalUpdateTimeout)
	defer cancel()
	go func() { // a Finish in progress gives up when the trace is abandoned
		select {
		case <-t.abandonCh:
			cancel()
		case <-ctx.Done():
		}
	}()
	deadline := t.c.clock.Now().Add(t.opts.FinalUpdateTimeout)
	sum := runnerapi.TraceChecksum(trace)
	req := runnerapi.UpdateJobRequest{
		Token:         t.token,
		State:         state,
		FailureReason: failureReason,
		Checksum:      sum,
		Output:        runnerapi.JobTraceOutput{Checksum: sum, Bytesize: len(trace)},
		ExitCode:      exitCode,
	}
	var last string
	for attempt := 1; ; attempt++ {
		sendUpdate := true
		if !t.Aborted() {
			if r := t.flushLocked(ctx); r == flushPending {
				last, sendUpdate = fmt.Sprintf("trace not fully sent (%d of %d bytes)", t.Sent(), len(trace)), false
			}
		}
		if sendUpdate {
			res, err := t.c.UpdateJob(ctx, t.id, req)
			t.applyRemote(res.StatusCode, res.UpdateInterval, res.JobStatus)
			switch {
			case err != nil:
				last = err.Error()
			case res.State == UpdateSucceeded:
				t.log.Info("job finished", "state", state, "failure_reason", failureReason,
					"exit_code", exitCode, "bytesize", len(trace), "attempts", attempt)
				return nil
			case res.State == UpdateAborted:
				t.abort(res.JobStatus)
				return fmt.Errorf("final update of job %d (state %s): %w (status %d, job status %q)",
					t.id, state, ErrJobAborted, res.StatusCode, res.JobStatus)
			case res.State == UpdateTraceValidationFailed:
				t.mu.Lock()
				t.sent = 0
				t.mu.Unlock()
				last = "trace validation failed (412), re-sending the whole trace"
				t.log.Warn("final update: " + last)
			default:
				last = fmt.Sprintf("status %d (%s)", res.StatusCode, res.State)
			}
		}
		now := t.c.clock.Now()
		if attempt >= t.opts.MaxFinalAttempts || !now.Before(deadline) {
			return fmt.Errorf("final update of job %d (state %s): gave up after %d attempts: %s", t.id, state, attempt, last)
		}
		if err := t.c.clock.Sleep(ctx, min(t.Interval(), deadline.Sub(now))); err != nil {
			return fmt.Errorf("final update of job %d (state %s): %w (last: %s)", t.id, state, err, last)
		}
	}
}
