package pluginkit_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/time/rate"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/pluginkit"
)

func TestSleep(t *testing.T) {
	if err := pluginkit.Sleep(t.Context(), time.Millisecond); err != nil {
		t.Errorf("Sleep(1ms) = %v", err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	begin := time.Now()
	if err := pluginkit.Sleep(ctx, time.Hour); !errors.Is(err, context.Canceled) {
		t.Errorf("Sleep on a canceled context = %v, want context.Canceled", err)
	}
	if d := time.Since(begin); d > 10*time.Second {
		t.Errorf("Sleep on a canceled context took %s", d)
	}
	if err := pluginkit.Sleep(ctx, 0); err != nil {
		t.Errorf("Sleep(0) = %v, want nil", err)
	}
}

// handClock returns a clock that moves only when advanced: its now and
// the func that moves it on.
func handClock() (now func() time.Time, advance func(time.Duration)) {
	var mu sync.Mutex
	t := time.Unix(1_000_000, 0)
	return func() time.Time {
			mu.Lock()
			defer mu.Unlock()
			return t
		}, func(d time.Duration) {
			mu.Lock()
			t = t.Add(d)
			mu.Unlock()
		}
}

func TestPlacementOrder(t *testing.T) {
	now, advance := handClock()
	p := pluginkit.NewPlacement(pluginkit.PlacementOptions{Kind: "zone", Locations: []string{"a", "b", "c"}, Cooldown: time.Minute, Now: now})
	if got := p.Order(); !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Fatalf("fresh order %v", got)
	}
	p.Exhausted("a")
	advance(time.Second)
	if got := p.Order(); !slices.Equal(got, []string{"b", "c", "a"}) {
		t.Errorf("a exhausted: order %v, want [b c a]", got)
	}
	p.Exhausted("c")
	advance(time.Second)
	if got := p.Order(); !slices.Equal(got, []string{"b", "a", "c"}) {
		t.Errorf("a then c exhausted: order %v, want [b a c] (least recently exhausted first)", got)
	}
	advance(58 * time.Second) // a's cooldown is over, c's not
	if got := p.Order(); !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Errorf("after a's cooldown: order %v, want [a b c]", got)
	}
	none := pluginkit.NewPlacement(pluginkit.PlacementOptions{})
	if got := none.Order(); !slices.Equal(got, []string{""}) {
		t.Errorf("no locations: order %q, want one default placement", got)
	}
}

func TestPlacementTry(t *testing.T) {
	noCap := func(loc string) error { return providers.CapacityExhausted(loc, fmt.Errorf("%s is full", loc)) }
	tests := []struct {
		name      string
		locations []string
		answers   map[string]error // by location; missing: success
		scope     string
		wantTried []string
		wantKind  providers.Kind // KindUnknown with wantErr false: success
		wantErr   bool
		wantScope string
	}{
		{"first has room", []string{"a", "b"}, nil, "", []string{"a"}, 0, false, ""},
		{"falls back", []string{"a", "b", "c"}, map[string]error{"a": noCap("a")}, "", []string{"a", "b"}, 0, false, ""},
		{"other error ends the walk", []string{"a", "b"}, map[string]error{"a": providers.QuotaExceeded("r", errors.New("cpus"))},
			"", []string{"a"}, providers.KindQuotaExceeded, true, ""},
		{"all full", []string{"a", "b"}, map[string]error{"a": noCap("a"), "b": noCap("b")}, "",
			[]string{"a", "b"}, providers.KindCapacityExhausted, true, "a,b"},
		{"all full, scope given", []string{"a", "b"}, map[string]error{"a": noCap("a"), "b": noCap("b")}, "us-east-1",
			[]string{"a", "b"}, providers.KindCapacityExhausted, true, "us-east-1"},
		{"no locations: one call, error as is", nil, map[string]error{"": noCap("region")}, "x",
			[]string{""}, providers.KindCapacityExhausted, true, "region"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := pluginkit.NewPlacement(pluginkit.PlacementOptions{Kind: "zone", Locations: tt.locations, Cooldown: time.Minute})
			var tried []string
			err := p.Try(tt.scope, func(loc string, attempt int) error {
				if attempt != len(tried) {
					t.Errorf("attempt %d for the %d. location", attempt, len(tried)+1)
				}
				tried = append(tried, loc)
				return tt.answers[loc]
			})
			if !slices.Equal(tried, tt.wantTried) {
				t.Errorf("tried %q, want %q", tried, tt.wantTried)
			}
			if (err != nil) != tt.wantErr {
				t.Fatalf("Try = %v, want error %v", err, tt.wantErr)
			}
			if err != nil && providers.KindOf(err) != tt.wantKind {
				t.Errorf("Try error %v has kind %s, want %s", err, providers.KindOf(err), tt.wantKind)
			}
			if scope, ok := providers.IsCapacityExhausted(err); ok && tt.wantScope != "" && scope != tt.wantScope {
				t.Errorf("scope %q, want %q", scope, tt.wantScope)
			}
		})
	}
	// A full location is tried last by the next Try.
	p := pluginkit.NewPlacement(pluginkit.PlacementOptions{Locations: []string{"a", "b"}, Cooldown: time.Minute})
	_ = p.Try("", func(loc string, _ int) error {
		if loc == "a" {
			return noCap(loc)
		}
		return nil
	})
	if got := p.Order(); !slices.Equal(got, []string{"b", "a"}) {
		t.Errorf("after a was full: order %v, want [b a]", got)
	}
}

func TestFanOut(t *testing.T) {
	fail := func(kind func(error) error) func(int) error {
		return func(i int) error {
			if i == 1 {
				return kind(fmt.Errorf("call %d", i))
			}
			return nil
		}
	}
	tests := []struct {
		name      string
		n, limit  int
		fail      func(i int) error
		wantMade  int // calls made, with limit 1 (sequential)
		wantKind  providers.Kind
		wantNoErr bool
	}{
		{"all succeed", 5, 1, func(int) error { return nil }, 5, 0, true},
		{"transient is the call's own", 5, 1, fail(providers.Transient), 5, providers.KindTransient, false},
		{"quota stops", 5, 1, fail(func(e error) error { return providers.QuotaExceeded("r", e) }), 2, providers.KindQuotaExceeded, false},
		{"rate limit stops", 5, 1, fail(func(e error) error { return providers.RateLimited(time.Second, e) }), 2, providers.KindRateLimited, false},
		{"capacity stops", 5, 1, fail(func(e error) error { return providers.CapacityExhausted("z", e) }), 2, providers.KindCapacityExhausted, false},
		{"permanent stops", 5, 1, fail(providers.Permanent), 2, providers.KindPermanent, false},
		{"not found goes on", 5, 1, fail(func(e error) error { return providers.NotFound("x") }), 5, providers.KindNotFound, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var made atomic.Int32
			got, err := pluginkit.FanOut(t.Context(), tt.n, tt.limit, func(_ context.Context, i int) (string, error) {
				made.Add(1)
				if err := tt.fail(i); err != nil {
					return "", err
				}
				return fmt.Sprint("id-", i), nil
			})
			if int(made.Load()) != tt.wantMade {
				t.Errorf("%d calls made, want %d", made.Load(), tt.wantMade)
			}
			if tt.wantNoErr {
				if err != nil {
					t.Fatalf("FanOut = %v", err)
				}
			} else if k := providers.KindOf(err); k != tt.wantKind {
				t.Errorf("FanOut error %v has kind %s, want %s", err, k, tt.wantKind)
			}
			wantIDs := int(made.Load())
			if !tt.wantNoErr {
				wantIDs--
			}
			if len(got) != wantIDs {
				t.Errorf("results %q, want %d", got, wantIDs)
			}
		})
	}
}

func TestFanOutBoundedAndKeepsResultsWithErrors(t *testing.T) {
	var inFlight, most atomic.Int32
	got, err := pluginkit.FanOut(t.Context(), 12, 3, func(_ context.Context, i int) (int, error) {
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for {
			m := most.Load()
			if n <= m || most.CompareAndSwap(m, n) {
				break
			}
		}
		time.Sleep(2 * time.Millisecond)
		if i == 4 {
			// A result with an error: an instance whose creation has an
			// unknown outcome must still be tracked.
			return 100 + i, providers.Transient(errors.New("outcome unknown"))
		}
		return 100 + i, nil
	})
	if m := most.Load(); m > 3 {
		t.Errorf("%d calls in flight at most, want up to the limit 3", m)
	}
	if len(got) != 12 || got[0] != 100 || got[11] != 111 {
		t.Errorf("results %v, want 12 in call order", got)
	}
	if !providers.IsTransient(err) || !strings.Contains(err.Error(), "outcome unknown") {
		t.Errorf("error %v, want the transient one", err)
	}
}

func TestFanOutStopsOnContext(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	got, err := pluginkit.FanOut(ctx, 5, 1, func(_ context.Context, i int) (string, error) {
		if i == 1 {
			cancel()
		}
		return fmt.Sprint(i), nil
	})
	if len(got) != 2 {
		t.Errorf("results %q, want the 2 made before the cancel", got)
	}
	if !providers.IsTransient(err) || !strings.Contains(err.Error(), "3 of 5 calls not made") {
		t.Errorf("error %v, want a transient one counting 3 calls not made", err)
	}
}

func TestCheckCreateLabels(t *testing.T) {
	tests := []struct {
		labels  map[string]string
		manager string
		wantErr string
	}{
		{map[string]string{providers.LabelManager: "m"}, "", ""},
		{map[string]string{providers.LabelManager: "m"}, "m", ""},
		{map[string]string{"x": "y"}, "", "lack"},
		{map[string]string{providers.LabelManager: "other"}, "m", "differs"},
		{map[string]string{providers.LabelManager: "m", "Name": "n"}, "", "reserved"},
	}
	for _, tt := range tests {
		err := pluginkit.CheckCreateLabels(tt.labels, tt.manager, "Name")
		switch {
		case tt.wantErr == "" && err != nil:
			t.Errorf("CheckCreateLabels(%v, %q) = %v", tt.labels, tt.manager, err)
		case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
			t.Errorf("CheckCreateLabels(%v, %q) = %v, want an error with %q", tt.labels, tt.manager, err, tt.wantErr)
		case err != nil && providers.KindOf(err) != providers.KindInvalidArgument:
			t.Errorf("CheckCreateLabels error %v has kind %s", err, providers.KindOf(err))
		}
	}
	owned := []struct {
		labels  map[string]string
		manager string
		want    bool
	}{
		{map[string]string{providers.LabelManager: "m"}, "m", true},
		{map[string]string{providers.LabelManager: "m"}, "", true},
		{map[string]string{providers.LabelManager: "m"}, "n", false},
		{map[string]string{providers.LabelManager: ""}, "", false},
		{nil, "", false},
	}
	for _, tt := range owned {
		if got := pluginkit.Owned(tt.labels, tt.manager); got != tt.want {
			t.Errorf("Owned(%v, %q) = %v, want %v", tt.labels, tt.manager, got, tt.want)
		}
	}
}

func TestLimiterBackoff(t *testing.T) {
	now, advance := handClock()
	l := pluginkit.NewLimiter(pluginkit.Throttle{
		ThrottleBackoff:    providers.Duration(time.Second),
		MaxThrottleBackoff: providers.Duration(4 * time.Second),
	}, now)
	retryAfter := func(err error) time.Duration {
		t.Helper()
		d, ok := providers.IsRateLimited(err)
		if !ok {
			t.Fatalf("Throttled returned %v, want a rate_limited error", err)
		}
		return d
	}
	cause := errors.New("slow down")
	var got []time.Duration
	for range 4 {
		got = append(got, retryAfter(l.Throttled("run", 0, cause)))
		advance(l.PauseLeft("run")) // the next call comes after the pause
	}
	if want := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 4 * time.Second}; !slices.Equal(got, want) {
		t.Errorf("pauses of successive throttles %v, want %v (doubling up to the maximum)", got, want)
	}
	// Throttles during a pause do not double the step.
	l.Throttled("run", 0, cause)
	advance(time.Second)
	l.Succeeded("other")
	if d := retryAfter(l.Throttled("run", 0, cause)); d != 4*time.Second {
		t.Errorf("throttle inside a pause: retry-after %s, want the 4s step again, not doubled", d)
	}
	// Other keys are not paused.
	if d := l.PauseLeft("describe"); d != 0 {
		t.Errorf("another key paused for %s", d)
	}
	// A success resets the step; the cloud's Retry-After is the pause when
	// it gives one.
	advance(time.Minute)
	l.Succeeded("run")
	if d := retryAfter(l.Throttled("run", 0, cause)); d != time.Second {
		t.Errorf("after a success: retry-after %s, want the first step again", d)
	}
	advance(time.Minute)
	if d := retryAfter(l.Throttled("run", 7*time.Second, cause)); d != 7*time.Second {
		t.Errorf("with the cloud's Retry-After 7s: retry-after %s", d)
	}
	if st := l.Stats(); st.Throttles != 8 {
		t.Errorf("Stats().Throttles = %d, want 8", st.Throttles)
	}
}

func TestLimiterWait(t *testing.T) {
	l := pluginkit.NewLimiter(pluginkit.Throttle{
		ThrottleBackoff:    providers.Duration(50 * time.Millisecond),
		MaxThrottleBackoff: providers.Duration(time.Second),
	}, nil)
	bucket := rate.NewLimiter(rate.Every(time.Hour), 1)
	if err := l.Wait(t.Context(), "k", pluginkit.Take{Bucket: bucket, N: 1}); err != nil {
		t.Fatalf("first Wait: %v", err)
	}
	// The bucket is empty for an hour: a caller with a short deadline is
	// told how long at once.
	short, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	begin := time.Now()
	err := l.Wait(short, "k", pluginkit.Take{Bucket: bucket, N: 1})
	if d, ok := providers.IsRateLimited(err); !ok || d < 59*time.Minute {
		t.Errorf("Wait on an empty bucket = %v (retry after %s), want rate_limited with about an hour", err, d)
	}
	if time.Since(begin) > 40*time.Millisecond+time.Second {
		t.Errorf("Wait that cannot succeed took %s", time.Since(begin))
	}
	// A paused key: a short deadline gets the pause at once, a longer one
	// waits it out.
	l.Throttled("k", 0, errors.New("throttled"))
	tiny, cancel2 := context.WithTimeout(t.Context(), 5*time.Millisecond)
	defer cancel2()
	if _, ok := providers.IsRateLimited(l.Wait(tiny, "k")); !ok {
		t.Error("Wait inside a pause with a shorter deadline is not rate_limited")
	}
	begin = time.Now()
	if err := l.Wait(t.Context(), "k"); err != nil {
		t.Fatalf("Wait after the pause: %v", err)
	}
	if d := time.Since(begin); d < 30*time.Millisecond {
		t.Errorf("Wait returned after %s inside a 50ms pause", d)
	}
	if l.Stats().Waited <= 0 {
		t.Error("Stats().Waited is zero after a wait")
	}
}

func TestThrottleDefaults(t *testing.T) {
	var th pluginkit.Throttle
	if err := th.Defaults(time.Second, time.Minute); err != nil || th.ThrottleBackoff != providers.Duration(time.Second) || th.MaxThrottleBackoff != providers.Duration(time.Minute) {
		t.Errorf("Defaults on zero: %+v, %v", th, err)
	}
	bad := pluginkit.Throttle{ThrottleBackoff: providers.Duration(time.Minute), MaxThrottleBackoff: providers.Duration(time.Second)}
	if err := bad.Defaults(time.Second, time.Minute); err == nil || !strings.Contains(err.Error(), "max_throttle_backoff") {
		t.Errorf("Defaults with max below first = %v, want an error naming max_throttle_backoff", err)
	}
}

func TestRenameKeys(t *testing.T) {
	aliases := []pluginkit.Alias{
		{Old: "rate_limit", New: "rate_limit.rate", Match: pluginkit.IsNumber},
		{Old: "rate_burst", New: "rate_limit.burst"},
		{Old: "zone_cooldown", New: "capacity_cooldown"},
		{Old: "no_external_ip", New: "external_ip", Convert: pluginkit.Negate},
	}
	tests := []struct {
		in, want string
		warned   []string
		wantErr  string
	}{
		{`{"a": 1}`, `{"a": 1}`, nil, ""},
		{`{"zone_cooldown": "1m"}`, `{"capacity_cooldown": "1m"}`, []string{"zone_cooldown"}, ""},
		{`{"rate_limit": 5, "rate_burst": 9}`, `{"rate_limit": {"rate": 5, "burst": 9}}`, []string{"rate_limit", "rate_burst"}, ""},
		{`{"rate_limit": {"rate": 5}, "rate_burst": 9}`, `{"rate_limit": {"rate": 5, "burst": 9}}`, []string{"rate_burst"}, ""},
		{`{"rate_limit": {"rate": 5}}`, `{"rate_limit": {"rate": 5}}`, nil, ""},
		{`{"no_external_ip": true}`, `{"external_ip": false}`, []string{"no_external_ip"}, ""},
		{`{"zone_cooldown": "1m", "capacity_cooldown": "2m"}`, "", nil, `"zone_cooldown": deprecated name of "capacity_cooldown"`},
		{`{"rate_limit": {"burst": 1}, "rate_burst": 9}`, "", nil, `"rate_burst": deprecated name of "rate_limit.burst"`},
		{`{"no_external_ip": "yes"}`, "", nil, "want true or false"},
		{`[1]`, `[1]`, nil, ""},
	}
	for _, tt := range tests {
		var logs bytes.Buffer
		log := slog.New(slog.NewJSONHandler(&logs, nil))
		got, err := pluginkit.RenameKeys(json.RawMessage(tt.in), log, aliases...)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || providers.KindOf(err) != providers.KindInvalidArgument {
				t.Errorf("RenameKeys(%s) = %s, %v; want an invalid_argument error with %q", tt.in, got, err, tt.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("RenameKeys(%s): %v", tt.in, err)
			continue
		}
		if !jsonEqual(t, got, tt.want) {
			t.Errorf("RenameKeys(%s) = %s, want %s", tt.in, got, tt.want)
		}
		var warned []string
		for line := range strings.Lines(logs.String()) {
			var rec struct {
				Level, Msg, Key string
			}
			_ = json.Unmarshal([]byte(line), &rec)
			if rec.Level == "WARN" && strings.Contains(rec.Msg, "deprecated") {
				warned = append(warned, rec.Key)
			}
		}
		if !slices.Equal(warned, tt.warned) {
			t.Errorf("RenameKeys(%s) warned about %q, want %q", tt.in, warned, tt.warned)
		}
	}
}

func jsonEqual(t *testing.T, got json.RawMessage, want string) bool {
	t.Helper()
	var a, b any
	if err := json.Unmarshal(got, &a); err != nil {
		t.Fatalf("result %s: %v", got, err)
	}
	if err := json.Unmarshal([]byte(want), &b); err != nil {
		t.Fatal(err)
	}
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return string(ja) == string(jb)
}

func TestDecodeSettingsNamesTheDeprecatedKey(t *testing.T) {
	var v struct {
		RateLimit struct {
			Burst int `json:"burst"`
		} `json:"rate_limit"`
	}
	aliases := []pluginkit.Alias{{Old: "rate_burst", New: "rate_limit.burst"}}
	err := pluginkit.DecodeSettings(json.RawMessage(`{"rate_burst": "ten"}`), &v, nil, aliases...)
	if err == nil || !strings.Contains(err.Error(), `"rate_burst"`) || !strings.Contains(err.Error(), "rate_limit.burst") {
		t.Errorf("DecodeSettings with a bad deprecated key = %v, want an error naming both keys", err)
	}
	if providers.KindOf(err) != providers.KindInvalidArgument {
		t.Errorf("kind %s", providers.KindOf(err))
	}
	if err := pluginkit.DecodeSettings(json.RawMessage(`{"rate_burst": 4}`), &v, nil, aliases...); err != nil || v.RateLimit.Burst != 4 {
		t.Errorf("DecodeSettings = %v, burst %d", err, v.RateLimit.Burst)
	}
	if err := pluginkit.DecodeSettings(json.RawMessage(`{"rate_brust": 4}`), &v, nil, aliases...); err == nil || !strings.Contains(err.Error(), "rate_brust") {
		t.Errorf("unknown key: %v", err)
	}
}
