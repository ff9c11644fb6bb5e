// Package schedule decides which idle-pool policy is in force at a given time.
//
// A schedule is a default policy plus an ordered list of entries, each with
// one or more period expressions, a timezone and a policy. As in
// gitlab-runner, every entry is checked in order and the last one with a
// matching period wins; its policy replaces the default as a whole.
//
// The package is pure: every function takes the time it works on.
package schedule

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/robfig/cron/v3"
)

// Year bounds accepted in the year field, as in gitlab-runner's cron library.
const (
	minYear = 1970
	maxYear = 2099
)

// starBit marks a cron field written as "*" (robfig/cron's convention); it
// decides whether day-of-month and day-of-week combine with AND or OR.
const starBit = 1 << 63

// secondsParser parses the six time fields (second to day-of-week) that every
// accepted form is normalised to.
var secondsParser = cron.NewParser(cron.Second | cron.Minute | cron.Hour | cron.Dom | cron.Month | cron.Dow)

// Period is one compiled period expression, evaluated in a fixed location.
//
// Accepted forms, by number of fields:
//
//	7: second minute hour day-of-month month day-of-week year (gitlab-runner's form)
//	6: minute hour day-of-month month day-of-week year (gitlab-runner's form: second is "*")
//	5: minute hour day-of-month month day-of-week (unix cron; taskscaler's form)
//
// A time is in the period when every field matches it. Forms without a
// second field match every second of a matching minute. Day-of-week takes
// 0-7 (0 and 7 are Sunday) or names sun-sat; when both day-of-month and
// day-of-week are restricted, a day matches if either does (crontab rule).
type Period struct {
	expr   string
	fields int
	spec   *cron.SpecSchedule
	years  []yearRange // nil: every year
	loc    *time.Location
}

type yearRange struct{ lo, hi, step int }

// ParsePeriod compiles a period expression evaluated in loc (nil means UTC).
func ParsePeriod(expr string, loc *time.Location) (Period, error) {
	if loc == nil {
		loc = time.UTC
	}
	fields := strings.Fields(expr)
	if len(fields) > 0 && strings.HasPrefix(fields[0], "@") {
		return Period{}, fmt.Errorf("period %q: descriptors like %s name an instant, not a period; write the fields out", expr, fields[0])
	}
	var sec, year string
	switch len(fields) {
	case 7:
		sec, year = fields[0], fields[6]
		fields = fields[1:6]
	case 6:
		sec, year = "*", fields[5]
		fields = fields[:5]
	case 5:
		sec, year = "*", "*"
	default:
		return Period{}, fmt.Errorf("period %q: want 5, 6 or 7 fields (7: second minute hour day-of-month month day-of-week year), got %d", expr, len(fields))
	}
	for _, f := range append([]string{sec, year}, fields...) {
		if strings.ContainsAny(f, "LW#") {
			return Period{}, fmt.Errorf("period %q: field %q: the L, W and # operators are not supported", expr, f)
		}
	}
	dow, err := normalizeDow(fields[4])
	if err != nil {
		return Period{}, fmt.Errorf("period %q: day-of-week: %w", expr, err)
	}
	std := strings.Join([]string{sec, fields[0], fields[1], fields[2], fields[3], dow}, " ")
	sched, err := secondsParser.Parse(std)
	if err != nil {
		return Period{}, fmt.Errorf("period %q: %w", expr, err)
	}
	spec, ok := sched.(*cron.SpecSchedule)
	if !ok {
		return Period{}, fmt.Errorf("period %q: unexpected schedule kind %T", expr, sched)
	}
	spec.Location = loc
	years, err := parseYears(year)
	if err != nil {
		return Period{}, fmt.Errorf("period %q: year: %w", expr, err)
	}
	return Period{expr: expr, fields: len(strings.Fields(expr)), spec: spec, years: years, loc: loc}, nil
}

// String returns the expression as written.
func (p Period) String() string { return p.expr }

// Fields returns how many fields the expression was written with (5, 6 or 7).
func (p Period) Fields() int { return p.fields }

// Location returns the location the period is evaluated in.
func (p Period) Location() *time.Location { return p.loc }

// Contains reports whether t (to the second) lies in the period.
func (p Period) Contains(t time.Time) bool {
	t = t.In(p.loc)
	s := p.spec
	if 1<<uint(t.Second())&s.Second == 0 ||
		1<<uint(t.Minute())&s.Minute == 0 ||
		1<<uint(t.Hour())&s.Hour == 0 ||
		1<<uint(t.Month())&s.Month == 0 {
		return false
	}
	domMatch := 1<<uint(t.Day())&s.Dom != 0
	dowMatch := 1<<uint(t.Weekday())&s.Dow != 0
	if s.Dom&starBit != 0 || s.Dow&starBit != 0 {
		if !domMatch || !dowMatch {
			return false
		}
	} else if !domMatch && !dowMatch {
		return false
	}
	return p.yearMatches(t.Year())
}

func (p Period) yearMatches(y int) bool {
	if p.years == nil {
		return true
	}
	for _, r := range p.years {
		if y >= r.lo && y <= r.hi && (y-r.lo)%r.step == 0 {
			return true
		}
	}
	return false
}

// nextStart returns the first whole second after t that lies in the period,
// or false when there is none before the end of the year range.
func (p Period) nextStart(t time.Time) (time.Time, bool) {
	t = t.In(p.loc)
	for i := 0; i < 1000; i++ { // bounded: a jump per skipped year or DST oddity
		n := p.spec.Next(t)
		if n.IsZero() {
			// robfig gives up after five years without a match; carry on from there.
			t = t.AddDate(5, 0, 0)
			if t.Year() > maxYear {
				return time.Time{}, false
			}
			continue
		}
		y := n.In(p.loc).Year()
		if y > maxYear {
			return time.Time{}, false
		}
		if p.yearMatches(y) {
			if p.Contains(n) {
				return n, true
			}
			t = n // robfig can land on a skipped DST hour; look again from there
			continue
		}
		ny, ok := p.nextYear(y)
		if !ok {
			return time.Time{}, false
		}
		t = time.Date(ny, 1, 1, 0, 0, 0, 0, p.loc).Add(-time.Second)
	}
	return time.Time{}, false
}

// nextYear returns the first year after y the year field accepts.
func (p Period) nextYear(y int) (int, bool) {
	for c := y + 1; c <= maxYear; c++ {
		if p.yearMatches(c) {
			return c, true
		}
	}
	return 0, false
}

// runEnd returns the first whole second after t that is not in the period,
// given that t is in it, or false when the period never ends.
func (p Period) runEnd(t time.Time) (time.Time, bool) {
	if p.always() {
		return time.Time{}, false
	}
	t = t.In(p.loc).Truncate(time.Second)
	full60 := uint64(1)<<60 - 1
	full24 := uint64(1)<<24 - 1
	secFull := p.spec.Second&full60 == full60
	minFull := secFull && p.spec.Minute&full60 == full60
	hourFull := minFull && p.spec.Hour&full24 == full24
	// Step by the largest unit whose finer fields all match: a run can only
	// end at the start of such a unit.
	step := func(c time.Time) time.Time {
		y, mo, d := c.Date()
		h, mi, s := c.Clock()
		switch {
		case hourFull:
			return time.Date(y, mo, d+1, 0, 0, 0, 0, p.loc)
		case minFull:
			return time.Date(y, mo, d, h+1, 0, 0, 0, p.loc)
		case secFull:
			return time.Date(y, mo, d, h, mi+1, 0, 0, p.loc)
		default:
			return time.Date(y, mo, d, h, mi, s+1, 0, p.loc)
		}
	}
	// Bounded: no finite run outlasts the year range; at day steps that is
	// about 47,000 iterations.
	for c, i := step(t), 0; i < 1_000_000 && c.Year() <= maxYear+1; c, i = step(c), i+1 {
		if !p.Contains(c) {
			return c, true
		}
	}
	return time.Time{}, false
}

// always reports whether every second of every year is in the period.
func (p Period) always() bool {
	s := p.spec
	return s.Second&starBit != 0 && s.Minute&starBit != 0 && s.Hour&starBit != 0 &&
		s.Dom&starBit != 0 && s.Month&starBit != 0 && s.Dow&starBit != 0 && p.years == nil
}

// nextTransition returns the first whole second after t at which the period's
// membership differs from its membership at t.
func (p Period) nextTransition(t time.Time) (time.Time, bool) {
	if p.Contains(t) {
		return p.runEnd(t)
	}
	return p.nextStart(t)
}

// dowNames maps day names to numbers for normalizeDow.
var dowNames = map[string]int{"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}

// normalizeDow rewrites a day-of-week field into the numbers robfig/cron
// accepts: names and 7 (Sunday, allowed by gitlab-runner's cron library)
// become 0-6. A bare "*" or "?" is kept so that the day-of-month rule still
// sees an unrestricted field.
func normalizeDow(field string) (string, error) {
	if field == "*" || field == "?" {
		return field, nil
	}
	var out []string
	for _, part := range strings.Split(field, ",") {
		rng, stepStr, hasStep := strings.Cut(part, "/")
		step := 1
		if hasStep {
			n, err := strconv.Atoi(stepStr)
			if err != nil || n <= 0 {
				return "", fmt.Errorf("bad step in %q", part)
			}
			step = n
		}
		lo, hi := 0, 6
		if rng != "*" && rng != "?" {
			a, b, isRange := strings.Cut(rng, "-")
			var err error
			if lo, err = dowValue(a); err != nil {
				return "", err
			}
			hi = lo
			if isRange {
				if hi, err = dowValue(b); err != nil {
					return "", err
				}
			} else if hasStep {
				hi = max(lo, 6) // "N/S" runs to Saturday, or is 7 alone
			}
		}
		if lo > hi {
			return "", fmt.Errorf("range %q runs backwards", part)
		}
		for d := lo; d <= hi; d += step {
			out = append(out, strconv.Itoa(d%7))
		}
	}
	return strings.Join(out, ","), nil
}

func dowValue(s string) (int, error) {
	if n, ok := dowNames[strings.ToLower(s)]; ok {
		return n, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > 7 {
		return 0, fmt.Errorf("%q is not a day of week (0-7 or sun-sat)", s)
	}
	return n, nil
}

// parseYears parses the year field: "*", or a comma list of N, N-M, */S, N/S, N-M/S.
func parseYears(field string) ([]yearRange, error) {
	if field == "*" || field == "?" {
		return nil, nil
	}
	var out []yearRange
	for _, part := range strings.Split(field, ",") {
		rng, stepStr, hasStep := strings.Cut(part, "/")
		r := yearRange{lo: minYear, hi: maxYear, step: 1}
		if hasStep {
			n, err := strconv.Atoi(stepStr)
			if err != nil || n <= 0 {
				return nil, fmt.Errorf("bad step in %q", part)
			}
			r.step = n
		}
		if rng != "*" {
			a, b, isRange := strings.Cut(rng, "-")
			lo, err := strconv.Atoi(a)
			if err != nil {
				return nil, fmt.Errorf("%q is not a year", a)
			}
			r.lo = lo
			if isRange {
				if r.hi, err = strconv.Atoi(b); err != nil {
					return nil, fmt.Errorf("%q is not a year", b)
				}
			} else if !hasStep {
				r.hi = lo
			}
		}
		if r.lo < minYear || r.hi > maxYear || r.lo > r.hi {
			return nil, fmt.Errorf("%q: years must lie in %d-%d, low to high", part, minYear, maxYear)
		}
		out = append(out, r)
	}
	return out, nil
}
