#!/usr/bin/env bash
# The local demo behind `make run`: the built-in coordinator with a small
# pipeline, and mayfly run on testdata/local.toml with real qemu microVMs.
# Prints each job's outcome and the fleet as it goes, stops by itself when
# the pipeline is done, and checks that no VM is left running.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=bin
ADDR=127.0.0.1:8929
STATE=.cache/mayfly/qemu

"$BIN/mayfly" image build

coord_pid=
run_pid=
cleanup() {
	[ -n "$run_pid" ] && kill -TERM "$run_pid" 2>/dev/null && wait "$run_pid" 2>/dev/null || true
	[ -n "$coord_pid" ] && kill -TERM "$coord_pid" 2>/dev/null && wait "$coord_pid" 2>/dev/null || true
}
trap cleanup EXIT

echo "== coordinator on http://$ADDR with testdata/pipelines/demo.yaml"
"$BIN/mayfly" coordinator --listen "$ADDR" --pipeline testdata/pipelines/demo.yaml \
	--external-url "http://10.0.2.2:${ADDR##*:}" --runner-token local-runner-token --exit-when-done --progress 2>/dev/null &
coord_pid=$!
sleep 1

echo "== mayfly run --config testdata/local.toml (fleet view every 3s; logs in .cache/mayfly/run.log)"
"$BIN/mayfly" run --config testdata/local.toml --plugin-dir "$BIN" --view 3s 2>.cache/mayfly/run.log &
run_pid=$!

# The coordinator exits once every job has finished.
wait "$coord_pid" || true
coord_pid=
echo "== pipeline done: draining the runner manager (SIGQUIT)"
kill -QUIT "$run_pid"
wait "$run_pid"
run_pid=

left=$(pgrep -af "qemu-system.*$STATE" || true)
if [ -n "$left" ]; then
	echo "ERROR: qemu processes left running:" >&2
	echo "$left" >&2
	exit 1
fi
echo "== no VM left running"
echo "   (artifacts went from build to unit through the coordinator; run make run"
echo "   again and build's trace says the cache came back from the local store)"
