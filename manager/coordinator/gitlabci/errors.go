package gitlabci

import "fmt"

// Error is a configuration error: where it is (file, line, key path) and
// what is wrong. A configuration with an error creates no pipeline.
type Error struct {
	File string
	Line int    // 0 when unknown
	Key  string // "build: artifacts: paths"; empty for the whole file
	Msg  string
}

// Error implements error as "file:line: key: message".
func (e *Error) Error() string { return place(e.File, e.Line, e.Key) + e.Msg }

// Warning is one line about a keyword the coordinator does not support (the
// job runs without it) or input it reads in a way worth saying.
type Warning struct {
	File string
	Line int
	Key  string
	Msg  string
}

// String formats the warning as "file:line: key: message".
func (w Warning) String() string { return place(w.File, w.Line, w.Key) + w.Msg }

func place(file string, line int, key string) string {
	s := file
	if line > 0 {
		s += fmt.Sprintf(":%d", line)
	}
	s += ": "
	if key != "" {
		s += key + ": "
	}
	return s
}
