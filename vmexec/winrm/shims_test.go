package winrm

import "github.com/mayfly-ci/mayfly/vmexec/winrm/wsmantest"

// shims are the sh stand-ins for this package's fixed PowerShell bodies,
// used by the test server when pwsh is not installed. Each does what the
// PowerShell body does, with the same variables and exit codes.
func shims() map[string]wsmantest.Shim {
	return map[string]wsmantest.Shim{
		loaderBody: {StdinProgram: true},
		chunkBody: {Sh: `
mkdir -p -- "$(dirname -- "$mayflyTemp")" || exit 1
mayfly_c="$mayflyTemp.chunk.$$"
if ! base64 -d > "$mayfly_c"; then echo "chunk at offset $mayflyOffset: invalid base64" >&2; rm -f -- "$mayfly_c"; exit 2; fi
n=$(wc -c < "$mayfly_c")
if [ "$n" -ne "$mayflyLength" ]; then
  echo "chunk at offset $mayflyOffset: received $n bytes, expected $mayflyLength" >&2; rm -f -- "$mayfly_c"; exit 2
fi
[ -e "$mayflyTemp" ] || : > "$mayflyTemp"
cur=$(wc -c < "$mayflyTemp")
if [ "$cur" -lt "$mayflyOffset" ]; then
  echo "temporary file $mayflyTemp has $cur bytes, fewer than the offset $mayflyOffset" >&2; rm -f -- "$mayfly_c"; exit 3
fi
dd if="$mayfly_c" of="$mayflyTemp" bs=65536 seek="$mayflyOffset" oflag=seek_bytes conv=notrunc status=none || exit 1
truncate -s "$((mayflyOffset + mayflyLength))" -- "$mayflyTemp" || exit 1
rm -f -- "$mayfly_c"
exit 0`},
		finalizeBody: {Sh: `
sum() { sha256sum < "$1" | cut -d' ' -f1; }
if [ ! -f "$mayflyTemp" ]; then
  if [ -f "$mayflyPath" ] && [ "$(sum "$mayflyPath")" = "$mayflySHA256" ]; then exit 0; fi
  echo "temporary file $mayflyTemp is missing" >&2; exit 2
fi
n=$(wc -c < "$mayflyTemp")
if [ "$n" -ne "$mayflyLength" ]; then echo "temporary file $mayflyTemp has $n bytes, expected $mayflyLength" >&2; exit 3; fi
if [ "$(sum "$mayflyTemp")" != "$mayflySHA256" ]; then
  echo "temporary file $mayflyTemp does not have the expected SHA-256 $mayflySHA256" >&2; exit 4
fi
mv -f -- "$mayflyTemp" "$mayflyPath"
exit 0`},
		cleanupBody: {Sh: `rm -f -- "$mayflyTemp"; exit 0`},
	}
}
