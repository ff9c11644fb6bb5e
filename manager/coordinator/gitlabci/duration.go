package gitlabci

import (
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode"
)

var durationUnits = map[string]time.Duration{
	"s": time.Second, "sec": time.Second, "secs": time.Second, "second": time.Second, "seconds": time.Second,
	"m": time.Minute, "min": time.Minute, "mins": time.Minute, "minute": time.Minute, "minutes": time.Minute,
	"h": time.Hour, "hr": time.Hour, "hrs": time.Hour, "hour": time.Hour, "hours": time.Hour,
	"d": 24 * time.Hour, "day": 24 * time.Hour, "days": 24 * time.Hour,
	"w": 7 * 24 * time.Hour, "week": 7 * 24 * time.Hour, "weeks": 7 * 24 * time.Hour,
}

// ParseDuration reads a timeout as GitLab writes them: "3600" (seconds),
// "1h 30m", "1 hour 30 minutes", "90 min", "2h30m". It must be at least 1 s
// and at most 1 month.
func ParseDuration(s string) (time.Duration, error) {
	in := strings.TrimSpace(s)
	if n, err := strconv.ParseInt(in, 10, 64); err == nil {
		return checkDuration(s, time.Duration(n)*time.Second)
	}
	var total time.Duration
	rest := strings.ReplaceAll(strings.ToLower(in), " and ", " ")
	parts := 0
	for rest = strings.TrimLeft(rest, " ,"); rest != ""; rest = strings.TrimLeft(rest, " ,") {
		i := strings.IndexFunc(rest, func(r rune) bool { return !unicode.IsDigit(r) && r != '.' })
		if i <= 0 {
			return 0, fmt.Errorf("timeout %q: expected a number at %q", s, rest)
		}
		num, err := strconv.ParseFloat(rest[:i], 64)
		if err != nil {
			return 0, fmt.Errorf("timeout %q: %q is not a number", s, rest[:i])
		}
		rest = strings.TrimLeft(rest[i:], " ")
		j := strings.IndexFunc(rest, func(r rune) bool { return !unicode.IsLetter(r) })
		if j < 0 {
			j = len(rest)
		}
		unit, ok := durationUnits[rest[:j]]
		if !ok {
			return 0, fmt.Errorf("timeout %q: unknown unit %q (s, m, h, d, w or their names)", s, rest[:j])
		}
		if num > 1e6 {
			return 0, fmt.Errorf("timeout %q is too long", s)
		}
		total += time.Duration(num * float64(unit))
		rest = rest[j:]
		if parts++; parts > 10 {
			return 0, fmt.Errorf("timeout %q has too many parts", s)
		}
	}
	if parts == 0 {
		return 0, fmt.Errorf("timeout is empty")
	}
	return checkDuration(s, total)
}

func checkDuration(s string, d time.Duration) (time.Duration, error) {
	if d < time.Second {
		return 0, fmt.Errorf("timeout %q is shorter than 1 second", s)
	}
	if d > 31*24*time.Hour {
		return 0, fmt.Errorf("timeout %q is longer than a month", s)
	}
	return d, nil
}
