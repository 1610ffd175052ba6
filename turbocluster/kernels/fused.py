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
    kernels = _kernels(kind)
    acc, ml = kernels["decode"](
        inputs=[queries, keys.packed, keys.scales, values.packed, values.scales,
                _codebook(keys.bits, keys.codebook, float(scale)), _codebook(values.bits, values.codebook), _signs(D)],
        template=[("BK", keys.bits), ("BV", values.bits), ("D", D), ("DV", values.dim), ("RT", rt), ("NT", THREADS),
                  ("TMAX", TOKENS_MAX), ("L", L), ("CAUSAL", bool(causal and L > 1)), ("ROT", bool(keys.rotated))],
        grid=(THREADS * splits, B * n_kv, tiles),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(B * n_kv, rows, splits, values.dim), (B * n_kv, rows, splits, 2)],
        output_dtypes=[mx.float32, mx.float32],
    )
    mean = values.mean
    return kernels["combine"](
        inputs=[acc, ml, _signs(values.dim), _no_mean() if mean is None else mean],
        template=[("DV", values.dim), ("NT", COMBINE_THREADS), ("ROT", bool(values.rotated)), ("MEAN", mean is not None),
                  ("OutT", queries.dtype)],
        grid=(COMBINE_THREADS * B * n_kv * rows, 1, 1),
        threadgroup=(COMBINE_THREADS, 1, 1),
        output_shapes=[(B, n_q, L, values.dim)],
        output_dtypes=[queries.dtype],
    )[0]


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
            got = decode_attention(q, keys, values, 0.3, causal=causal, kind=kind, splits=6)
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
    return _decode_ok(kind, keys, values, _tile_rows(n_rep), reference) and _dequant_ok(kind, keys) and _dequant_ok(kind, values)
