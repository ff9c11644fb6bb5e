#!/usr/bin/env bash
# Installs what mayfly's build, tests and demo need on a Debian machine.
# Idempotent and quiet: it does nothing when everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v go >/dev/null 2>&1; then
	echo "setup: Go is not installed (need Go 1.26 or newer on PATH)" >&2
	exit 1
fi
