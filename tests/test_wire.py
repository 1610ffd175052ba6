"""The wire format: tensors round-trip exactly and bad bytes are refused before use."""

import mlx.core as mx
import pytest

from turbocluster.kernels import FORMAT_VERSION
from turbocluster.runtime.transport import wire


@pytest.mark.parametrize(
    "array",
    [
        mx.random.normal((2, 3, 5)),
        mx.random.normal((4, 8)).astype(mx.float16),
        mx.random.normal((4, 8)).astype(mx.bfloat16),
        mx.array([0, 1, 0xFFFFFFFF], dtype=mx.uint32),
        mx.array([-5, 7], dtype=mx.int32),
        mx.array([True, False]),
        mx.zeros((0, 64)),
    ],
)
def test_tensor_round_trips_bit_exactly(array):
    code, shape, data = wire.tensor_to_bytes(array)
    assert len(data) == array.nbytes
    back = wire.tensor_from_bytes(code, shape, data)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert mx.array_equal(back, array)


def test_bfloat16_travels_as_its_two_byte_pattern():
    a = mx.array([1.0, -2.5], dtype=mx.bfloat16)
    _, _, data = wire.tensor_to_bytes(a)
    assert data == bytes([0x80, 0x3F, 0x20, 0xC0])


def test_byte_count_is_checked_against_shape_before_building():
    code, shape, data = wire.tensor_to_bytes(mx.random.normal((3, 4)))
    with pytest.raises(wire.WireError, match="needs 48 bytes, got 44"):
        wire.tensor_from_bytes(code, shape, data[:-4])
    with pytest.raises(wire.WireError, match="unknown dtype code 99"):
        wire.tensor_from_bytes(99, shape, data)
    with pytest.raises(wire.WireError, match="must be at most"):
        wire.tensor_from_bytes(code, (3, -4), data)
    with pytest.raises(wire.WireError, match="cap"):
        wire.tensor_from_bytes(code, (1 << 20, 1 << 20), data)


def test_chunks_reassemble_and_detect_corruption_reordering_and_truncation():
    data = bytes(range(256)) * 3000
    chunks = list(wire.split_chunks(data, size=100_000))
    assert len(chunks) == 8 and all(len(p) <= 100_000 for _, p, _ in chunks)
    assert wire.join_chunks(chunks, total_bytes=len(data)) == data
    bad = list(chunks)
    i, piece, crc = bad[3]
    bad[3] = (i, piece[:-1] + bytes([piece[-1] ^ 1]), crc)
    with pytest.raises(wire.WireError, match="chunk 3 failed its checksum"):
        wire.join_chunks(bad)
    with pytest.raises(wire.WireError, match="where chunk 1 was expected"):
        wire.join_chunks([chunks[0], chunks[2]])
    with pytest.raises(wire.WireError, match="announced"):
        wire.join_chunks(chunks[:-1], total_bytes=len(data))


def test_compat_hash_changes_with_model_protocol_and_format():
    base = wire.compat_hash("model-a")
    assert base == wire.compat_hash("model-a")
    assert base != wire.compat_hash("model-b")
    assert base != wire.compat_hash("model-a", protocol_version=wire.PROTOCOL_VERSION + 1)
    assert base != wire.compat_hash("model-a", format_version=FORMAT_VERSION + 1)
