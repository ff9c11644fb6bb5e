#!/usr/bin/env bash
# Prepares what the local qemu microVMs need (see provisioner/image):
#   - installs Debian's qemu-system-x86, busybox-static, dropbear-bin and cpio (the busybox
#     image), qemu-utils (each Debian VM's copy-on-write disk), mmdebstrap and e2fsprogs (the
#     Debian images' rootfs and disk) and iproute2 (the egress tests' network namespaces)
#     when missing;
#   - downloads (never installs) the kernel package that linux-image-amd64 depends on into
#     .cache/mayfly/debs/, where `mayfly image build` finds it.
# Idempotent, quiet and non-interactive; does nothing when everything is present.
# Needs root (or sudo) only when a package must be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_DIR="${MAYFLY_DEB_DIR:-.cache/mayfly/debs}"
export DEBIAN_FRONTEND=noninteractive

as_root() {
	if [ "$(id -u)" -eq 0 ]; then
		"$@"
	elif command -v sudo >/dev/null 2>&1; then
		sudo -n "$@"
	else
		echo "setup-vm: need root to run: $*" >&2
		return 1
	fi
}

missing=()
for pkg in qemu-system-x86 qemu-utils busybox-static dropbear-bin cpio mmdebstrap e2fsprogs iproute2; do
	if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
		missing+=("$pkg")
	fi
done

apt_updated=0
apt_update() {
	if [ "$apt_updated" -eq 0 ]; then
		as_root apt-get update -qq </dev/null >/dev/null
		apt_updated=1
	fi
}

if [ "${#missing[@]}" -gt 0 ]; then
	echo "setup-vm: installing ${missing[*]}" >&2
	apt_update
	as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
fi

# The versioned kernel package behind the linux-image-amd64 metapackage, e.g. linux-image-6.1.0-56-amd64.
kernel_pkg() {
	apt-cache depends linux-image-amd64 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-amd64$/ { print $2; exit }'
}

kpkg="$(kernel_pkg)"
if [ -z "$kpkg" ]; then
	apt_update
	kpkg="$(kernel_pkg)"
fi
if [ -z "$kpkg" ]; then
	echo "setup-vm: cannot resolve the kernel package: 'apt-cache depends linux-image-amd64' names no linux-image-*-amd64" >&2
	exit 1
fi

mkdir -p "$DEB_DIR"
DEB_DIR="$(cd "$DEB_DIR" && pwd)"
if ! compgen -G "$DEB_DIR/${kpkg}_*.deb" >/dev/null; then
	echo "setup-vm: downloading $kpkg into $DEB_DIR" >&2
	tmp="$(mktemp -d "$DEB_DIR/.download.XXXXXX")"
	trap 'rm -rf "$tmp"' EXIT
	# apt-get download writes into the current directory; as root it warns that the download
	# is unsandboxed (the _apt user cannot write here), which is expected.
	(cd "$tmp" && apt-get download -qq "$kpkg" </dev/null >/dev/null 2>"$tmp/err") || {
		cat "$tmp/err" >&2
		echo "setup-vm: apt-get download $kpkg failed" >&2
		exit 1
	}
	mv "$tmp"/"${kpkg}"_*.deb "$DEB_DIR"/
fi
