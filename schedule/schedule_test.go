package schedule

import (
	"strings"
	"testing"
	"time"
)

func mustLoc(t testing.TB, name string) *time.Location {
	t.Helper()
	loc, err := time.LoadLocation(name)
	if err != nil {
		t.Fatalf("load location %s: %v", name, err)
	}
	return loc
}

func mustPeriod(t testing.TB, expr string, loc *time.Location) Period {
	t.Helper()
	p, err := ParsePeriod(expr, loc)
	if err != nil {
		t.Fatalf("ParsePeriod(%q): %v", expr, err)
	}
	return p
}

func utc(s string) time.Time {
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		panic(err)
	}
	return t
}

func TestParsePeriodErrors(t *testing.T) {
	tests := []struct {
		expr string
		want string // substring of the error
	}{
		{"", "want 5, 6 or 7 fields"},
		{"* * *", "got 3"},
		{"* * * * * * * *", "got 8"},
		{"@daily", "descriptors"},
		{"* 61 * * * * *", "above maximum"},
		{"* * 24 * * * *", "above maximum"},
		{"* * * 0 * * *", "below minimum"},
		{"* * * * 13 * *", "above maximum"},
		{"* * * * * funday *", "not a day of week"},
		{"* * * * * 8 *", "not a day of week"},
		{"* * * * * 7-3 *", "runs backwards"},
		{"* * * * * sat-sun *", "runs backwards"},
		{"* * * L * * *", "not supported"},
		{"* * * * * 5#3 *", "not supported"},
		{"* * * * * * 1969", "years must lie"},
		{"* * * * * * 2100", "years must lie"},
		{"* * * * * * 2030-2020", "years must lie"},
		{"* * * * * * twenty", "not a year"},
		{"* * * * * * */0", "bad step"},
		{"a b c d e", "period \"a b c d e\""},
	}
	for _, tt := range tests {
		t.Run(tt.expr, func(t *testing.T) {
			_, err := ParsePeriod(tt.expr, time.UTC)
			if err == nil {
				t.Fatalf("ParsePeriod(%q) = nil error, want %q", tt.expr, tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("ParsePeriod(%q) error = %q, want it to contain %q", tt.expr, err, tt.want)
			}
		})
	}
}

func TestPeriodContains(t *testing.T) {
	berlin := mustLoc(t, "Europe/Berlin")
	tests := []struct {
		name string
		expr string
		loc  *time.Location
		at   string
		want bool
	}{
		// gitlab-runner's weekend example. 2026-11-21 is a Saturday.
		{"weekend saturday start", "* * * * * sat,sun *", nil, "2026-11-21T00:00:00Z", true},
		{"weekend sunday end", "* * * * * sat,sun *", nil, "2026-11-22T23:59:59Z", true},
		{"weekend friday", "* * * * * sat,sun *", nil, "2026-11-20T23:59:59Z", false},
		{"weekend monday", "* * * * * sat,sun *", nil, "2026-11-23T00:00:00Z", false},
		// The hosted fleet's nightly spike: 03:30-04:30 UTC in two periods.
		{"spike before", "* 30-59 3 * * * *", nil, "2026-11-23T03:29:59Z", false},
		{"spike start", "* 30-59 3 * * * *", nil, "2026-11-23T03:30:00Z", true},
		{"spike first hour end", "* 30-59 3 * * * *", nil, "2026-11-23T03:59:59Z", true},
		{"spike second part", "* 0-30 4 * * * *", nil, "2026-11-23T04:30:59Z", true},
		{"spike after", "* 0-30 4 * * * *", nil, "2026-11-23T04:31:00Z", false},
		// Working hours in the docs: 9-17 includes hour 17 entirely.
		{"workday 17:59", "* * 9-17 * * mon-fri *", nil, "2026-11-23T17:59:59Z", true},
		{"workday 18:00", "* * 9-17 * * mon-fri *", nil, "2026-11-23T18:00:00Z", false},
		{"workday 08:59", "* * 9-17 * * mon-fri *", nil, "2026-11-23T08:59:59Z", false},
		// Day-of-week 7 is Sunday, as in gitlab-runner's cron library.
		{"dow 7 sunday", "* * * * * 7 *", nil, "2026-11-22T12:00:00Z", true},
		{"dow 5-7 sunday", "* * * * * 5-7 *", nil, "2026-11-22T12:00:00Z", true},
		{"dow 5-7 monday", "* * * * * 5-7 *", nil, "2026-11-23T12:00:00Z", false},
		{"dow 1/3 thursday", "* * * * * 1/3 *", nil, "2026-11-26T12:00:00Z", true},
		{"dow 1/3 sunday", "* * * * * 1/3 *", nil, "2026-11-22T12:00:00Z", false},
		{"dow names any case", "* * * * * Sat,SUN *", nil, "2026-11-22T12:00:00Z", true},
		{"dow 1/3 friday", "* * * * * 1/3 *", nil, "2026-11-27T12:00:00Z", false},
		// Day-of-month and day-of-week both restricted: either matches.
		{"dom or dow: dom", "* * * 1 * mon *", nil, "2026-12-01T12:00:00Z", true},
		{"dom or dow: dow", "* * * 1 * mon *", nil, "2026-11-23T12:00:00Z", true},
		{"dom or dow: neither", "* * * 1 * mon *", nil, "2026-11-24T12:00:00Z", false},
		// 6 fields: minute hour dom month dow year, every second of the minute.
		{"six fields", "30 3 * * * 2026", nil, "2026-11-23T03:30:42Z", true},
		{"six fields other year", "30 3 * * * 2027", nil, "2026-11-23T03:30:42Z", false},
		// 5 fields: unix cron, every second of the minute (taskscaler's form).
		{"five fields", "* 8-15 * * mon-fri", nil, "2026-11-23T15:59:59Z", true},
		{"five fields outside", "* 8-15 * * mon-fri", nil, "2026-11-23T16:00:00Z", false},
		// Years.
		{"year list", "* * * * * * 2025,2027-2029", nil, "2028-01-01T00:00:00Z", true},
		{"year list miss", "* * * * * * 2025,2027-2029", nil, "2026-06-01T00:00:00Z", false},
		{"year step", "* * * * * * 2026/2", nil, "2028-06-01T00:00:00Z", true},
		{"year step miss", "* * * * * * 2026/2", nil, "2027-06-01T00:00:00Z", false},
		// Timezones: 09:00 Berlin is 08:00 UTC in winter and 07:00 UTC in summer.
		{"berlin winter 9:00", "* * 9-17 * * mon-fri *", berlin, "2026-03-27T08:00:00Z", true},
		{"berlin winter 8:30", "* * 9-17 * * mon-fri *", berlin, "2026-03-27T07:30:00Z", false},
		{"berlin summer 9:00", "* * 9-17 * * mon-fri *", berlin, "2026-03-30T07:00:00Z", true},
		{"berlin summer 8:59", "* * 9-17 * * mon-fri *", berlin, "2026-03-30T06:59:59Z", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := mustPeriod(t, tt.expr, tt.loc)
			if got := p.Contains(utc(tt.at)); got != tt.want {
				t.Errorf("%q.Contains(%s) = %v, want %v", tt.expr, tt.at, got, tt.want)
			}
		})
	}
}

// hosted is the schedule of GitLab.com's hosted Linux fleet.
func hosted(t testing.TB) *Schedule {
	return &Schedule{
		Default: Policy{IdleCount: 50, IdleTime: time.Hour},
		Entries: []Entry{
			{Periods: []Period{mustPeriod(t, "* * * * * sat,sun *", time.UTC)}, Policy: Policy{IdleCount: 70, IdleTime: time.Hour}},
			{Periods: []Period{
				mustPeriod(t, "* 30-59 3 * * * *", time.UTC),
				mustPeriod(t, "* 0-30 4 * * * *", time.UTC),
			}, Policy: Policy{IdleCount: 700, IdleTime: time.Hour}},
		},
	}
}

func TestScheduleAt(t *testing.T) {
	s := hosted(t)
	reversed := &Schedule{Default: s.Default, Entries: []Entry{s.Entries[1], s.Entries[0]}}
	tests := []struct {
		name      string
		s         *Schedule
		at        string
		wantIdle  int
		wantEntry int
	}{
		{"weekday default", s, "2026-11-23T12:00:00Z", 50, NoEntry},
		{"weekday spike", s, "2026-11-23T03:45:00Z", 700, 1},
		{"weekend", s, "2026-11-21T12:00:00Z", 70, 0},
		{"weekend spike: last entry wins", s, "2026-11-21T03:45:00Z", 700, 1},
		{"reversed order: weekend is last and wins", reversed, "2026-11-21T03:45:00Z", 70, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, idx := tt.s.At(utc(tt.at))
			if p.IdleCount != tt.wantIdle || idx != tt.wantEntry {
				t.Errorf("At(%s) = IdleCount %d from entry %d, want %d from entry %d", tt.at, p.IdleCount, idx, tt.wantIdle, tt.wantEntry)
			}
		})
	}
}

// TestScheduleEntryReplacesAllValues checks gitlab-runner's rule that the
// winning entry supplies every value: what it leaves unset is zero, not the
// default's value.
func TestScheduleEntryReplacesAllValues(t *testing.T) {
	s := &Schedule{
		Default: Policy{IdleCount: 10, IdleCountMin: 2, ScaleFactor: 1.5, IdleTime: time.Hour},
		Entries: []Entry{{Periods: []Period{mustPeriod(t, "* * * * * sat,sun *", nil)}, Policy: Policy{IdleCount: 3}}},
	}
	got, _ := s.At(utc("2026-11-21T10:00:00Z"))
	want := Policy{IdleCount: 3}
	if got != want {
		t.Errorf("At(weekend) = %+v, want %+v", got, want)
	}
}

func TestScheduleNextChange(t *testing.T) {
	berlin := mustLoc(t, "Europe/Berlin")
	newYork := mustLoc(t, "America/New_York")
	work := &Schedule{Entries: []Entry{{Periods: []Period{mustPeriod(t, "* * 9-17 * * mon-fri *", berlin)}, Policy: Policy{IdleCount: 50}}}}
	dstGap := &Schedule{Entries: []Entry{{Periods: []Period{mustPeriod(t, "* 30 2 * * * *", berlin)}}}}
	dstRepeat := &Schedule{Entries: []Entry{{Periods: []Period{mustPeriod(t, "* 30 1 * * * *", newYork)}}}}
	always := &Schedule{Entries: []Entry{{Periods: []Period{mustPeriod(t, "* * * * * * *", nil)}}}}
	tests := []struct {
		name string
		s    *Schedule
		from string
		want string // "" = no change
	}{
		{"weekday to spike", hosted(t), "2026-11-23T12:00:00Z", "2026-11-24T03:30:00Z"},
		{"spike to default", hosted(t), "2026-11-24T03:45:00Z", "2026-11-24T04:31:00Z"},
		// 04:00:00 ends the first spike period and starts the second: no change.
		{"spike across its two periods", hosted(t), "2026-11-24T03:59:59Z", "2026-11-24T04:31:00Z"},
		{"friday to weekend", hosted(t), "2026-11-20T12:00:00Z", "2026-11-21T00:00:00Z"},
		{"weekend to spike", hosted(t), "2026-11-21T01:00:00Z", "2026-11-21T03:30:00Z"},
		{"spike back to weekend", hosted(t), "2026-11-21T04:00:00Z", "2026-11-21T04:31:00Z"},
		{"sunday to monday", hosted(t), "2026-11-22T12:00:00Z", "2026-11-23T00:00:00Z"},
		// Berlin moves to summer time on Sunday 2026-03-29: Friday's work
		// ends at 18:00 CET (17:00 UTC); Monday's starts at 09:00 CEST (07:00 UTC).
		{"berlin friday end", work, "2026-03-27T12:00:00Z", "2026-03-27T17:00:00Z"},
		{"berlin over the DST change", work, "2026-03-27T17:00:00Z", "2026-03-30T07:00:00Z"},
		// 02:30 does not exist in Berlin on 2026-03-29; the next one is on the 30th.
		{"skipped local hour", dstGap, "2026-03-28T12:00:00Z", "2026-03-30T00:30:00Z"},
		// 01:30 happens twice in New York on 2026-11-01 (EDT, then EST).
		{"repeated local hour first", dstRepeat, "2026-11-01T05:00:00Z", "2026-11-01T05:30:00Z"},
		{"repeated local hour second", dstRepeat, "2026-11-01T05:31:00Z", "2026-11-01T06:30:00Z"},
		{"always active never changes", always, "2026-11-23T12:00:00Z", ""},
		{"no entries never change", &Schedule{}, "2026-11-23T12:00:00Z", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := tt.s.NextChange(utc(tt.from))
			if tt.want == "" {
				if ok {
					t.Fatalf("NextChange(%s) = %s, want none", tt.from, got.UTC().Format(time.RFC3339))
				}
				return
			}
			if !ok || !got.Equal(utc(tt.want)) {
				t.Errorf("NextChange(%s) = %s (%v), want %s", tt.from, got.UTC().Format(time.RFC3339), ok, tt.want)
			}
		})
	}
}

func TestIdleTarget(t *testing.T) {
	// The docs' IdleScaleFactor example: IdleCount 100, IdleCountMin 10, factor 1.1.
	dm := Policy{Style: DockerMachine, IdleCount: 100, IdleCountMin: 10, ScaleFactor: 1.1}
	ts := Policy{Style: Taskscaler, IdleCount: 2, ScaleFactor: 0.5, ScaleFactorLimit: 10}
	tests := []struct {
		name  string
		p     Policy
		inUse int
		want  int
	}{
		{"no factor: IdleCount", Policy{IdleCount: 7}, 100, 7},
		{"docs: nothing in use gives the floor", dm, 0, 10},
		{"docs: 10 in use gives 11", dm, 10, 11},
		{"docs: truncates 1.1*15=16.5", dm, 15, 16},
		{"docs: capped at IdleCount", dm, 100, 100},
		{"docker+machine floor forced to 1", Policy{IdleCount: 5, ScaleFactor: 0.1}, 3, 1},
		{"taskscaler: floor idle_count", ts, 1, 2},
		{"taskscaler: rounds up 0.5*5", ts, 5, 3},
		{"taskscaler: capped by limit", ts, 100, 10},
		{"taskscaler: no limit", Policy{Style: Taskscaler, IdleCount: 1, ScaleFactor: 2}, 50, 100},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.p.IdleTarget(tt.inUse); got != tt.want {
				t.Errorf("IdleTarget(%d) = %d, want %d", tt.inUse, got, tt.want)
			}
		})
	}
}

// FuzzParsePeriod checks that no expression panics the parser, and that for
// every accepted one the next transition really changes membership and no
// earlier second does.
func FuzzParsePeriod(f *testing.F) {
	for _, s := range []string{
		"* * * * * sat,sun *", "* 30-59 3 * * * *", "* 0-30 4 * * * *", "* * 9-17 * * mon-fri *",
		"* 8-15 * * mon-fri", "30 3 * * * 2026", "0 0 0 29 2 * 2028", "*/5 */7 1-3 1,15 jan-mar 1-7/2 2026-2030/2",
		"* * * * * 7 *", "@daily", "* * * * *",
	} {
		f.Add(s, int64(1795417517))
	}
	f.Fuzz(func(t *testing.T, expr string, unix int64) {
		p, err := ParsePeriod(expr, time.UTC)
		if err != nil {
			return
		}
		at := time.Unix(unix%(4_000_000_000)+1, 0).UTC() // 1970 to 2096
		if at.Unix() < 0 {
			at = at.Add(-2 * time.Duration(unix%(4_000_000_000)) * time.Second)
		}
		in := p.Contains(at)
		n, ok := p.nextTransition(at)
		if !ok {
			return
		}
		if !n.After(at) {
			t.Fatalf("%q: transition %v not after %v", expr, n, at)
		}
		if p.Contains(n) == in {
			t.Fatalf("%q: membership at transition %v equals membership at %v (%v)", expr, n, at, in)
		}
		if before := n.Add(-time.Second); before.After(at) && p.Contains(before) != in {
			t.Fatalf("%q: membership changed before the reported transition %v", expr, n)
		}
	})
}

func TestPolicyQuantile(t *testing.T) {
	for _, tt := range []struct {
		q, want float64
	}{{0, DefaultPredictiveQuantile}, {0.5, 0.5}, {0.99, 0.99}} {
		if got := (Policy{Predictive: true, PredictiveQuantile: tt.q}).Quantile(); got != tt.want {
			t.Errorf("Quantile() with PredictiveQuantile %v = %v, want %v", tt.q, got, tt.want)
		}
	}
}
