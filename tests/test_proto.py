"""The .proto contract: generated code is current, every field documented, dtypes agree with wire.py."""

import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from turbocluster.proto import turbo_pb2 as pb
from turbocluster.runtime.transport import wire

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "turbocluster" / "proto" / "turbo.proto"
GENERATED = ("turbo_pb2.py", "turbo_pb2_grpc.py", "turbo_pb2.pyi")


def test_committed_generated_code_matches_the_proto(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)  # the interpreter running the tests has grpcio-tools
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, cwd=ROOT, env=env)
    for name in GENERATED:
        fresh = (tmp_path / name).read_text()
        committed = (PROTO.parent / name).read_text()
        assert fresh == committed, f"{name} is stale: run scripts/gen_proto.sh"


def test_generated_grpc_import_is_package_relative():
    text = (PROTO.parent / "turbo_pb2_grpc.py").read_text()
    assert "from . import turbo_pb2" in text
    assert not re.search(r"^import turbo_pb2", text, re.MULTILINE)


def test_every_field_and_rpc_is_documented():
    lines = PROTO.read_text().splitlines()
    field = re.compile(r"^\s+(repeated |optional )?[\w.]+\s+\w+\s*=\s*\d+;")
    rpc = re.compile(r"^\s+rpc \w+")
    for i, line in enumerate(lines):
        if field.match(line):
            assert "//" in line or lines[i - 1].strip().startswith("//"), f"line {i + 1} undocumented: {line}"
        if rpc.match(line):
            assert lines[i - 1].strip().startswith("//"), f"rpc on line {i + 1} undocumented: {line}"


def test_package_is_versioned():
    assert "package turbocluster.v1;" in PROTO.read_text()
    assert pb.DESCRIPTOR.package == "turbocluster.v1"


def test_dtype_enum_equals_wire_codes():
    for code, (mxd, _) in wire.DTYPES.items():
        name = {mx.float32: "FLOAT32", mx.float16: "FLOAT16", mx.bfloat16: "BFLOAT16", mx.uint32: "UINT32",
                mx.int32: "INT32", mx.uint8: "UINT8", mx.bool_: "BOOL"}[mxd]
        assert pb.DType.Value(name) == code


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16, mx.int32])
def test_tensor_round_trips_through_proto_bytes(dtype):
    a = (mx.arange(24).reshape(2, 3, 4) * 0.37).astype(dtype)
    t, _ = wire.to_proto(a)
    back = wire.from_proto(pb.Tensor.FromString(t.SerializeToString()))
    assert back.dtype == dtype and back.shape == a.shape
    assert mx.array_equal(back, a).item()


def test_tensor_with_wrong_byte_count_is_refused_before_building():
    t, _ = wire.to_proto(mx.zeros((1, 4, 8), dtype=mx.float16))
    t.data = t.data[:-2]
    with pytest.raises(wire.WireError, match="needs 64 bytes, got 62"):
        wire.from_proto(t)


def test_large_payload_goes_in_checked_chunks_under_4_mib():
    raw = bytes(range(256)) * (3 * wire.CHUNK_BYTES // 256 + 7)
    chunks = list(wire.proto_chunks(raw))
    assert len(chunks) == 4 and all(len(c.data) <= wire.CHUNK_BYTES < (4 << 20) for c in chunks)
    assert wire.join_proto_chunks(chunks, total_bytes=len(raw)) == raw
    chunks[1].data = b"x" + chunks[1].data[1:]
    with pytest.raises(wire.WireError, match="checksum"):
        wire.join_proto_chunks(chunks)
