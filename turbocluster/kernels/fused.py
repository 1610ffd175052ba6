"""Fused GPU attention over TurboQuant-packed keys and values (CUDA and Metal, one source).

Decode is bound by memory traffic, and packed keys and values are 4-5x fewer
bytes than float16, so attention that reads only the packed words should beat
float16 attention at long context. ``decode_attention`` is two kernels
(``fused_source.DECODE`` and ``COMBINE``), split-K / flash-decoding: each
threadgroup of the first takes a split of the context for a tile of query rows
of one kv head (GQA: the rows share every packed key and value it loads),
rotates the raw query tile once in shared memory by the signed Walsh-Hadamard
transform instead of un-rotating every key (``<q, x> = <H S q, y>``), stages the
packed words of each chunk of tokens in shared memory with coalesced loads,
scores them (codebook times the softmax scale in shared memory), takes the
split's softmax in float32 and sums the values in the rotated space. The second
merges the splits by log-sum-exp (``combine_splits`` is its plain-``mx`` twin),
un-rotates each output row once, adds the value mean and casts: one layer's
decode attention is two launches and nothing else.

Prefill (many query rows) is matrix work, which ``mx.fast.scaled_dot_product_attention``
does with the GPU's matrix units: ``prefill_attention`` expands the packed keys
and values once per call into the activations' dtype with a fused dequantize
kernel (rotated space, no un-rotation), rotates the queries, and lets SDPA do the
rest, GQA and masks included. Transient memory is one layer's float16 K/V.

Every kernel variant is checked against the plain-``mx`` reference the first
time it is used on a machine (``fused_check``: the verdict is cached on disk);
a variant that does not compile or does not match is logged and the caller
falls back to the reference. ``TURBOCLUSTER_FUSED=0`` switches the fused path
off. Metal cannot be run where this was written: its source is the same body
with Metal's prelude, and it is used only after passing the same self-check.
"""

import functools
import logging
import math
import os
from typing import Callable, Optional

import mlx.core as mx

from . import fast, fused_check
from . import fused_source as src
from . import turboquant as tq

logger = logging.getLogger(__name__)

THREADS = 128  # threads per threadgroup of the split kernel (4 warps / SIMD groups)
COMBINE_THREADS = 256  # threads per threadgroup of the merge kernel (one output row each)
TOKENS_MAX = 512  # most tokens one split covers (scores kept in shared memory)
MIN_SPLIT_TOKENS = 64  # fewest tokens per split when splitting further only fills the GPU
MAX_TILE_ROWS = 8  # query rows per threadgroup; more rows take more tiles
DECODE_MAX_ROWS = 32  # query rows per kv head up to which the decode kernel runs; above it, prefill
DECODE_MAX_DIM = 256
TARGET_GROUPS = 528  # threadgroups to aim for (4 per SM of an H100/H200; fewer, longer splits measured faster than 8)


def backend() -> Optional[str]:
    """'cuda', 'metal' or None: which fused path applies on the default device."""
    if os.environ.get("TURBOCLUSTER_FUSED", "1") == "0":
        return None
    return fast.backend()


def encode_backend() -> Optional[str]:
    """``backend()``, unless ``TURBOCLUSTER_FUSED_ENCODE=0`` keeps encoding on the mx-ops path (for comparisons)."""
    if os.environ.get("TURBOCLUSTER_FUSED_ENCODE", "1") == "0":
        return None
    return backend()


@functools.lru_cache(maxsize=None)
def _kernels(kind):
    make = mx.fast.metal_kernel if kind == "metal" else mx.fast.cuda_kernel
    header = src.HEADER[kind]
    return {
        "decode": make(
            name="turbo_fused_decode",
            input_names=["q", "kp", "ks", "vp", "vs", "kcb", "vcb", "ksign"],
            output_names=["out", "ml"],
            source=src.render(src.DECODE, kind),
            header=header,
            ensure_row_contiguous=False,
        ),
        "combine": make(
            name="turbo_fused_combine",
            input_names=["acc", "ml", "vsign", "mean"],
            output_names=["out"],
            source=src.render(src.COMBINE, kind),
            header=header,
            ensure_row_contiguous=False,
        ),
        "encode": make(
            name="turbo_fused_encode",
            input_names=["k", "v", "kmean", "vmean", "ksign", "vsign", "kbs", "vbs", "kcb", "vcb", "kbd", "vbd", "root"],
            output_names=["kp", "ks", "vp", "vs"],
            source=src.render(src.ENCODE, kind),
            header=header,
            ensure_row_contiguous=False,
        ),
        "dequant": make(
            name="turbo_fused_dequant",
            input_names=["kp", "ks", "cb", "params"],
            output_names=["out"],
            source=src.render(src.DEQUANT, kind),
            header=header,
            ensure_row_contiguous=False,
        ),
    }


@functools.lru_cache(maxsize=None)
def _codebook(bits, codebook, scale=1.0):
    values = codebook if codebook is not None else tq.centroids(bits)
    return mx.array([float(c) * scale for c in values], dtype=mx.float32)


@functools.lru_cache(maxsize=None)
def _signs(dim):
    return mx.array(tq.sign_list(dim), dtype=mx.float32)


@functools.lru_cache(maxsize=None)
def _no_mean():
    return mx.zeros((1, 1, 1, 1), dtype=mx.float16)


def _tile_rows(rows):
    return min(MAX_TILE_ROWS, 1 << max(0, (rows - 1).bit_length()))


def _splits(T, groups):
    """Splits of the context: enough threadgroups to fill the GPU, at most TOKENS_MAX tokens each."""
    want = -(-TARGET_GROUPS // groups)
    return max(1, -(-T // TOKENS_MAX), min(want, -(-T // MIN_SPLIT_TOKENS)))


# --- the log-sum-exp merge ---------------------------------------------------------


def combine_splits(acc, ml, axis=-2):
    """Merge partial attention results by log-sum-exp (what ``fused_source.COMBINE`` computes).

    ``acc`` [..., S, Dv] holds each split's unnormalised sum ``sum_j exp(s_j - m) v_j``,
    ``ml`` [..., S, 2] its (max score m, sum of exp l). Returns the softmax-weighted
    sum over all splits, [..., Dv], as if the splits had been one.
    """
    m, l = ml[..., 0:1], ml[..., 1:2]
    top = m.max(axis=axis, keepdims=True)
    w = mx.exp(m - top)
    return (acc * w).sum(axis=axis) / (l * w).sum(axis=axis)


def _finish(out, rotated, mean, dtype):
    if rotated:
        out = tq.unrotate(out)
    if mean is not None:
        B, n_q, L, Dv = out.shape
        n_kv = mean.shape[1]
        out = out.reshape(B, n_kv, n_q // n_kv, L, Dv) + mean.astype(mx.float32)[:, :, None]
        out = out.reshape(B, n_q, L, Dv)
    return out.astype(dtype)


# --- decode ------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _decode_plan(kind, bk, bv, dk, dv, k_codebook, v_codebook, scale, rt, L, causal, rotated, v_rotated, has_mean, dtype):
    """Everything of a decode launch that does not depend on the context length, made once per variant.

    Decode runs on every layer of every step; building these lists per call was
    a measurable part of the step's host time.
    """
    kernels = _kernels(kind)
    consts = [_codebook(bk, k_codebook, scale), _codebook(bv, v_codebook), _signs(dk)]
    template = [("BK", bk), ("BV", bv), ("D", dk), ("DV", dv), ("RT", rt), ("NT", THREADS), ("TMAX", TOKENS_MAX),
                ("L", L), ("CAUSAL", causal), ("ROT", rotated)]
    combine_template = [("DV", dv), ("NT", COMBINE_THREADS), ("ROT", v_rotated), ("MEAN", has_mean), ("OutT", dtype)]
    return kernels["decode"], consts, template, kernels["combine"], _signs(dv), combine_template


def decode_attention(queries, keys, values, scale, causal=False, kind=None, splits=None):
    """softmax(scale q k^T) v for a few query rows per kv head, read from packed K/V in two kernels.

    queries [B, n_q, L, D]; keys/values ``PackedKV``-like (packed, scales, bits, dim,
    codebook, rotated, mean). ``causal``: the L queries are the last L positions.
    ``splits``: how many parts the context is cut into (default: enough to fill the GPU).
    """
    kind = kind or backend()
    B, n_q, L, D = queries.shape
    _, n_kv, T, _ = keys.packed.shape
    rows = (n_q // n_kv) * L
    rt = _tile_rows(rows)
    tiles = -(-rows // rt)
    splits = splits or _splits(T, B * n_kv * tiles)
    if not -(-T // TOKENS_MAX) <= splits <= max(T, 1):
        raise ValueError(f"splits must be in [{-(-T // TOKENS_MAX)}, {T}] for {T} tokens, got {splits}")
    mean, dv = values.mean, values.dim
    decode, consts, template, combine, v_signs, combine_template = _decode_plan(
        kind, keys.bits, values.bits, D, dv, keys.codebook, values.codebook, float(scale), rt, L,
        bool(causal and L > 1), bool(keys.rotated), bool(values.rotated), mean is not None, queries.dtype)
    acc, ml = decode(
        inputs=[queries, keys.packed, keys.scales, values.packed, values.scales, *consts],
        template=template,
        grid=(THREADS * splits, B * n_kv, tiles),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(B * n_kv, rows, splits, dv), (B * n_kv, rows, splits, 2)],
        output_dtypes=[mx.float32, mx.float32],
    )
    return combine(
        inputs=[acc, ml, v_signs, _no_mean() if mean is None else mean],
        template=combine_template,
        grid=(COMBINE_THREADS * B * n_kv * rows, 1, 1),
        threadgroup=(COMBINE_THREADS, 1, 1),
        output_shapes=[(B, n_q, L, dv)],
        output_dtypes=[queries.dtype],
    )[0]


# --- encode ------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _block_scales(dim):
    """1/sqrt(block size) of each coordinate's Walsh-Hadamard block, float32 [dim]."""
    out = []
    for b in tq.rotation_blocks(dim):
        out += [1 / math.sqrt(b)] * b
    return mx.array(out, dtype=mx.float32)


@functools.lru_cache(maxsize=None)
def _bounds(bits):
    return mx.array(tq.boundaries(bits), dtype=mx.float32)


@functools.lru_cache(maxsize=None)
def _roots(dk, dv):
    return mx.array([math.sqrt(dk), math.sqrt(dv)], dtype=mx.float32)


def _pow2(n):
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _encode_plan(kind, k_bits, v_bits, dk, dv, has_k_mean, has_v_mean):
    """The constant inputs and template of an encode launch, made once per variant (it runs every layer, every step)."""
    nt = min(256, -(-max(dk, dv) // 32) * 32)
    consts = [_signs(dk), _signs(dv), _block_scales(dk), _block_scales(dv), _codebook(k_bits, None), _codebook(v_bits, None),
              _bounds(k_bits), _bounds(v_bits), _roots(dk, dv)]
    template = [("BK", k_bits), ("BV", v_bits), ("D", dk), ("DV", dv), ("P", _pow2(dk)), ("PV", _pow2(dv)), ("NT", nt),
                ("KMEAN", has_k_mean), ("VMEAN", has_v_mean)]
    dtypes = [mx.uint32, mx.float16, mx.uint32, mx.float16]
    return _kernels(kind)["encode"], consts, template, nt, tq.packed_words(dk, k_bits), tq.packed_words(dv, v_bits), dtypes


def encode_kv(keys, values, k_bits, v_bits, k_mean=None, v_mean=None, kind=None):
    """TurboQuant-encode new keys and values ([B, H, n, dim], any float dtype) in one launch.

    Returns ``(k_packed, k_scales, v_packed, v_scales)`` as ``turboquant.encode``
    does (rotated, Lloyd-Max codebook, least-squares scale), after subtracting
    ``k_mean``/``v_mean`` ([B, H, 1, dim]) when given. Bit for bit what
    ``reference_encode`` computes from mx ops.
    """
    kind = kind or backend()
    B, H, n, dk = keys.shape
    dv = values.shape[-1]
    if values.shape[:3] != keys.shape[:3]:
        raise ValueError(f"keys {keys.shape} and values {values.shape} must agree on batch, heads and tokens")
    kernel, consts, template, nt, wk, wv, dtypes = _encode_plan(
        kind, k_bits, v_bits, dk, dv, k_mean is not None, v_mean is not None)
    no_mean = _no_mean()
    return tuple(kernel(
        inputs=[keys, values, no_mean if k_mean is None else k_mean, no_mean if v_mean is None else v_mean, *consts],
        template=template,
        grid=(nt * max(B * H * n, 1), 2, 1),
        threadgroup=(nt, 1, 1),
        output_shapes=[(B, H, n, wk), (B, H, n, 1), (B, H, n, wv), (B, H, n, 1)],
        output_dtypes=dtypes,
    ))


def _tree_sum(x):
    """Sum over the last axis as pairwise halves (the kernel's order), zero-padded to a power of two."""
    p = _pow2(x.shape[-1])
    if p != x.shape[-1]:
        x = mx.concatenate([x, mx.zeros((*x.shape[:-1], p - x.shape[-1]), dtype=x.dtype)], axis=-1)
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        x = x[..., :h] + x[..., h:]
    return x


def _butterflies(x):
    """Unscaled Walsh-Hadamard transform of a power-of-two last axis, radix 2, smallest stride first."""
    lead, n = x.shape[:-1], x.shape[-1]
    h = 1
    while h < n:
        x = x.reshape(*lead, n // (2 * h), 2, h)
        a, c = x[..., 0, :], x[..., 1, :]
        x = mx.stack([a + c, a - c], axis=-2).reshape(*lead, n)
        h *= 2
    return x


def reference_encode(x, bits, mean=None):
    """``encode_kv``'s steps for one of keys or values, spelled in mx ops in the kernel's order.

    The same codes as ``turboquant.encode`` up to float rounding (a coordinate
    within an ulp of a boundary may take the neighbouring index); exactly the
    fused kernel's bits.
    """
    dim = x.shape[-1]
    x = x.astype(mx.float32)
    if mean is not None:
        x = x - mean.astype(mx.float32)
    x = x * _signs(dim)
    parts, start = [], 0
    for b in tq.rotation_blocks(dim):
        parts.append(_butterflies(x[..., start : start + b]))
        start += b
    y = (mx.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]) * _block_scales(dim)
    norm = mx.sqrt(_tree_sum(y * y))
    u = y * (_roots(dim, dim)[0] / mx.maximum(norm, 1e-30))
    idx = tq.quantize(u, bits)
    c = mx.take(_codebook(bits, None), idx)
    scale = _tree_sum(y * c) / mx.maximum(_tree_sum(c * c), 1e-30)
    return tq.pack(idx, bits), scale.astype(mx.float16)


# --- prefill -----------------------------------------------------------------------


def dequantize(kv, dtype, kind=None):
    """``scale * codebook[idx]`` of packed ``[B, H, T, W]`` as ``[B, H, T, dim]`` in ``dtype``, one kernel."""
    kind = kind or backend()
    B, H, T, _ = kv.packed.shape
    n = B * H * T * kv.dim
    return _kernels(kind)["dequant"](
        inputs=[kv.packed, kv.scales, _codebook(kv.bits, kv.codebook), mx.array([n], dtype=mx.int32)],
        template=[("BITS", kv.bits), ("D", kv.dim), ("OutT", dtype)],
        grid=(max(n, 1), 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(B, H, T, kv.dim)],
        output_dtypes=[dtype],
    )[0]


def reference_dequantize(kv, dtype):
    """The plain-``mx`` twin of ``dequantize`` (what it must match bit for bit)."""
    vals = tq.codebook_values(kv.packed, kv.bits, kv.dim, kv.codebook)
    return (vals * kv.scales.astype(mx.float32)).astype(dtype)


def prefill_attention(queries, keys, values, scale, mask=None, dequant: Optional[Callable] = None):
    """Attention for many query rows: packed K/V expanded once, then ``mx.fast`` SDPA.

    Keys and values stay in the rotated space; the queries are rotated instead
    and the output rows un-rotated once. ``dequant(kv, dtype)`` defaults to the
    fused kernel; ``reference_dequantize`` composes the same path from mx ops.
    """
    dequant = dequant or dequantize
    dtype = queries.dtype
    q = tq.rotate(queries).astype(dtype) if keys.rotated else queries
    k = dequant(keys, dtype)
    v = dequant(values, dtype)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return _finish(out, values.rotated, values.mean, dtype)


# --- self-check and dispatch -------------------------------------------------------


class _Packed:
    """A PackedKV look-alike for the self-check (kernels cannot import the cache layer)."""

    def __init__(self, packed, scales, bits, dim):
        self.packed, self.scales, self.bits, self.dim = packed, scales, bits, dim
        self.codebook, self.rotated, self.mean = None, True, None


def _keys(seed):
    """Random keys for a self-check: its own stream, so a check never reseeds the caller's generator."""
    return iter(mx.random.split(mx.random.key(seed), 16))


def _random_packed(B, H, T, dim, bits, cap=None, keys=None):
    keys = keys or _keys(0)
    words = tq.packed_words(dim, bits)
    cap = cap or T
    hi = mx.random.randint(0, 1 << 16, (B, H, cap, words), key=next(keys)).astype(mx.uint32)
    lo = mx.random.randint(0, 1 << 16, (B, H, cap, words), key=next(keys)).astype(mx.uint32)
    packed = (hi << 16) | lo  # uniform 32-bit words
    scales = mx.random.uniform(0.05, 2.0, (B, H, cap, 1), key=next(keys)).astype(mx.float16)
    # a slice of a larger buffer, as the cache hands it over
    return _Packed(packed[..., :T, :], scales[..., :T, :], bits, dim)


def _check_decode(kind, bk, bv, dk, dv, rt, reference):
    def check():
        rand = _keys(7)
        T = 700  # several splits, a ragged last one
        keys = _random_packed(1, 2, T, dk, bk, cap=768, keys=rand)
        values = _random_packed(1, 2, T, dv, bv, cap=768, keys=rand)
        for n_rep, L, causal in ((rt, 1, False), (1, rt, True)):
            q = mx.random.normal((1, 2 * n_rep, L, dk), key=next(rand))
            with mx.stream(mx.cpu):  # exact float32 (GPU matmuls may round through TF32)
                want = reference(q, keys, values, scale=0.3, mask="causal" if causal else None)
                mx.eval(want)
            got = decode_attention(q, keys, values, 0.3, causal=causal, kind=kind, splits=6)
            err = mx.abs(got - want).max().item()
            if not err <= 1e-4 * max(1.0, mx.abs(want).max().item()):
                raise AssertionError(f"decode differs from the reference by {err} (n_rep {n_rep}, L {L})")

    return check


def _check_dequant(kind, bits, dim):
    def check():
        kv = _random_packed(2, 3, 37, dim, bits, cap=64, keys=_keys(8))
        for dtype in (mx.float32, mx.float16):
            if not mx.array_equal(dequantize(kv, dtype, kind), reference_dequantize(kv, dtype)).item():
                raise AssertionError(f"dequantize differs from the reference ({dtype})")

    return check


def _check_encode(kind, bk, bv, dk, dv):
    def check():
        rand = _keys(9)
        k = (mx.random.normal((2, 3, 37, dk), key=next(rand)) * 2.5).astype(mx.float16)
        v = mx.random.normal((2, 3, 41, dv), key=next(rand))[:, :, 3:]  # float32, a strided slice
        k = mx.concatenate([k, mx.zeros((2, 3, 1, dk), dtype=mx.float16)], axis=2)  # a zero vector
        for k_mean, v_mean in ((None, None), (k[:, :, :1].astype(mx.float16) * 0.5, v[:, :, :1].astype(mx.float16))):
            got = encode_kv(k, v, bk, bv, k_mean, v_mean, kind=kind)
            with mx.stream(mx.cpu):
                want = reference_encode(k, bk, k_mean) + reference_encode(v, bv, v_mean)
                mx.eval(want)
            for name, a, b in zip(("key words", "key scales", "value words", "value scales"), got, want):
                if not mx.array_equal(a, b).item():
                    raise AssertionError(f"encode {name} differ from the reference (means: {k_mean is not None})")

    return check


def _decode_ok(kind, keys, values, rt, reference):
    return _decode_verdict(kind, keys.bits, values.bits, keys.dim, values.dim, rt, reference)


def _dequant_ok(kind, kv):
    return _dequant_verdict(kind, kv.bits, kv.dim)


# One verdict per variant and process: the key (rendered source, its hash) is made once,
# not on every layer of every decode step (that cost ~0.1 ms of host time per layer).
@functools.lru_cache(maxsize=None)
def _decode_verdict(kind, bk, bv, dk, dv, rt, reference):
    name = f"decode-k{bk}v{bv}-d{dk}x{dv}-r{rt}"
    source = src.HEADER[kind] + src.render(src.DECODE, kind) + src.render(src.COMBINE, kind)
    return fused_check.verdict(kind, name, source, _check_decode(kind, bk, bv, dk, dv, rt, reference))


@functools.lru_cache(maxsize=None)
def encode_verdict(kind: str, k_bits: int, v_bits: int, k_dim: int, v_dim: int) -> bool:
    """Whether ``encode_kv`` passed its self-check for these widths and dims on this machine."""
    name = f"encode-k{k_bits}v{v_bits}-d{k_dim}x{v_dim}"
    source = src.HEADER[kind] + src.render(src.ENCODE, kind)
    return fused_check.verdict(kind, name, source, _check_encode(kind, k_bits, v_bits, k_dim, v_dim))


@functools.lru_cache(maxsize=None)
def _dequant_verdict(kind, bits, dim):
    name = f"dequant-b{bits}-d{dim}"
    source = src.HEADER[kind] + src.render(src.DEQUANT, kind)
    return fused_check.verdict(kind, name, source, _check_dequant(kind, bits, dim))


def attention(queries, keys, values, scale, mask, reference: Callable):
    """The fused GPU attention for this call, or None when the reference must run.

    ``reference(q, keys, values, scale=, mask=)`` is the plain-``mx`` attention
    each kernel variant is checked against on first use on this machine.
    """
    kind = backend()
    if kind is None:
        return None
    B, n_q, L, D = queries.shape
    n_kv = keys.packed.shape[1]
    rows = (n_q // n_kv) * L
    small_mask = mask is None or (isinstance(mask, str) and mask == "causal")
    if small_mask and rows <= DECODE_MAX_ROWS and max(D, values.dim) <= DECODE_MAX_DIM:
        if _decode_ok(kind, keys, values, _tile_rows(rows), reference):
            return decode_attention(queries, keys, values, scale, causal=mask == "causal", kind=kind)
        return None
    if _dequant_ok(kind, keys) and _dequant_ok(kind, values):
        return prefill_attention(queries, keys, values, scale, mask)
    return None


def warm_up(k_bits: int, v_bits: int, k_dim: int, v_dim: int, n_rep: int, reference: Callable) -> bool:
    """Compile and self-check the variants a model's decode and prefill will use (at node start)."""
    kind = backend()
    if kind is None:
        return False
    keys = _Packed(None, None, k_bits, k_dim)
    values = _Packed(None, None, v_bits, v_dim)
    return (_decode_ok(kind, keys, values, _tile_rows(n_rep), reference) and _dequant_ok(kind, keys)
            and _dequant_ok(kind, values) and encode_verdict(kind, k_bits, v_bits, k_dim, v_dim))
