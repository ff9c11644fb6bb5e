#!/bin/sh
# Regenerates the Go code for the provider plugin wire protocol.
# Needs protoc (Debian: protobuf-compiler) and the Go plugins:
#   go install google.golang.org/protobuf/cmd/protoc-gen-go@latest
#   go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@latest
set -eu

root=$(cd "$(dirname "$0")/../.." && pwd)
gobin=$(go env GOBIN)
[ -n "$gobin" ] || gobin="$(go env GOPATH)/bin"
PATH="$gobin:$PATH"
export PATH

for tool in protoc protoc-gen-go protoc-gen-go-grpc; do
	if ! command -v "$tool" >/dev/null 2>&1; then
		echo "generate.sh: $tool not found in PATH ($PATH)" >&2
		exit 1
	fi
done

module=github.com/mayfly-ci/mayfly
cd "$root"
protoc \
	-I providers/proto \
	--go_out=. --go_opt=module="$module" \
	--go-grpc_out=. --go-grpc_opt=module="$module" \
	providers/proto/providerv1/provider.proto
