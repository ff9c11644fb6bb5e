package buildscript

import (
	"strings"
)

// ANSI sequences as gitlab-runner writes them.
const (
	ansiBoldGreen = "\x1b[32;1m"
	ansiBoldRed   = "\x1b[31;1m"
	ansiBoldCyan  = "\x1b[36;1m"
	ansiYellow    = "\x1b[0;33m"
	ansiReset     = "\x1b[0;m"
	ansiClear     = "\x1b[0K"
)

// shellWriter writes one stage script for one shell. Every method that runs
// something stops the script with that thing's exit code when it fails.
type shellWriter interface {
	// export sets an environment variable for the rest of the script.
	export(key, value string)
	// notice prints text in bold green, warning in yellow.
	notice(text string)
	warning(text string)
	// hostLine prints "Running on <hostname>..." (with " via <via>" if set).
	hostLine(via string)
	// userCommand echoes "$ <first line>" in green and runs cmd as written.
	userCommand(cmd string)
	// run runs a program with literal arguments.
	run(prog string, args ...string)
	cd(dir string)
	mkdir(dir string)
	rmdir(dir string)
	rmfile(path string)
	// touch makes an empty file (or empties it).
	touch(path string)
	// rmFilesMatching removes every file under dir whose name matches the
	// glob pattern (*, ? and [...]), if dir exists.
	rmFilesMatching(dir, pattern string)
	// ifCmd opens a block that runs when the program succeeds; its output
	// is discarded (ifCmdShown: shown). ifFile opens one that runs when path
	// is a regular file. Close each with endIf, optionally after orElse.
	ifCmd(prog string, args ...string)
	ifCmdShown(prog string, args ...string)
	ifFile(path string)
	ifDir(path string)
	orElse()
	endIf()
	// finish returns the whole script.
	finish() string
}

// commandEcho is what the trace shows for a user command: its first line.
func commandEcho(cmd string) string {
	first, _, multi := strings.Cut(cmd, "\n")
	first = strings.TrimSuffix(first, "\r")
	if multi {
		return "$ " + first + " # collapsed multi-line command"
	}
	return "$ " + first
}

// posixWriter writes bash, or POSIX sh when bash is false.
type posixWriter struct {
	bash bool
	b    strings.Builder
}

func newPosixWriter(bash bool) *posixWriter { return &posixWriter{bash: bash} }

// shQuote returns s as one single-quoted POSIX shell word. It is exact for
// every byte but NUL: newlines, $, backslashes, quotes and UTF-8 stay literal.
func shQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func (w *posixWriter) line(s string) { w.b.WriteString(s + "\n") }

func (w *posixWriter) export(key, value string) {
	w.line("export " + key + "=" + shQuote(value))
}

func (w *posixWriter) colored(color, text string) {
	// printf's format turns \033 into ESC; the text is a plain %s argument.
	w.line(`printf '` + strings.ReplaceAll(color, "\x1b", `\033`) + `%s\033[0;m\n' ` + shQuote(text))
}

func (w *posixWriter) notice(text string)  { w.colored(ansiBoldGreen, text) }
func (w *posixWriter) warning(text string) { w.colored(ansiYellow, text) }

func (w *posixWriter) hostLine(via string) {
	// The kernel's host name through a builtin: no process on the hot path.
	w.line(`{ read -r mayfly_host </proc/sys/kernel/hostname; } 2>/dev/null || mayfly_host=$(hostname)`)
	if via == "" {
		w.line(`printf 'Running on %s...\n' "$mayfly_host"`)
		return
	}
	w.line(`printf 'Running on %s via %s...\n' "$mayfly_host" ` + shQuote(via))
}

func (w *posixWriter) userCommand(cmd string) {
	cmd = strings.TrimSpace(cmd)
	if cmd == "" {
		w.line("echo")
		return
	}
	w.notice(commandEcho(cmd))
	w.line(cmd)
}

func (w *posixWriter) run(prog string, args ...string) {
	w.line(posixCommand(prog, args))
}

func (w *posixWriter) cd(dir string)      { w.run("cd", dir) }
func (w *posixWriter) mkdir(dir string)   { w.run("mkdir", "-p", dir) }
func (w *posixWriter) rmdir(dir string)   { w.run("rm", "-r", "-f", dir) }
func (w *posixWriter) rmfile(path string) { w.run("rm", "-f", path) }

func (w *posixWriter) rmFilesMatching(dir, pattern string) {
	w.line("if [ -d " + shQuote(dir) + " ]; then find " + shQuote(dir) + " -name " + shQuote(pattern) + " -type f -exec rm -f {} +; fi")
}

func posixCommand(prog string, args []string) string {
	words := []string{shQuote(prog)}
	for _, a := range args {
		words = append(words, shQuote(a))
	}
	return strings.Join(words, " ")
}

func (w *posixWriter) ifCmd(prog string, args ...string) {
	w.line("if " + posixCommand(prog, args) + " >/dev/null 2>&1; then")
}

func (w *posixWriter) ifCmdShown(prog string, args ...string) {
	w.line("if " + posixCommand(prog, args) + "; then")
}

func (w *posixWriter) touch(path string)  { w.line(": > " + shQuote(path)) }
func (w *posixWriter) ifFile(path string) { w.line("if [ -f " + shQuote(path) + " ]; then") }
func (w *posixWriter) ifDir(path string)  { w.line("if [ -d " + shQuote(path) + " ]; then") }
func (w *posixWriter) orElse()            { w.line("else") }
func (w *posixWriter) endIf()             { w.line("fi") }

// finish wraps the body in a brace group: the shell parses all of it before
// running any, and commands read /dev/null instead of the rest of the script
// when it arrives on stdin. errexit stops at the first failing command with
// its exit code; pipefail makes a pipeline fail when any part fails.
func (w *posixWriter) finish() string {
	var s strings.Builder
	if w.bash {
		s.WriteString("set -eo pipefail\n")
	} else {
		// dash has no pipefail: "command" keeps the failing special
		// builtin from ending the shell (and costs no subshell).
		s.WriteString("set -e\ncommand set -o pipefail 2>/dev/null || :\n")
	}
	s.WriteString("set +o noclobber\n{\n")
	s.WriteString(w.b.String())
	s.WriteString("} </dev/null\n")
	return s.String()
}

// psWriter writes PowerShell: Windows PowerShell 5.1 (powershell) or 7+ (pwsh).
type psWriter struct {
	eol string
	b   strings.Builder
	// emptyArg: the script passes an empty argument to a program, which
	// PowerShell before 7.3 drops unless it is written as '""'.
	emptyArg bool
}

func newPSWriter(windowsPowerShell bool) *psWriter {
	if windowsPowerShell {
		return &psWriter{eol: "\r\n"}
	}
	return &psWriter{eol: "\n"}
}

// psQuote returns s as a PowerShell single-quoted string, in which nothing is
// expanded. PowerShell takes the typographic quotes ‘ ’ ‚ ‛ as single quotes
// too, so each of them is doubled like '. Newlines stay literal.
func psQuote(s string) string {
	var b strings.Builder
	b.Grow(len(s) + 2)
	b.WriteByte('\'')
	for _, r := range s {
		switch r {
		case '\'', '\u2018', '\u2019', '\u201a', '\u201b':
			b.WriteRune(r)
		}
		b.WriteRune(r)
	}
	b.WriteByte('\'')
	return b.String()
}

// psCheck stops the script when the last command failed, with the native
// exit code when there is one (gitlab-runner's check).
const psCheck = "if(!$?) { Exit &{if($LASTEXITCODE) {$LASTEXITCODE} else {1}} }"

func (w *psWriter) line(s string) { w.b.WriteString(s + w.eol) }

func (w *psWriter) export(key, value string) {
	w.line("$env:" + key + " = " + psQuote(value))
}

// colored writes text between ANSI sequences built from [char]27, which both
// Windows PowerShell 5.1 and pwsh understand (`e is pwsh only).
func (w *psWriter) colored(color, text string) {
	w.line("Write-Output ($__mayfly_esc + " + psQuote(strings.TrimPrefix(color, "\x1b")) +
		" + " + psQuote(text) + " + $__mayfly_esc + " + psQuote(strings.TrimPrefix(ansiReset, "\x1b")) + ")")
}

func (w *psWriter) notice(text string)  { w.colored(ansiBoldGreen, text) }
func (w *psWriter) warning(text string) { w.colored(ansiYellow, text) }

func (w *psWriter) hostLine(via string) {
	if via == "" {
		w.line("Write-Output ('Running on ' + [Environment]::MachineName + '...')")
		return
	}
	w.line("Write-Output ('Running on ' + [Environment]::MachineName + ' via ' + " + psQuote(via) + " + '...')")
}

func (w *psWriter) userCommand(cmd string) {
	cmd = strings.TrimSpace(cmd)
	if cmd == "" {
		w.line(`Write-Output ""`)
		return
	}
	cmd = strings.ReplaceAll(cmd, "\r\n", "\n")
	w.notice(commandEcho(cmd))
	w.line(strings.ReplaceAll(cmd, "\n", w.eol))
	w.line(psCheck)
}

// psNativeEmpty holds the word that passes an empty argument to a program.
const psNativeEmpty = "$__mayfly_empty"

// command returns "& 'prog' 'arg'...", with empty arguments passed so that
// every PowerShell version keeps them.
func (w *psWriter) command(prog string, args []string) string {
	words := []string{"&", psQuote(prog)}
	for _, a := range args {
		if a == "" {
			w.emptyArg = true
			words = append(words, psNativeEmpty)
			continue
		}
		words = append(words, psQuote(a))
	}
	return strings.Join(words, " ")
}

func (w *psWriter) run(prog string, args ...string) {
	w.line(w.command(prog, args))
	w.line(psCheck)
}

func (w *psWriter) cd(dir string) {
	w.line("Set-Location -LiteralPath " + psQuote(dir))
	w.line(psCheck)
}

func (w *psWriter) mkdir(dir string) {
	w.line("New-Item -ItemType Directory -Force -Path " + psQuote(dir) + " | Out-Null")
}

func (w *psWriter) rmdir(dir string) {
	w.line("if (Test-Path -LiteralPath " + psQuote(dir) + ") { Remove-Item -LiteralPath " + psQuote(dir) + " -Recurse -Force }")
}

func (w *psWriter) rmfile(path string) {
	w.line("if (Test-Path -LiteralPath " + psQuote(path) + ") { Remove-Item -LiteralPath " + psQuote(path) + " -Force }")
}

func (w *psWriter) rmFilesMatching(dir, pattern string) {
	w.line("if (Test-Path -LiteralPath " + psQuote(dir) + " -PathType Container) { Get-ChildItem -LiteralPath " + psQuote(dir) +
		" -Recurse -Force -File | Where-Object { $_.Name -like " + psQuote(pattern) + " } | Remove-Item -Force }")
}

// ifCmd and ifCmdShown catch what a native program's stderr throws under
// $ErrorActionPreference = "Stop" in Windows PowerShell 5.1.
func (w *psWriter) ifCmd(prog string, args ...string) {
	w.line("$__mayfly_ok = $false")
	w.line("try { " + w.command(prog, args) + " 2>$null | Out-Null; $__mayfly_ok = ($LASTEXITCODE -eq 0) } catch { }")
	w.line("if ($__mayfly_ok) {")
}

func (w *psWriter) ifCmdShown(prog string, args ...string) {
	w.line("$__mayfly_ok = $false")
	w.line("try { " + w.command(prog, args) + "; $__mayfly_ok = ($LASTEXITCODE -eq 0) } catch { }")
	w.line("if ($__mayfly_ok) {")
}

func (w *psWriter) touch(path string) {
	w.line("New-Item -ItemType File -Force -Path " + psQuote(path) + " | Out-Null")
}

func (w *psWriter) ifFile(path string) {
	w.line("if (Test-Path -LiteralPath " + psQuote(path) + " -PathType Leaf) {")
}

func (w *psWriter) ifDir(path string) {
	w.line("if (Test-Path -LiteralPath " + psQuote(path) + " -PathType Container) {")
}
func (w *psWriter) orElse() { w.line("} else {") }
func (w *psWriter) endIf()  { w.line("}") }

// finish wraps the body in a script block, as gitlab-runner does, with
// $ErrorActionPreference = "Stop" so failing cmdlets end the script.
func (w *psWriter) finish() string {
	var s strings.Builder
	s.WriteString("& {" + w.eol)
	s.WriteString(`$ErrorActionPreference = "Stop"` + w.eol)
	s.WriteString("$__mayfly_esc = [char]27" + w.eol)
	if w.emptyArg {
		s.WriteString("$__mayfly_empty = if ([Version]$PSVersionTable.PSVersion -lt [Version]'7.3') { '\"\"' } else { '' }" + w.eol)
	}
	s.WriteString(w.b.String())
	s.WriteString("}" + w.eol)
	return s.String()
}
