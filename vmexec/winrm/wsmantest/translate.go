package wsmantest

import (
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"unicode/utf16"
)

// Shim stands in for one fixed PowerShell body when scripts run with sh
// because pwsh is missing. See the package documentation.
type Shim struct {
	// Sh is the POSIX sh text run in place of the body, after the translated
	// assignment prelude. Ignored when StdinProgram is set.
	Sh string
	// StdinProgram marks a loader body that reads the command's whole stdin as
	// base64 (whitespace ignored) of a UTF-8 PowerShell program and runs it.
	// The server starts "sh -s" at once and, when stdin ends, feeds it the
	// translated loader prelude followed by the translated program.
	StdinProgram bool
}

// Assignment is one statement of a script's assignment prelude.
type Assignment struct {
	// Name is the variable name without "$" or "env:".
	Name string
	// Env is set for $env:NAME assignments.
	Env bool
	// Value is the assigned string, unquoted, or the decimal integer.
	Value string
}

// SplitPrelude splits a PowerShell script into its leading assignment
// statements and the rest. A prelude statement is `$name = <literal>` or
// `$env:NAME = <literal>`, where the literal is a single-quoted string (any of
// the five quote characters PowerShell accepts, doubled inside to escape) or a
// decimal integer, ended by a newline, ";" or the end of the script. Blank
// lines and "#" comment lines between them are skipped. Names must be valid
// POSIX shell names.
func SplitPrelude(script string) (prelude []Assignment, body string) {
	s := script
	for {
		rest := skipBlank(s)
		a, after, ok := parseAssignment(rest)
		if !ok {
			return prelude, rest
		}
		prelude = append(prelude, a)
		s = after
	}
}

func skipBlank(s string) string {
	for {
		s = strings.TrimLeft(s, " \t\r\n;")
		if strings.HasPrefix(s, "#") {
			if i := strings.IndexByte(s, '\n'); i >= 0 {
				s = s[i+1:]
				continue
			}
			return ""
		}
		return s
	}
}

var shName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

func isPSQuote(r rune) bool {
	switch r {
	case '\'', '\u2018', '\u2019', '\u201a', '\u201b':
		return true
	}
	return false
}

// parseAssignment parses one prelude statement at the start of s.
func parseAssignment(s string) (Assignment, string, bool) {
	var a Assignment
	if !strings.HasPrefix(s, "$") {
		return a, "", false
	}
	s = s[1:]
	if len(s) >= 4 && strings.EqualFold(s[:4], "env:") {
		a.Env = true
		s = s[4:]
	}
	i := 0
	for i < len(s) && (s[i] == '_' || s[i] >= 'a' && s[i] <= 'z' || s[i] >= 'A' && s[i] <= 'Z' || s[i] >= '0' && s[i] <= '9') {
		i++
	}
	a.Name, s = s[:i], s[i:]
	if !shName.MatchString(a.Name) {
		return a, "", false
	}
	s = strings.TrimLeft(s, " \t")
	if !strings.HasPrefix(s, "=") {
		return a, "", false
	}
	s = strings.TrimLeft(s[1:], " \t")
	rs := []rune(s)
	n := 0
	switch {
	case len(rs) > 0 && isPSQuote(rs[0]):
		var v []rune
		closed := false
		for n = 1; n < len(rs); n++ {
			if isPSQuote(rs[n]) {
				if n+1 < len(rs) && isPSQuote(rs[n+1]) {
					// PowerShell keeps the second character of a doubled quote.
					v = append(v, rs[n+1])
					n++
					continue
				}
				n++
				closed = true
				break
			}
			v = append(v, rs[n])
		}
		if !closed {
			return a, "", false
		}
		a.Value = string(v)
	case len(rs) > 0 && (rs[0] == '-' || rs[0] >= '0' && rs[0] <= '9'):
		n = 1
		for n < len(rs) && rs[n] >= '0' && rs[n] <= '9' {
			n++
		}
		a.Value = string(rs[:n])
		if a.Value == "-" {
			return a, "", false
		}
	default:
		return a, "", false
	}
	rest := strings.TrimLeft(string(rs[n:]), " \t")
	if rest != "" && rest[0] != '\n' && rest[0] != '\r' && rest[0] != ';' {
		return a, "", false
	}
	return a, rest, true
}

// shQuote returns s as one single-quoted POSIX shell word.
func shQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// shPrelude renders assignments as sh statements.
func shPrelude(as []Assignment) string {
	var b strings.Builder
	for _, a := range as {
		if a.Env {
			b.WriteString("export ")
		}
		b.WriteString(a.Name + "=" + shQuote(a.Value) + "\n")
	}
	return b.String()
}

func normalize(s string) string {
	return strings.TrimSpace(strings.ReplaceAll(s, "\r\n", "\n"))
}

// translation is a PowerShell script rendered for sh.
type translation struct {
	// sh is the whole program for "sh -c", or the prelude for a stdin program.
	sh           string
	stdinProgram bool
}

// translate renders a PowerShell script for sh: the assignment prelude becomes
// sh assignments, a body registered as a shim is replaced, any other body is
// kept as it is (tests send sh text there).
func translate(script string, shims map[string]Shim, nested bool) (translation, error) {
	prelude, body := SplitPrelude(script)
	pre := shPrelude(prelude)
	shim, ok := shims[normalize(body)]
	switch {
	case !ok:
		return translation{sh: pre + body}, nil
	case shim.StdinProgram && nested:
		return translation{}, errors.New("a stdin program cannot load another stdin program")
	case shim.StdinProgram:
		return translation{sh: pre, stdinProgram: true}, nil
	default:
		return translation{sh: pre + shim.Sh}, nil
	}
}

// DecodeEncodedCommand decodes a -EncodedCommand argument: base64 of UTF-16LE.
func DecodeEncodedCommand(arg string) (string, error) {
	raw, err := base64.StdEncoding.DecodeString(arg)
	if err != nil {
		return "", fmt.Errorf("EncodedCommand: %w", err)
	}
	if len(raw)%2 != 0 {
		return "", fmt.Errorf("EncodedCommand: %d bytes is not UTF-16", len(raw))
	}
	u := make([]uint16, len(raw)/2)
	for i := range u {
		u[i] = binary.LittleEndian.Uint16(raw[2*i:])
	}
	if len(u) > 0 && u[0] == 0xfeff {
		u = u[1:]
	}
	return string(utf16.Decode(u)), nil
}

// commandLine is a parsed Windows command line.
type commandLine struct {
	program string   // first word
	args    []string // the other words, unquoted
}

// splitCommandLine splits a Windows command line into words: blanks separate
// words, double quotes group, backslashes are literal except before a quote.
func splitCommandLine(s string) commandLine {
	var words []string
	var cur strings.Builder
	inWord, quoted := false, false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '\\' && i+1 < len(s) && s[i+1] == '"':
			cur.WriteByte('"')
			inWord = true
			i++
		case c == '"':
			quoted = !quoted
			inWord = true
		case (c == ' ' || c == '\t') && !quoted:
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteByte(c)
			inWord = true
		}
	}
	if inWord {
		words = append(words, cur.String())
	}
	if len(words) == 0 {
		return commandLine{}
	}
	return commandLine{program: words[0], args: words[1:]}
}

// isPowerShell reports whether program names Windows PowerShell or pwsh.
func isPowerShell(program string) bool {
	p := strings.ToLower(program)
	if i := strings.LastIndexAny(p, `\/`); i >= 0 {
		p = p[i+1:]
	}
	p = strings.TrimSuffix(p, ".exe")
	return p == "powershell" || p == "pwsh"
}

// encodedCommand returns the -EncodedCommand argument of PowerShell's
// arguments; PowerShell accepts any prefix of the parameter name from "-e".
func encodedCommand(args []string) (string, bool) {
	for i, a := range args {
		l := strings.ToLower(a)
		if strings.HasPrefix(l, "/") {
			l = "-" + l[1:]
		}
		if len(l) >= 2 && (strings.HasPrefix("-encodedcommand", l) || l == "-ec") && i+1 < len(args) {
			return args[i+1], true
		}
	}
	return "", false
}
