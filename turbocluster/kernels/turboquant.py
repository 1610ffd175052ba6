"""The reference TurboQuant codec: rotation, quantisation, bit packing, encode and decode.

The format itself (versions, codebooks, sign vector, sizes) is ``format``'s;
this module turns it into plain ``mx`` ops, so it runs on every MLX device and
is the reference that every fast path must match bit for bit.
"""

import functools
import math

import mlx.core as mx

from . import fast
from .format import (  # noqa: F401  (re-exported: the reference's callers read them here too)
    FORMAT_VERSION,
    MIN_BLOCK,
    SIGN_SEED,
    SUPPORTED_BITS,
    _check_bits,
    boundaries,
    centroids,
    check_dim,
    dim_from_words,
    field_indices,
    packed_words,
    rotation_blocks,
    sign_list,
    vector_nbytes,
)

SCALE_MODES = ("norm", "length", "lsq")
DEFAULT_SCALE_MODE = "lsq"
INPUT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
CHUNK_VECTORS = 1 << 16  # vectors per compiled call; bounds transient memory


def _hadamard(x, dim, inverse):
    blocks = rotation_blocks(dim)
    signs = mx.array(sign_list(dim), dtype=mx.float32)
    if not inverse:
        x = x * signs
    if len(blocks) == 1:
        y = mx.hadamard_transform(x, scale=1 / math.sqrt(dim))
    else:
        parts, start = [], 0
        for b in blocks:
            parts.append(mx.hadamard_transform(x[..., start : start + b], scale=1 / math.sqrt(b)))
            start += b
        y = mx.concatenate(parts, axis=-1)
    if inverse:
        y = y * signs
    return y


def _check_float(x, name="x"):
    if not isinstance(x, mx.array):
        raise TypeError(f"{name} must be an mx.array, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one axis (the head dim)")
    check_dim(x.shape[-1])


def rotate(x):
    """Rotate the last axis into the quantization space: H . diag(signs) . x, in float32.

    The rotation is orthonormal, so <rotate(q), rotate(k)> == <q, k>.
    """
    _check_float(x)
    return _hadamard(x.astype(mx.float32), x.shape[-1], inverse=False)


def unrotate(y):
    """Inverse of ``rotate``: diag(signs) . H . y, in float32."""
    _check_float(y, "y")
    return _hadamard(y.astype(mx.float32), y.shape[-1], inverse=True)


# --- bit packing -----------------------------------------------------------------


def pack(indices, bits):
    """Pack uint32 indices < 2**bits along the last axis into uint32 words.

    Index i of a vector occupies bits [i*bits, (i+1)*bits) of a little-endian bit
    stream; word k holds stream bits [32k, 32k+32), bit 0 being the least
    significant. Trailing bits of the last word are zero.
    """
    _check_bits(bits)
    dim = indices.shape[-1]
    words = packed_words(dim, bits)
    groups = -(-dim // 32)  # 32 indices fill exactly `bits` words
    lead = indices.shape[:-1]
    idx = indices.astype(mx.uint32)
    if groups * 32 != dim:
        idx = mx.pad(idx, [(0, 0)] * len(lead) + [(0, groups * 32 - dim)])
    idx = idx.reshape(*lead, groups, 32)
    out = []
    for k in range(bits):
        # Indices starting in word k, shifted into place; disjoint bits, so sum == or.
        first, last = -(-32 * k // bits), -(-32 * (k + 1) // bits)
        shifts = mx.array([(i * bits) % 32 for i in range(first, last)], dtype=mx.uint32)
        w = mx.left_shift(idx[..., first:last], shifts).sum(axis=-1)
        prev_shift = ((first - 1) * bits) % 32
        if first > 0 and prev_shift + bits > 32:  # the high bits of the index before
            w = w + mx.right_shift(idx[..., first - 1], 32 - prev_shift)
        out.append(w.astype(mx.uint32))
    return mx.stack(out, axis=-1).reshape(*lead, groups * bits)[..., :words]


def unpack(packed, bits, dim):
    """Inverse of ``pack``: uint32 words -> uint32 indices of shape [..., dim]."""
    _check_bits(bits)
    words = packed_words(dim, bits)
    if packed.dtype != mx.uint32:
        raise ValueError(f"packed must be uint32, got {packed.dtype}")
    if packed.shape[-1] != words:
        raise ValueError(
            f"{dim} indices of {bits} bits need {words} words, got {packed.shape[-1]}"
        )
    groups = -(-dim // 32)
    lead = packed.shape[:-1]
    if groups * bits != words:
        packed = mx.pad(packed, [(0, 0)] * len(lead) + [(0, groups * bits - words)])
    w = packed.reshape(*lead, groups, bits)
    # Static slices per word rather than a gather: MLX fuses shifts, not gathers.
    pieces = []
    for k in range(bits):
        first, last = -(-32 * k // bits), -(-32 * (k + 1) // bits)
        shifts = [(i * bits) % 32 for i in range(first, last)]
        v = mx.right_shift(w[..., k : k + 1], mx.array(shifts, dtype=mx.uint32))
        spill = [s + bits > 32 for s in shifts]
        if any(spill):
            hi_shift = mx.array([32 - s if sp else 0 for s, sp in zip(shifts, spill)], dtype=mx.uint32)
            hi_mask = mx.array([0xFFFFFFFF if sp else 0 for sp in spill], dtype=mx.uint32)
            v = v | (mx.left_shift(w[..., k + 1 : k + 2], hi_shift) & hi_mask)
        pieces.append(v)
    idx = mx.concatenate(pieces, axis=-1) & ((1 << bits) - 1)
    return idx.reshape(*lead, groups * 32)[..., :dim]


def lookup(indices, bits):
    """``centroids(bits)[indices]`` in float32, as a tree of selects on the index bits.

    Equivalent to a gather, but MLX fuses selects into one pass and is several
    times faster than ``mx.take`` on the CPU.
    """
    level = [mx.array(v, dtype=mx.float32) for v in centroids(bits)]
    for t in range(bits):
        bit = (mx.right_shift(indices, t) & 1).astype(mx.bool_)
        level = [mx.where(bit, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


# --- reading many packed vectors at once ------------------------------------------
#
# Indices are a little-endian bit stream (see turboquant.pack), so on a
# little-endian host the bytes of the uint32 words are the stream's bytes in
# order. We cut the stream into fields of F = m * bits bits (m indices each) and
# look each field up in a table of 2**F rows of m centroids: one gather per m
# coordinates instead of one per coordinate, plus a few shifts.


@functools.lru_cache(maxsize=None)
def _field_table(bits, codebook):
    m = field_indices(bits)
    values = mx.array(codebook if codebook is not None else centroids(bits), dtype=mx.float32)
    if values.shape != (1 << bits,):
        raise ValueError(f"a {bits}-bit codebook needs {1 << bits} values, got {values.shape[0]}")
    field = mx.arange(1 << (m * bits), dtype=mx.uint32)
    cols = [mx.take(values, mx.right_shift(field, bits * j) & ((1 << bits) - 1)) for j in range(m)]
    return mx.stack(cols, axis=1)


def _fields(packed, bits, dim):
    """The packed stream cut into F-bit fields, as an integer array [..., dim / m]."""
    m = field_indices(bits)
    width = m * bits
    nbytes = dim * bits // 8  # dim is a multiple of 16, so whole bytes
    if width == 16:
        return packed.view(mx.uint16)[..., : nbytes // 2]
    data = packed.view(mx.uint8)[..., :nbytes]
    if width == 8:
        return data
    period_bits = width * 8 // math.gcd(width, 8)
    period_bytes, per_period = period_bits // 8, period_bits // width
    b = data.reshape(*data.shape[:-1], nbytes // period_bytes, period_bytes).astype(mx.uint32)
    out = []
    for k in range(per_period):
        start = k * width
        first, shift = divmod(start, 8)
        span = (shift + width + 7) // 8
        v = b[..., first]
        for j in range(1, span):
            v = v | (b[..., first + j] << (8 * j))
        out.append((v >> shift) & ((1 << width) - 1))
    f = mx.stack(out, axis=-1)
    return f.reshape(*f.shape[:-2], -1)


def codebook_values(packed, bits, dim, codebook=None):
    """Unscaled centroid values of packed vectors: float32 [..., dim].

    ``codebook`` (2**bits floats) replaces the format's Lloyd-Max table, for
    comparisons with other codebooks; the bit layout is the format's.
    """
    f = _fields(packed, bits, dim)
    c = mx.take(_field_table(bits, codebook), f, axis=0)
    return c.reshape(*packed.shape[:-1], dim)


# --- encode / decode ---------------------------------------------------------------


def quantize(u, bits):
    """Codebook index of each N(0, 1)-normalised coordinate: how many boundaries are < u."""
    idx = mx.zeros(u.shape, dtype=mx.uint32)
    for b in boundaries(bits):  # fused compare-and-add; no gather
        idx = idx + (u > b).astype(mx.uint32)
    return idx


def _reference_codes(u, bits, dim, scales):
    """What the fast kernels must reproduce bit for bit: packed words and ``scale * centroid``."""
    packed = pack(quantize(u, bits), bits)
    return packed, lookup(unpack(packed, bits, dim), bits) * scales.astype(mx.float32)


def fast_kernels():
    """The GPU fast path checked against this reference on first use, or None (use the reference)."""
    return fast.kernels_for_device(_reference_codes)


def _encode_rows(x, bits, scale_mode):
    dim = x.shape[-1]
    y = _hadamard(x.astype(mx.float32), dim, inverse=False)
    norm = mx.sqrt((y * y).sum(axis=-1, keepdims=True))
    u = y * (math.sqrt(dim) / mx.maximum(norm, 1e-30))
    if fast_kernels() is not None:
        packed = fast.quantize_pack(u, bits, packed_words(dim, bits))
        c = fast.dequantize(packed, mx.ones(norm.shape, dtype=mx.float16), bits, dim)
    else:
        idx = _compiled(quantize, bits)(u)
        c = _compiled(lookup, bits)(idx)
        packed = _compiled(pack, bits)(idx)
    if scale_mode == "norm":
        scale = norm / math.sqrt(dim)
    elif scale_mode == "length":
        scale = norm / mx.maximum(mx.sqrt((c * c).sum(axis=-1, keepdims=True)), 1e-30)
    else:  # lsq: the scale that minimises ||y - scale * c||
        scale = (y * c).sum(axis=-1, keepdims=True) / mx.maximum((c * c).sum(axis=-1, keepdims=True), 1e-30)
    return packed, scale.astype(mx.float16)


def _dequantize_rows(packed, scales, bits, dim):
    if fast_kernels() is not None:
        return fast.dequantize(packed, scales, bits, dim)
    return codebook_values(packed, bits, dim) * scales.astype(mx.float32)


@functools.lru_cache(maxsize=None)
def _compiled(fn, bits):
    """``fn`` at ``bits``, compiled; one entry per (function, width), never per shape.

    MLX retraces a compiled function for a new input shape, but its CPU kernels
    are shape-independent (contiguous) and compiled once: encoding 10 prompt
    lengths builds the same 6 kernels as encoding one (measured with a fresh
    MLX kernel cache). ``shapeless=True`` cannot be used: ``pack`` slices, and
    compiling it shapelessly fails; making only the elementwise pieces
    shapeless built 11 kernels instead of 6.
    """
    return mx.compile(functools.partial(fn, bits=bits))


def _chunked(fn, arrays):
    """Run ``fn`` over the flattened leading axes in chunks of CHUNK_VECTORS rows."""
    lead = arrays[0].shape[:-1]
    flat = [a.reshape(-1, a.shape[-1]) for a in arrays]
    n = flat[0].shape[0]
    if n <= CHUNK_VECTORS:
        outs = fn(*flat)
    else:
        pieces = [fn(*[a[i : i + CHUNK_VECTORS] for a in flat]) for i in range(0, n, CHUNK_VECTORS)]
        outs = tuple(mx.concatenate(p, axis=0) for p in zip(*pieces)) if isinstance(pieces[0], tuple) else mx.concatenate(pieces, axis=0)
    if isinstance(outs, tuple):
        return tuple(o.reshape(*lead, o.shape[-1]) for o in outs)
    return outs.reshape(*lead, outs.shape[-1])


def encode(x, bits, scale_mode=DEFAULT_SCALE_MODE):
    """Encode vectors along the last axis: returns ``(packed uint32, scales float16[..., 1])``."""
    _check_bits(bits)
    _check_float(x)
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    # Compiled piece by piece (see _dequantize_rows): whole-graph fusion is slower on CPU.
    fn = functools.partial(_encode_rows, bits=bits, scale_mode=scale_mode)
    return _chunked(fn, [x])


def _check_packed(packed, scales, bits, dim):
    if not isinstance(packed, mx.array) or not isinstance(scales, mx.array):
        raise TypeError("packed and scales must be mx.arrays")
    if packed.dtype != mx.uint32:
        raise ValueError(f"packed must be uint32, got {packed.dtype}")
    if scales.dtype != mx.float16:
        raise ValueError(f"scales must be float16, got {scales.dtype}")
    if packed.ndim < 1 or scales.shape != tuple(packed.shape[:-1]) + (1,):
        raise ValueError(
            f"scales must have shape {tuple(packed.shape[:-1]) + (1,)} for packed {packed.shape}, got {scales.shape}"
        )
    if dim is None:
        dim = dim_from_words(packed.shape[-1], bits)
    check_dim(dim)
    if packed.shape[-1] != packed_words(dim, bits):
        raise ValueError(
            f"head dim {dim} at {bits} bits needs {packed_words(dim, bits)} words, got {packed.shape[-1]}"
        )
    return dim


def dequantize_rotated(packed, scales, bits, dim=None):
    """Reconstruction in the rotated space (float32): ``scale * centroid[idx]``.

    Attention works here: rotate the query once and sum rotated values, then
    ``unrotate`` once per output row.
    """
    _check_bits(bits)
    dim = _check_packed(packed, scales, bits, dim)
    fn = functools.partial(_dequantize_rows, bits=bits, dim=dim)
    return _chunked(fn, [packed, scales])


def decode(packed, scales, bits, dim=None):
    """Reconstruct the original vectors (float32) from ``encode``'s output."""
    y = dequantize_rotated(packed, scales, bits, dim)
    return _hadamard(y, y.shape[-1], inverse=True)
