"""The wire format: tensors <-> bytes, chunking, checksums and the compatibility hash.

Every byte that crosses between nodes (activations, packed KV, session
snapshots) is encoded here. A tensor is ``(dtype code, shape, raw
little-endian bytes)``; bfloat16 travels as its 2-byte pattern. Decoding
checks the dtype code and that the byte count equals ``prod(shape) *
itemsize`` before any array is built. Nothing here unpickles or evaluates
what it receives.
"""

import hashlib
import math
import sys
import zlib

import mlx.core as mx
import numpy as np

from ...kernels.turboquant import FORMAT_VERSION

PROTOCOL_VERSION = 1
CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's 4 MiB default message cap
MAX_TENSOR_BYTES = 1 << 30  # refuse to build anything bigger from the network
MAX_RANK = 8
MAX_DIM = (1 << 31) - 1  # MLX shapes are int32

# dtype code -> (mx dtype, numpy dtype of the raw bytes). Codes are part of the
# protocol: never renumber, only add.
DTYPES = {
    1: (mx.float32, np.dtype("<f4")),
    2: (mx.float16, np.dtype("<f2")),
    3: (mx.bfloat16, np.dtype("<u2")),  # raw bit pattern
    4: (mx.uint32, np.dtype("<u4")),
    5: (mx.int32, np.dtype("<i4")),
    6: (mx.uint8, np.dtype("u1")),
    7: (mx.bool_, np.dtype("?")),
}
CODES = {mxd: code for code, (mxd, _) in DTYPES.items()}

assert sys.byteorder == "little", "the wire format assumes a little-endian host"


class WireError(ValueError):
    """Received bytes do not describe a valid tensor or stream."""


def dtype_code(dtype):
    if dtype not in CODES:
        raise WireError(f"dtype {dtype} cannot travel; supported: {sorted(str(d) for d in CODES)}")
    return CODES[dtype]


def tensor_to_bytes(a):
    """``(dtype_code, shape, data)`` for an mx.array, evaluated on the host."""
    code = dtype_code(a.dtype)
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    data = np.asarray(a).tobytes()
    return code, tuple(a.shape), data


def check_tensor(code, shape, data, max_bytes=MAX_TENSOR_BYTES):
    """Raise ``WireError`` unless code, shape and byte count describe a tensor; else its dtypes.

    Callers that build the array later (on another thread) check with this first.
    """
    if type(code) is not int or code not in DTYPES:
        raise WireError(f"unknown dtype code {code!r}; known codes are {sorted(DTYPES)}")
    shape = tuple(shape)
    if len(shape) > MAX_RANK or any(type(d) is not int or not 0 <= d <= MAX_DIM for d in shape):
        raise WireError(f"shape {list(shape)} must be at most {MAX_RANK} ints in [0, {MAX_DIM}]")
    if math.prod(max(d, 1) for d in shape) > max_bytes:  # empty, but absurd in its other dims
        raise WireError(f"shape {list(shape)} is over the {max_bytes}-byte cap")
    mxd, npd = DTYPES[code]
    expected = math.prod(shape) * npd.itemsize
    if expected > max_bytes:
        raise WireError(f"tensor of shape {list(shape)} needs {expected} bytes, over the {max_bytes}-byte cap")
    if len(data) != expected:
        raise WireError(
            f"shape {list(shape)} of {mxd} needs {expected} bytes, got {len(data)}"
        )
    return mxd, npd


def tensor_from_bytes(code, shape, data, max_bytes=MAX_TENSOR_BYTES):
    """Build an mx.array from wire parts, checking code, shape and byte count first."""
    mxd, npd = check_tensor(code, shape, data, max_bytes)
    shape = tuple(shape)
    arr = mx.array(np.frombuffer(data, dtype=npd).reshape(shape))
    return arr.view(mx.bfloat16) if mxd == mx.bfloat16 else arr


def checksum(data):
    """CRC-32 of a chunk: catches corruption in transit (not an authenticity check)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def split_chunks(data, size=CHUNK_BYTES):
    """Yield ``(index, piece, crc32)`` over ``data`` in pieces of at most ``size`` bytes."""
    if size <= 0:
        raise ValueError(f"chunk size must be positive, got {size}")
    view = memoryview(data)
    n = max(1, -(-len(data) // size))
    for i in range(n):
        piece = bytes(view[i * size : (i + 1) * size])
        yield i, piece, checksum(piece)


def join_chunks(chunks, total_bytes=None, max_bytes=MAX_TENSOR_BYTES):
    """Reassemble ``(index, piece, crc32)`` chunks, verifying order, checksums and size."""
    parts, size = [], 0
    for expected_index, (index, piece, crc) in enumerate(chunks):
        if index != expected_index:
            raise WireError(f"chunk {index} arrived where chunk {expected_index} was expected")
        if checksum(piece) != crc:
            raise WireError(f"chunk {index} failed its checksum")
        size += len(piece)
        if size > max_bytes:
            raise WireError(f"stream exceeds the {max_bytes}-byte cap")
        parts.append(piece)
    data = b"".join(parts)
    if total_bytes is not None and len(data) != total_bytes:
        raise WireError(f"stream announced {total_bytes} bytes, got {len(data)}")
    return data


def compat_hash(model_identity, protocol_version=PROTOCOL_VERSION, format_version=FORMAT_VERSION):
    """What two peers must agree on before exchanging tensors: protocol, codec format, model."""
    text = f"turbo-cluster/protocol={protocol_version}/format={format_version}/model={model_identity}"
    return hashlib.sha256(text.encode()).hexdigest()


# --- proto Tensor <-> mx.array (the only place the proto's Tensor is built or read) ---


def to_proto(a, with_data=True):
    """A ``turbocluster.v1.Tensor`` for ``a``; ``with_data=False`` leaves the bytes out (stream header)."""
    from ...proto import turbo_pb2

    code, shape, data = tensor_to_bytes(a)
    return turbo_pb2.Tensor(dtype=code, shape=shape, data=data if with_data else b""), data


def from_proto(t, data=None, max_bytes=MAX_TENSOR_BYTES):
    """Build an mx.array from a proto Tensor (``data`` overrides ``t.data`` for chunked payloads)."""
    return tensor_from_bytes(int(t.dtype), [int(d) for d in t.shape], t.data if data is None else data, max_bytes)


def proto_chunks(data, size=CHUNK_BYTES):
    """``turbocluster.v1.Chunk`` messages over ``data``."""
    from ...proto import turbo_pb2

    for index, piece, crc in split_chunks(data, size):
        yield turbo_pb2.Chunk(index=index, data=piece, crc32=crc)


def join_proto_chunks(chunks, total_bytes=None, max_bytes=MAX_TENSOR_BYTES):
    """Reassemble proto Chunks, checking order, checksums and total size."""
    return join_chunks(((c.index, c.data, c.crc32) for c in chunks), total_bytes, max_bytes)
