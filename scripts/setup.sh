#!/usr/bin/env bash
# Installs what mayfly's build, tests and demo need on a Debian machine:
# Debian packages for the real parts the tests use (OpenSSH's sshd and
# dropbear as SSH servers, git, promtool) and, through setup-vm.sh, qemu and
# the microVM image inputs. Idempotent and quiet: it does nothing when
# everything is present, and never reads standard input.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

need_go="1.26"
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
	export PATH="/usr/local/go/bin:$PATH"
fi
if ! command -v go >/dev/null 2>&1; then
	echo "setup: Go $need_go or newer is needed on PATH (expected at /usr/local/go/bin/go); Debian's golang-go is too old" >&2
	exit 1
fi
have_go="$(go env GOVERSION | sed 's/^go//')"
if [ "$(printf '%s\n%s\n' "$need_go" "$have_go" | sort -V | head -1)" != "$need_go" ]; then
	echo "setup: Go $need_go or newer is needed, found $have_go" >&2
	exit 1
fi

as_root() {
	if [ "$(id -u)" -eq 0 ]; then
		"$@"
	elif command -v sudo >/dev/null 2>&1; then
		sudo -n "$@"
	else
		echo "setup: need root to run: $*" >&2
		return 1
	fi
}

# Packages whose programs the tests run for real (docker.io: a private
# dockerd per test run, see vmexec/dockertest; never the system service;
# curl and jq: scripts/demo.sh reads the coordinator's admin API).
packages=(git openssh-server openssh-client dropbear-bin prometheus docker.io curl jq)
missing=()
for pkg in "${packages[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
		missing+=("$pkg")
	fi
done
if [ "${#missing[@]}" -gt 0 ]; then
	echo "setup: installing ${missing[*]}" >&2
	as_root apt-get update -qq </dev/null >/dev/null
	as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
fi

scripts/setup-vm.sh

# The VM images the tests and the demo boot, built here once (cached by a
# hash of their inputs: a second run does nothing) rather than inside the
# tests, where a first build of debian-docker (minutes under software
# emulation's neighbours) ran into the package's test timeout and starved
# the tests beside it. The Debian profiles need root (mmdebstrap).
profiles=(busybox)
if [ "$(id -u)" -eq 0 ]; then
	profiles+=(debian debian-docker)
fi
mkdir -p .cache/mayfly
go build -o .cache/mayfly/setup-mayfly ./cmd/mayfly
for p in "${profiles[@]}"; do
	if ! .cache/mayfly/setup-mayfly image build --profile "$p" >/dev/null 2>.cache/mayfly/setup-image-build.log; then
		tail -30 .cache/mayfly/setup-image-build.log >&2
		echo "setup: mayfly image build --profile $p failed (log: .cache/mayfly/setup-image-build.log)" >&2
		exit 1
	fi
done
