#!/usr/bin/env bash
# The local demo behind `make run`: the built-in coordinator playing GitLab
# for the sample project testdata/projects/demo (its own .gitlab-ci.yml, its
# repository over git's smart HTTP, a container registry), and mayfly run on
# testdata/local.toml: a fresh qemu microVM of the debian-docker profile per
# job, isolated egress. Each job clones the project in its VM; one runs in a
# container with a service, one hands an artifact and a dotenv variable to a
# later stage, one fails (allowed), and a cache written by the first run is
# restored by the next. It checks those outcomes from the stored traces, then
# drains the runner and checks that no VM is left.
#
#   scripts/demo.sh            the project pipeline above (make run)
#   scripts/demo.sh busybox    the faster pipeline-file demo on busybox VMs
#                              without git or Docker (make run-busybox)
#
# Expects bin/ built (make run does it) and the tools scripts/setup.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=bin
ADDR=127.0.0.1:8929
EXTERNAL=http://10.0.2.2:${ADDR##*:}
CACHE=.cache/mayfly
STATE=$CACHE/qemu
mode=${1:-project}
mkdir -p "$CACHE"
start=$(date +%s)

coord_pid=
run_pid=
cleanup() {
	[ -n "$run_pid" ] && kill -TERM "$run_pid" 2>/dev/null && wait "$run_pid" 2>/dev/null || true
	[ -n "$coord_pid" ] && kill -TERM "$coord_pid" 2>/dev/null && wait "$coord_pid" 2>/dev/null || true
}
trap cleanup EXIT

# no_vm_left fails when a qemu process of the demo's state dir is running.
no_vm_left() {
	local left
	left=$(pgrep -af "qemu-system.*$STATE" || true)
	if [ -n "$left" ]; then
		echo "ERROR: qemu processes left running:" >&2
		echo "$left" >&2
		exit 1
	fi
	echo "== no VM left running ($(($(date +%s) - start)) s in all)"
}

# drain stops the runner manager gracefully: running jobs finish, every VM is deleted.
drain() {
	echo "== draining the runner manager (SIGQUIT)"
	kill -QUIT "$run_pid"
	wait "$run_pid"
	run_pid=
}

if [ "$mode" = busybox ]; then
	"$BIN/mayfly" image build >/dev/null 2>"$CACHE/image-build.log" || {
		cat "$CACHE/image-build.log" >&2
		exit 1
	}
	echo "== coordinator on http://$ADDR with testdata/pipelines/demo.yaml"
	"$BIN/mayfly" coordinator --listen "$ADDR" --pipeline testdata/pipelines/demo.yaml \
		--external-url "$EXTERNAL" --runner-token local-runner-token --exit-when-done --progress 2>/dev/null &
	coord_pid=$!
	sleep 1
	echo "== mayfly run --config testdata/local-busybox.toml (fleet view every 3s; logs in $CACHE/run.log)"
	"$BIN/mayfly" run --config testdata/local-busybox.toml --plugin-dir "$BIN" --view 3s 2>"$CACHE/run.log" &
	run_pid=$!
	# The coordinator exits once every job has finished.
	wait "$coord_pid" || true
	coord_pid=
	drain
	no_vm_left
	echo "   (artifacts went from build to unit through the coordinator; run it"
	echo "   again and build's trace says the cache came back from the local store)"
	exit 0
elif [ "$mode" != project ]; then
	echo "usage: $0 [busybox]" >&2
	exit 2
fi

PROJECT=testdata/projects/demo
rand() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }
ADMIN=mfa-$(rand)
PUSH=mfp-$(rand)
# api PATH [CURL_ARGS...]: the coordinator's admin API.
api() {
	local path=$1
	shift
	curl -sS --fail --max-time 10 -H "Private-Token: $ADMIN" "$@" "http://$ADDR/-/mayfly$path"
}

t=$(date +%s)
echo "== VM image debian-docker (mayfly image build; cached by a hash of its inputs, the first build takes ~10 min)"
"$BIN/mayfly" image build --profile debian-docker >/dev/null 2>"$CACHE/image-build.log" || {
	cat "$CACHE/image-build.log" >&2
	exit 1
}
echo "   ready ($(($(date +%s) - t)) s)"

# The coordinator's state (the registry above all) survives from one run to
# the next, so the images are pushed once and later runs only check them.
echo "== coordinator on http://$ADDR (jobs see it at $EXTERNAL) with --project $PROJECT"
"$BIN/mayfly" coordinator --listen "$ADDR" --external-url "$EXTERNAL" --project "$PROJECT" \
	--state-dir "$CACHE/coordinator" --admin-token "$ADMIN" --push-token "$PUSH" \
	--runner-token local-runner-token --progress 2>"$CACHE/coordinator.log" > >(grep --line-buffered -v token) &
coord_pid=$!
for _ in $(seq 50); do
	api /info >/dev/null 2>&1 && break
	sleep 0.2
done
api /info >/dev/null

t=$(date +%s)
echo "== container images from Debian packages into the coordinator's registry (mayfly image push-debian)"
"$BIN/mayfly" image push-debian --registry "$ADDR" --push-token "$PUSH" --images redis \
	--cache-dir "$CACHE" 2>"$CACHE/push.log" | sed 's/^/   /' || {
	cat "$CACHE/push.log" >&2
	exit 1
}
echo "   ($(($(date +%s) - t)) s)"

echo "== mayfly run --config testdata/local.toml (fleet view every 30s; logs in $CACHE/run.log)"
"$BIN/mayfly" run --config testdata/local.toml --plugin-dir "$BIN" --view 30s 2>"$CACHE/run.log" &
run_pid=$!

# Wait until every job is final (the admin API answers 504 after its timeout).
ok=
for _ in 1 2; do
	if api "/wait?timeout=600s" --max-time 620 -X POST >/dev/null 2>&1; then ok=1 && break; fi
	kill -0 "$run_pid" 2>/dev/null || break
done
if [ -z "$ok" ]; then
	echo "ERROR: the pipeline did not finish; see $CACHE/run.log" >&2
	exit 1
fi
echo "== pipeline done"
jobs=$(api /jobs)
drain

# check JOB STATUS PATTERN...: the job's status and the trace lines that
# show what it did (each PATTERN must match a line; all matching lines are printed).
failed=0
check() {
	local name=$1 want=$2 id status trace
	shift 2
	id=$(jq -r --arg n "$name" '[.[] | select(.name == $n)] | last | .id' <<<"$jobs")
	status=$(jq -r --arg n "$name" '[.[] | select(.name == $n)] | last | .status' <<<"$jobs")
	trace=$(api "/jobs/$id/trace" | tr -d '\r' | sed -E 's/section_(start|end):[0-9]+:[^\x1b]*\x1b\[0K//g; s/\x1b\[[0-9;]*[A-Za-z]//g')
	echo "-- job $id $name: $status (want $want)"
	[ "$status" = "$want" ] || failed=1
	for pat in "$@"; do
		if ! grep -E -- "$pat" <<<"$trace" | sed 's/^/   | /'; then
			echo "   MISSING in the trace: $pat"
			failed=1
		fi
	done
}
echo "== what the traces say"
check build success 'Fetching changes with git depth|Initialized empty Git|Created fresh repository' \
	'Checking out [0-9a-f]+' 'Checking cache for|Successfully extracted cache|no cache yet|cache restored' \
	'Uploading artifacts|Created cache|Saving cache'
check lint failed 'Checking out [0-9a-f]+' 'TODO' 'ERROR: Job failed'
check check-db success 'Starting service .*redis' 'Pulling docker image .*/mayfly/redis' \
	'PRETTY_NAME' 'hello, built from' 'built by job [0-9]+' 'answered \+PONG'
echo "== where each job's time went (from $CACHE/run.log; pick-up to script start, then each phase)"
awk '/msg="job script starting"/ { for (i = 1; i <= NF; i++) if ($i ~ /^(job|pickup_to_start_seconds)=/) { split($i, kv, "="); v[kv[1]] = kv[2] }
	start[v["job"]] = v["pickup_to_start_seconds"] }
/msg="job phases"/ { line = ""; job = ""
	for (i = 1; i <= NF; i++) {
		if ($i ~ /^job=/) job = substr($i, 5)
		if ($i ~ /^phases\./ && $i !~ /(reserve|request|ready_check|trace_flush|final_update|release)=/) { sub(/^phases\.(stage_)?/, "", $i); line = line " " $i }
	}
	printf "   job %s: pick-up to script start %.1fs;%s\n", job, start[job], line }' "$CACHE/run.log"

# Cleanup first: the VMs must be gone whatever the traces said.
trap - EXIT
kill -TERM "$coord_pid" 2>/dev/null && wait "$coord_pid" 2>/dev/null || true
coord_pid=
no_vm_left
if [ "$failed" -ne 0 ]; then
	echo "ERROR: the pipeline did not do what the demo expects (above); logs in $CACHE/run.log" >&2
	exit 1
fi
echo "   (run make run again: build's trace then says the cache came back from the local store)"
