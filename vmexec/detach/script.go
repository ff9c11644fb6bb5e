package detach

import (
	"fmt"
	"strconv"
	"strings"
)

// layoutVersion names the layout of the job directory. A manager that
// reattaches to a job started by another version reads this layout.
const layoutVersion = "1"

// The job directory D on the machine (mode 0700):
//
//	D/f/sup.sh       the supervisor
//	D/f/<hash>       a stage script, by the hash of its text
//	D/f/<hash>.env   the variables of a stage (export lines), by hash
//	D/s/<id>.sup     the claim to run stage attempt <id>, made with O_EXCL
//	                 (set -C), holding "pid boot_id starttime" of the
//	                 supervisor that runs it
//	D/s/<id>.out     its output (stdout and stderr), append-only
//	D/s/<id>.code    its exit status; not empty once the stage is done
//	D/s/<id>.pad     a page written when the stage starts and emptied just
//	                 before its exit status is written, so that a stage
//	                 that filled the disk still gets its status recorded
//	D/halt.<pid>     written by Stop: supervisor pid must start nothing more
//	D/w/<token>      a FIFO per following session: supervisors write a line
//	                 to each when a stage starts or ends (wakeSetup)
//
// Each file in D/f is marked whole by an empty NAME.ok, file variables by
// D/f/file-<hash of path>.ok. Besides the stages' own commands, only shell
// builtins run on the hot path, and setsid, dd and sleep (and mkdir once
// per job).

// supervisorScript runs a chain of stages detached from any connection:
// sup.sh DIR DRAIN SPEC... with SPEC = ID:SCRIPT:ENV (file names under
// DIR/f). Its own variables are named mf_*, as the stages run in subshells
// of it and see them. It claims the first stage (another supervisor or a
// Stop may have claimed it: then nothing runs) and each next one before it
// marks the previous one done, only when that one exited 0 and no Stop
// asked to halt, so whoever sees a stage done knows whether the chain goes
// on. Processes a stage leaves behind get DRAIN seconds to exit, then
// SIGTERM and SIGKILL; only processes made after the stage started (by
// the last pid in /proc/loadavg, all of them where it cannot be read or
// the pids wrapped) are looked at, as reading every /proc/PID/stat costs
// tens of milliseconds per stage on a busy machine or under emulation.
const supervisorScript = `# mayfly stage supervisor, layout ` + layoutVersion + `
mf_D=$1; mf_drain_s=$2; shift 2
read -r mf_boot </proc/sys/kernel/random/boot_id 2>/dev/null || mf_boot=-
read -r _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ mf_st _ </proc/$$/stat 2>/dev/null || mf_st=-
mf_me="$$ $mf_boot $mf_st"
mf_halt="$mf_D/halt.$$"
mf_claim() {
	set -C
	{ printf '%s\n' "$mf_me" >"$mf_D/s/$1.sup"; } 2>/dev/null
	mf_r=$?
	set +C
	return $mf_r
}
` + lastPidFunction + `mf_left() {
	mf_lp=$mf_from; mf_lastpid
	[ "$mf_np" -ge "$mf_lp" ] || mf_lp=0
	for mf_f in /proc/[0-9]*/stat; do
		mf_p=${mf_f#/proc/}
		[ "${mf_p%/stat}" -gt "$mf_lp" ] || continue
		{ read -r mf_p _ mf_s _ mf_g _ <"$mf_f"; } 2>/dev/null || continue
		[ "$mf_g" = "$$" ] && [ "$mf_p" != "$$" ] && [ "$mf_s" != Z ] && return 0
	done
	return 1
}
mf_signal() {
	for mf_f in /proc/[0-9]*/stat; do
		{ read -r mf_p _ mf_s _ mf_g _ <"$mf_f"; } 2>/dev/null || continue
		[ "$mf_g" = "$$" ] && [ "$mf_p" != "$$" ] && [ "$mf_s" != Z ] && kill -"$1" "$mf_p" 2>/dev/null
	done
}
mf_drain() {
	mf_left || return 0
	mf_i=0
	while mf_left && [ $mf_i -lt $((mf_drain_s*10)) ]; do sleep 0.1; mf_i=$((mf_i+1)); done
	mf_left || return 0
	mf_signal TERM; sleep 1; mf_signal KILL
}
mf_note() {
	for mf_f in "$mf_D"/w/*; do
		[ -p "$mf_f" ] && { printf 'n\n' 1<>"$mf_f"; } 2>/dev/null
	done
}
mf_claim "${1%%:*}" || exit 0
while [ $# -gt 0 ]; do
	mf_id=${1%%:*}; mf_r=${1#*:}; mf_sc=${mf_r%%:*}; mf_env=${mf_r#*:}; shift
	mf_d=$mf_D/s/$mf_id
	: >>"$mf_d.out"
	mf_note
	{ printf '%4096s' '' >"$mf_d.pad"; } 2>/dev/null
	mf_lastpid; mf_from=$mf_np
	( set --; . "$mf_D/f/$mf_env"; . "$mf_D/f/$mf_sc" ) </dev/null >>"$mf_d.out" 2>&1
	mf_c=$?
	mf_drain
	mf_next=
	if [ "$mf_c" = 0 ] && [ $# -gt 0 ] && [ ! -e "$mf_halt" ] && mf_claim "${1%%:*}"; then
		mf_next=${1%%:*}
	fi
	: >"$mf_d.pad"
	printf '%s\n' "$mf_c" >"$mf_d.code"
	mf_note
	[ -n "$mf_next" ] || exit 0
	if [ -e "$mf_halt" ]; then
		rm -f "$mf_D/s/$mf_next.sup"; exit 0
	fi
done
`

// lastPidFunction: mf_lastpid sets mf_np to the pid the kernel gave last
// (0 where it cannot be read), from the fifth field of /proc/loadavg.
// Not from /proc/sys/kernel/ns_last_pid: dash and busybox ash read a file
// one byte at a time, and a sysctl file ends after the first byte read
// at a non-zero offset, so they read "1" there, and the check read every
// process's stat (33 ms a stage in the microVM).
const lastPidFunction = `mf_lastpid() {
	{ read -r _ _ _ _ mf_np </proc/loadavg; } 2>/dev/null || mf_np=0
	case $mf_np in ''|*[!0-9]*) mf_np=0;; esac
}
`

// followFunctions follow stages: mf_follow ID FROM streams a stage's
// output from byte FROM, then prints "$T e CODE" when it ended or
// "$T l REASON" when it cannot be followed, or "$T u" when a chained stage
// was not started after all; mf_chain ID FROM NEXT... follows on into the
// stages chained after it, announcing each with "$T n ID", and ends with
// "$T x". A stage whose supervisor is gone (the machine restarted, or it
// was killed) without marking it done is lost. While a stage is silent,
// "$T k" goes out every few seconds: a follower whose connection is gone
// dies of SIGPIPE (or exits, where SIGPIPE is ignored, as under dropbear)
// instead of polling on.
const followFunctions = `read -r mf_boot </proc/sys/kernel/random/boot_id 2>/dev/null || mf_boot=-
mf_alive() {
	[ -r "$1.sup" ] || return 0
	{ read -r mf_p mf_b mf_s <"$1.sup"; } 2>/dev/null || return 0
	[ -n "$mf_p" ] || return 0
	[ "$mf_b" = "$mf_boot" ] || return 1
	{ read -r _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ mf_t _ <"/proc/$mf_p/stat"; } 2>/dev/null || return 1
	[ "$mf_t" = "$mf_s" ]
}
mf_sleep() {
	sleep "$mf_z" 2>/dev/null || sleep 1
	case $mf_z in 0.005) mf_z=0.01;; 0.01) mf_z=0.02;; 0.02) mf_z=0.05;; 0.05) mf_z=0.1;; 0.1) mf_z=0.25;; esac
}
mf_wait() {
	mf_woke=t
	if [ -z "$mf_w" ]; then mf_sleep
	elif [ -n "$mf_rt" ]; then read -t 0.25 -r mf_ev <&5 && mf_woke=n
	elif read -r mf_ev <&5; then mf_woke=$mf_ev
	else mf_sleep
	fi
}
mf_copy() {
	dd bs=65536 <&3 2>/dev/null
}
mf_follow() {
	mf_d=$D/s/$1; mf_z=0.005; mf_i=0
	while [ ! -e "$mf_d.out" ]; do
		if [ ! -e "$mf_d.sup" ] && [ $mf_i -gt 0 ] && [ -z "$mf_launched" ]; then printf '%s u\n' "$T"; return 1; fi
		if [ -s "$mf_d.sup" ] && ! mf_alive "$mf_d" && [ ! -e "$mf_d.out" ]; then printf '%s l the supervisor of stage %s is gone before it started\n' "$T" "$1"; return 1; fi
		mf_i=$((mf_i+1))
		if [ $mf_i -gt 120 ]; then printf '%s l stage %s did not start within 30s\n' "$T" "$1"; return 1; fi
		mf_wait
	done
	exec 3<"$mf_d.out"
	[ "$2" -gt 0 ] && dd bs=1 skip="$2" count=0 <&3 2>/dev/null
	mf_z=0.005; mf_i=0; mf_woke=n
	while :; do
		if [ -s "$mf_d.code" ]; then
			[ ! -s "$mf_d.out" ] || mf_copy; exec 3<&-
			read -r mf_c <"$mf_d.code"
			printf '%s e %s\n' "$T" "$mf_c"
			return 0
		fi
		[ "$mf_woke" = n ] || [ ! -s "$mf_d.out" ] || mf_copy
		mf_i=$((mf_i+1))
		if [ $((mf_i % 4)) = 0 ] && ! mf_alive "$mf_d"; then
			mf_copy; exec 3<&-
			[ -s "$mf_d.code" ] && { read -r mf_c <"$mf_d.code"; printf '%s e %s\n' "$T" "$mf_c"; return 0; }
			printf '%s l the supervisor of stage %s is gone (the machine restarted or it was killed)\n' "$T" "$1"
			return 1
		fi
		[ $((mf_i % 20)) != 0 ] || printf '%s k\n' "$T" || exit 0
		mf_wait
	done
}
mf_chain() {
	mf_follow "$1" "$2" || { printf '%s x\n' "$T"; return 0; }
	shift 2
	mf_launched=
	for mf_n in "$@"; do
		[ "$mf_c" = 0 ] && [ -e "$D/s/$mf_n.sup" ] || break
		printf '%s n %s\n' "$T" "$mf_n"
		mf_follow "$mf_n" 0 || break
	done
	printf '%s x\n' "$T"
}
`

// wakeSetup lets supervisors wake the follower of a session at once when
// a stage starts or ends, instead of at its next poll: the session makes a
// FIFO D/w/$T (each supervisor writes "n" to every FIFO there, see
// mf_note) and reads it in mf_wait, for at most 0.25s so that output of a
// running stage still goes out: with read -t where the shell has it
// (busybox, bash), else (dash) a ticker writes "k" to the FIFO every 0.25s
// and dies of SIGPIPE when the follower is gone. Without mkfifo the
// follower polls with sleep. A running stage's output is read (a dd
// process, mf_copy) only on those timed wakes, not on the events: a short
// stage costs one dd, at its end. dd, not cat: busybox (Debian's) forks
// for dd but forks and execs itself again for cat; under TCG that saves
// some 5 ms a stage.
const wakeSetup = `mf_w=; mf_tick=; mf_rt=
read -t 1 _ </dev/null 2>/dev/null; [ $? -gt 1 ] || mf_rt=1
if { mkfifo "$D/w/$T" || { mkdir -p "$D/w" && mkfifo "$D/w/$T"; }; } 2>/dev/null && exec 5<>"$D/w/$T"; then
	mf_w=$D/w/$T
	if [ -z "$mf_rt" ]; then
		(exec 5<&-; while sleep 0.25 2>/dev/null || sleep 1; do printf 'k\n' || exit 0; done) >"$mf_w" 2>/dev/null &
		mf_tick=$!
	fi
fi
`

// wakeTeardown ends a session's ticker and removes its FIFO.
const wakeTeardown = `[ -z "$mf_tick" ] || kill "$mf_tick" 2>/dev/null
[ -z "$mf_w" ] || { exec 5<&-; rm -f "$mf_w"; }
`

// stopFunctions: mf_stop ID stops a stage: a stage nobody claimed is
// claimed and marked done with 143, so nothing starts it later; otherwise
// its supervisor is told to start nothing more, every process of the
// stage gets SIGTERM and, after GRACE seconds, SIGKILL, and mf_stop waits
// until the stage is marked done (by its supervisor, or here when the
// supervisor is gone). It prints "$T s" when done, "$T l REASON" if not.
const stopFunctions = `mf_members() {
	mf_n=0
	for mf_f in /proc/[0-9]*/stat; do
		{ read -r mf_q _ mf_s _ mf_g _ <"$mf_f"; } 2>/dev/null || continue
		[ "$mf_g" = "$1" ] && [ "$mf_q" != "$1" ] && [ "$mf_s" != Z ] || continue
		mf_n=$((mf_n+1)); [ -n "$2" ] && kill -"$2" "$mf_q" 2>/dev/null
	done
	[ $mf_n -gt 0 ]
}
mf_stop() {
	mf_d=$D/s/$1
	if ( set -C; printf '0 - -\n' >"$mf_d.sup" ) 2>/dev/null; then
		: >"$mf_d.out"; printf '143\n' >"$mf_d.code"; printf '%s s\n' "$T"; return 0
	fi
	[ -s "$mf_d.code" ] && { printf '%s s\n' "$T"; return 0; }
	mf_i=0
	while [ ! -s "$mf_d.sup" ] && [ $mf_i -lt 20 ]; do sleep 0.1; mf_i=$((mf_i+1)); done
	{ read -r mf_p mf_b mf_t <"$mf_d.sup"; } 2>/dev/null || mf_p=
	if [ -n "$mf_p" ] && [ "$mf_p" != 0 ]; then
		: >"$D/halt.$mf_p"
		if [ ! -s "$mf_d.code" ] && mf_alive "$mf_d"; then
			mf_members "$mf_p" TERM
			mf_i=0
			while mf_members "$mf_p" && [ $mf_i -lt $((GRACE*10)) ]; do sleep 0.1; mf_i=$((mf_i+1)); done
			mf_members "$mf_p" KILL
		fi
	fi
	mf_i=0
	while [ ! -s "$mf_d.code" ] && [ $mf_i -lt 150 ]; do
		if ! mf_alive "$mf_d"; then printf '137\n' >"$mf_d.code"; break; fi
		sleep 0.1; mf_i=$((mf_i+1))
	done
	if [ -s "$mf_d.code" ]; then printf '%s s\n' "$T"; else printf '%s l stage %s still runs after SIGKILL\n' "$T" "$1"; fi
}
`

// quote returns s as one single-quoted POSIX shell word.
func quote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// fileWrite is one file the session writes: Name under the staging
// directory (then moved into D/f), or an absolute Path (file variables).
type fileWrite struct {
	Name    string
	Path    string
	Content string
}

// sessionScript builds the script of one session: create the job
// directory, write the files not yet written, start a supervisor for the
// chain unless its first stage was claimed, and follow.
type sessionScript struct {
	dir, token string
	files      []fileWrite
	launch     []string // supervisor SPECs; empty: attach only
	shell      string   // runs the supervisor
	drainSec   int
	follow     []string // stage ids to follow, the first from `from`
	from       int64
}

func (s sessionScript) String() string {
	var b strings.Builder
	b.Grow(4096)
	fmt.Fprintf(&b, "D=%s; T=%s\numask 077\n", quote(s.dir), quote(s.token))
	if len(s.files) > 0 {
		// Each file is written once, then marked whole with NAME.ok: a file
		// a stage may be reading is never written again, and one a session
		// that died left half written is, as it has no mark. Builtins only,
		// but for one mkdir.
		dirs := []string{`"$D/s"`, `"$D/f"`, `"$D/w"`}
		for _, f := range s.files {
			if f.Path != "" {
				dirs = append(dirs, quote(parentDir(f.Path)))
			}
		}
		b.WriteString("mkdir -p " + strings.Join(dirs, " ") + ` || { printf '%s l cannot create the job directory or the directories of its files\n' "$T"; exit 0; }` + "\n")
		for _, f := range s.files {
			target, mark := `"$D/f/`+f.Name+`"`, `"$D/f/`+f.Name+`.ok"`
			if f.Path != "" {
				target, mark = quote(f.Path), `"$D/f/file-`+scriptName(f.Path)+`.ok"`
			}
			fmt.Fprintf(&b, "[ -e %s ] || { printf '%%s' %s >%s && : >%s; } || { printf '%%s l cannot write %%s\\n' \"$T\" %s; exit 0; }\n",
				mark, quote(f.Content), target, mark, target)
		}
		b.WriteString(`printf '%s w\n' "$T"` + "\n")
	}
	b.WriteString(wakeSetup)
	if len(s.launch) > 0 {
		b.WriteString("mf_launched=\n")
		fmt.Fprintf(&b, `if [ ! -e "$D/s/%s.sup" ]; then mf_launched=1; (cd / && exec setsid %s "$D/f/sup.sh" "$D" %d`, s.follow[0], s.shell, s.drainSec)
		for _, sp := range s.launch {
			b.WriteString(" " + sp)
		}
		b.WriteString(") </dev/null >/dev/null 2>&1 5<&- & fi\n")
	}
	b.WriteString(followFunctions)
	fmt.Fprintf(&b, "mf_chain %s %s", s.follow[0], strconv.FormatInt(s.from, 10))
	for _, id := range s.follow[1:] {
		b.WriteString(" " + id)
	}
	b.WriteString("\n" + wakeTeardown)
	return b.String()
}

// stopScript is the script of a Stop session.
func stopScript(dir, token, id string, graceSec int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "D=%s; T=%s; GRACE=%d\n", quote(dir), quote(token), graceSec)
	b.WriteString(followFunctions)
	b.WriteString(stopFunctions)
	fmt.Fprintf(&b, "mf_stop %s\n", id)
	return b.String()
}

func parentDir(p string) string {
	i := strings.LastIndexByte(p, '/')
	if i <= 0 {
		return "/"
	}
	return p[:i]
}
