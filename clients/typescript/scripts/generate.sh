#!/bin/sh
# Generates the TypeScript stubs for proto/plait/v1 into OUT_DIR (src/gen for the committed ones).
#
# ts-proto (pinned in package.json) runs as a protoc plugin under the protoc of the repo's venv
# (grpc_tools), with the google/protobuf and google/rpc protos from the venv's packages, exactly
# as `make proto` finds them for Python. tests/unit/test_typescript_stubs.py runs this into a
# temp dir and fails when the result differs from src/gen.
set -eu
out=${1:?usage: scripts/generate.sh OUT_DIR}
pkg=$(cd "$(dirname "$0")/.." && pwd)
root=$(cd "$pkg/../.." && pwd)
py=${PLAIT_PYTHON:-$root/.venv/bin/python}
plugin=$pkg/node_modules/.bin/protoc-gen-ts_proto
[ -x "$plugin" ] || { echo "generate.sh: $plugin is missing: run npm ci in $pkg" >&2; exit 1; }
google=$("$py" -c 'import os, google.rpc; print(os.path.dirname(os.path.dirname(google.rpc.__path__[0])))')
grpc=$("$py" -c 'import os, grpc_tools; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
mkdir -p "$out"
out=$(cd "$out" && pwd)
# Stubs of protos that no longer exist must not linger.
find "$out" -name '*.ts' -type f -exec rm -f {} +
cd "$root"
"$py" -m grpc_tools.protoc -Iproto -I"$google" -I"$grpc" \
  --plugin=protoc-gen-ts_proto="$plugin" \
  --ts_proto_out="$out" \
  --ts_proto_opt=outputServices=grpc-js,env=node,esModuleInterop=true,forceLong=bigint,oneof=unions-value \
  proto/plait/v1/*.proto
