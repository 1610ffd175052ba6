#!/usr/bin/env bash
# Regenerate the committed gRPC Python code from turbocluster/proto/turbo.proto.
# Usage: scripts/gen_proto.sh [OUT_DIR]   (default: turbocluster/proto)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-turbocluster/proto}
# The project's own venv has grpcio-tools (the test extra); a bare python3 usually does not.
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
mkdir -p "$OUT"
"$PY" -m grpc_tools.protoc -I turbocluster/proto \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  turbocluster/proto/turbo.proto
# protoc writes `import turbo_pb2`; make it package-relative.
sed -i.bak 's/^import turbo_pb2 as turbo__pb2$/from . import turbo_pb2 as turbo__pb2/' "$OUT/turbo_pb2_grpc.py"
rm -f "$OUT/turbo_pb2_grpc.py.bak"
