package sim

import (
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Job is one job of an arrival trace.
type Job struct {
	Arrival  time.Time     // when the job became pending in GitLab
	Duration time.Duration // how long it runs once started
	OS       string        // "linux" (default) or "windows"
}

// LoadTrace reads the trace CSV at path (see ReadTrace).
func LoadTrace(path string) ([]Job, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open trace: %w", err)
	}
	defer f.Close()
	jobs, err := ReadTrace(f)
	if err != nil {
		return nil, fmt.Errorf("trace %s: %w", path, err)
	}
	return jobs, nil
}

// ReadTrace parses a trace: one job per line, "arrival,duration[,os]" with
// the arrival in unix seconds and the duration in seconds (both may have a
// fraction). Lines starting with '#' and a header line starting with
// "arrival" are skipped. The jobs are returned sorted by arrival.
func ReadTrace(r io.Reader) ([]Job, error) {
	cr := csv.NewReader(r)
	cr.Comment = '#'
	cr.FieldsPerRecord = -1
	cr.ReuseRecord = true
	var jobs []Job
	for {
		rec, err := cr.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		line, _ := cr.FieldPos(0)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		if len(rec) > 0 && strings.EqualFold(strings.TrimSpace(rec[0]), "arrival") {
			continue
		}
		if len(rec) < 2 || len(rec) > 3 {
			return nil, fmt.Errorf("line %d: want 2 or 3 fields (arrival,duration[,os]), got %d", line, len(rec))
		}
		at, err := strconv.ParseFloat(strings.TrimSpace(rec[0]), 64)
		if err != nil || at < 0 {
			return nil, fmt.Errorf("line %d: arrival: want unix seconds, got %q", line, rec[0])
		}
		d, err := strconv.ParseFloat(strings.TrimSpace(rec[1]), 64)
		if err != nil || d < 0 {
			return nil, fmt.Errorf("line %d: duration: want non-negative seconds, got %q", line, rec[1])
		}
		j := Job{Arrival: unixFloat(at), Duration: secs(d), OS: "linux"}
		if len(rec) == 3 {
			switch o := strings.ToLower(strings.TrimSpace(rec[2])); o {
			case "", "linux":
			case "windows":
				j.OS = o
			default:
				return nil, fmt.Errorf("line %d: os: want linux or windows, got %q", line, rec[2])
			}
		}
		jobs = append(jobs, j)
	}
	if len(jobs) == 0 {
		return nil, errors.New("no jobs")
	}
	slices.SortStableFunc(jobs, func(a, b Job) int { return a.Arrival.Compare(b.Arrival) })
	return jobs, nil
}

// WriteTrace writes jobs in the format ReadTrace reads, with a header.
func WriteTrace(w io.Writer, jobs []Job) error {
	if _, err := io.WriteString(w, "arrival,duration,os\n"); err != nil {
		return err
	}
	buf := make([]byte, 0, 64)
	for _, j := range jobs {
		buf = buf[:0]
		buf = strconv.AppendInt(buf, j.Arrival.Unix(), 10)
		buf = append(buf, ',')
		buf = strconv.AppendInt(buf, int64(j.Duration.Round(time.Second)/time.Second), 10)
		if j.OS != "" && j.OS != "linux" {
			buf = append(buf, ',')
			buf = append(buf, j.OS...)
		}
		buf = append(buf, '\n')
		if _, err := w.Write(buf); err != nil {
			return err
		}
	}
	return nil
}

func unixFloat(s float64) time.Time {
	sec := int64(s)
	return time.Unix(sec, int64((s-float64(sec))*1e9)).UTC()
}

func secs(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }
