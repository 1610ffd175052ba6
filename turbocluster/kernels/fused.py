"""Fused GPU attention over TurboQuant-packed keys and values (CUDA and Metal, one source).

Decode is bound by memory traffic, and packed keys and values are 4-5x fewer
bytes than float16, so attention that reads only the packed words should beat
float16 attention at long context. ``decode_attention`` does that in one
kernel (``fused_source.DECODE``): the query is rotated once by the signed
Walsh-Hadamard transform instead of un-rotating every key (``<q, x> = <H S q,
y>``), each threadgroup scores a split of the context for a tile of query rows
of one kv head (GQA without repeating keys), straight from the packed words and
float16 scales (codebook in shared memory), takes the softmax of its split in
float32 and sums the values in the rotated space. The splits are merged by
log-sum-exp (``combine_splits``) and each output row is un-rotated once.

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

THREADS = 128  # threads per threadgroup (4 warps / SIMD groups)
TOKENS_MAX = 256  # most tokens one threadgroup scores
MAX_TILE_ROWS = 8  # query rows per threadgroup; more rows take more tiles
DECODE_MAX_ROWS = 32  # query rows per kv head up to which the decode kernel runs; above it, prefill
DECODE_MAX_DIM = 256
TARGET_GROUPS = 264  # threadgroups to aim for (2 per SM of an H100/H200), so short contexts still spread


def backend() -> Optional[str]:
    """'cuda', 'metal' or None: which fused path applies on the default device."""
    if os.environ.get("TURBOCLUSTER_FUSED", "1") == "0":
        return None
    return fast.backend()


@functools.lru_cache(maxsize=None)
def _kernels(kind):
    make = mx.fast.metal_kernel if kind == "metal" else mx.fast.cuda_kernel
    header = src.HEADER[kind]
    return {
        "decode": make(
            name="turbo_fused_decode",
            input_names=["q", "kp", "ks", "vp", "vs", "kcb", "vcb", "params"],
            output_names=["out", "ml"],
            source=src.render(src.DECODE, kind),
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
def _codebook(bits, codebook):
    return mx.array(codebook if codebook is not None else tq.centroids(bits), dtype=mx.float32)


def _tile_rows(rows):
    return min(MAX_TILE_ROWS, 1 << max(0, (rows - 1).bit_length()))


def _split_tokens(T, groups):
    """Tokens per split: at most TOKENS_MAX, fewer when that leaves the GPU idle."""
    want = -(-T * groups // TARGET_GROUPS)
    return max(32, min(TOKENS_MAX, -(-want // 32) * 32))


# --- the log-sum-exp merge ---------------------------------------------------------


def combine_splits(acc, ml, axis=-2):
    """Merge partial attention results by log-sum-exp.

    ``acc`` [..., S, Dv] holds each split's unnormalised sum ``sum_j exp(s_j - m) v_j``,
    ``ml`` [..., S, 2] its (max score m, sum of exp l). Returns the softmax-weighted
    sum over all splits, [..., Dv], as if the splits had been one.
    """
    m, l = ml[..., 0:1], ml[..., 1:2]
    top = m.max(axis=axis, keepdims=True)
    w = mx.exp(m - top)
    return (acc * w).sum(axis=axis) / (l * w).sum(axis=axis)


# --- decode ------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _pre(rotated, scale, n_kv):
    def f(q):
        B, n_q, L, D = q.shape
        q = q.astype(mx.float32)
        if rotated:
            q = tq.rotate(q)
        return (q * scale).reshape(B * n_kv, (n_q // n_kv) * L, D)

    return mx.compile(f)


@functools.lru_cache(maxsize=None)
def _post(B, n_q, L, rotated, dtype, with_mean):
    def f(acc, ml, *mean):
        out = combine_splits(acc, ml).reshape(B, n_q, L, acc.shape[-1])
        return _finish(out, rotated, mean[0] if with_mean else None, dtype)

    return mx.compile(f)


def _finish(out, rotated, mean, dtype):
    if rotated:
        out = tq.unrotate(out)
    if mean is not None:
        B, n_q, L, Dv = out.shape
        n_kv = mean.shape[1]
        out = out.reshape(B, n_kv, n_q // n_kv, L, Dv) + mean.astype(mx.float32)[:, :, None]
        out = out.reshape(B, n_q, L, Dv)
    return out.astype(dtype)


def _decode_partials(kind, q, keys, values, rows, L, causal, tps=None):
    BH, _, D = q.shape
    T = keys.packed.shape[2]
    rt = _tile_rows(rows)
    tiles = -(-rows // rt)
    tps = tps or _split_tokens(T, BH * tiles)
    splits = -(-T // tps)
    params = mx.array([rows, T, L, tps, int(causal), splits], dtype=mx.int32)
    return _kernels(kind)["decode"](
        inputs=[q, keys.packed, keys.scales, values.packed, values.scales,
                _codebook(keys.bits, keys.codebook), _codebook(values.bits, values.codebook), params],
        template=[("BK", keys.bits), ("BV", values.bits), ("D", D), ("DV", values.dim),
                  ("RT", rt), ("NT", THREADS), ("TMAX", TOKENS_MAX)],
        grid=(THREADS * splits, BH, tiles),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(BH, rows, splits, values.dim), (BH, rows, splits, 2)],
        output_dtypes=[mx.float32, mx.float32],
    )


def decode_attention(queries, keys, values, scale, causal=False, kind=None, tps=None):
    """softmax(scale q k^T) v for a few query rows per kv head, read from packed K/V in one kernel.

    queries [B, n_q, L, D]; keys/values ``PackedKV``-like (packed, scales, bits, dim,
    codebook, rotated, mean). ``causal``: the L queries are the last L positions.
    """
    kind = kind or backend()
    B, n_q, L, _ = queries.shape
    n_kv = keys.packed.shape[1]
    rows = (n_q // n_kv) * L
    q = _pre(bool(keys.rotated), float(scale), n_kv)(queries)
    acc, ml = _decode_partials(kind, q, keys, values, rows, L, causal and L > 1, tps)
    mean = () if values.mean is None else (values.mean,)
    return _post(B, n_q, L, bool(values.rotated), queries.dtype, values.mean is not None)(acc, ml, *mean)


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


def _random_packed(B, H, T, dim, bits, cap=None):
    words = tq.packed_words(dim, bits)
    cap = cap or T
    hi = mx.random.randint(0, 1 << 16, (B, H, cap, words)).astype(mx.uint32)
    lo = mx.random.randint(0, 1 << 16, (B, H, cap, words)).astype(mx.uint32)
    packed = (hi << 16) | lo  # uniform 32-bit words
    scales = mx.random.uniform(0.05, 2.0, (B, H, cap, 1)).astype(mx.float16)
    # a slice of a larger buffer, as the cache hands it over
    return _Packed(packed[..., :T, :], scales[..., :T, :], bits, dim)


def _check_decode(kind, bk, bv, dk, dv, rt, reference):
    def check():
        mx.random.seed(7)
        T = 700  # several splits, a ragged last one
        keys = _random_packed(1, 2, T, dk, bk, cap=768)
        values = _random_packed(1, 2, T, dv, bv, cap=768)
        for n_rep, L, causal in ((rt, 1, False), (1, rt, True)):
            q = mx.random.normal((1, 2 * n_rep, L, dk))
            with mx.stream(mx.cpu):  # exact float32 (GPU matmuls may round through TF32)
                want = reference(q, keys, values, scale=0.3, mask="causal" if causal else None)
                mx.eval(want)
            got = decode_attention(q, keys, values, 0.3, causal=causal, kind=kind, tps=128)
            err = mx.abs(got - want).max().item()
            if not err <= 1e-4 * max(1.0, mx.abs(want).max().item()):
                raise AssertionError(f"decode differs from the reference by {err} (n_rep {n_rep}, L {L})")

    return check


def _check_dequant(kind, bits, dim):
    def check():
        mx.random.seed(8)
        kv = _random_packed(2, 3, 37, dim, bits, cap=64)
        for dtype in (mx.float32, mx.float16):
            if not mx.array_equal(dequantize(kv, dtype, kind), reference_dequantize(kv, dtype)).item():
                raise AssertionError(f"dequantize differs from the reference ({dtype})")

    return check


def _decode_ok(kind, keys, values, rt, reference):
    name = f"decode-k{keys.bits}v{values.bits}-d{keys.dim}x{values.dim}-r{rt}"
    source = src.HEADER[kind] + src.render(src.DECODE, kind)
    return fused_check.verdict(kind, name, source, _check_decode(kind, keys.bits, values.bits, keys.dim, values.dim, rt, reference))


def _dequant_ok(kind, kv):
    name = f"dequant-b{kv.bits}-d{kv.dim}"
    source = src.HEADER[kind] + src.render(src.DEQUANT, kind)
    return fused_check.verdict(kind, name, source, _check_dequant(kind, kv.bits, kv.dim))


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
    return _decode_ok(kind, keys, values, _tile_rows(n_rep), reference) and _dequant_ok(kind, keys) and _dequant_ok(kind, values)
