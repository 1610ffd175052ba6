"""Attention over TurboQuant-packed keys and values, and the one hook into mlx-lm.

``TurboQuantKVCache.update_and_fetch`` returns keys and values as ``PackedKV``
(packed indices, float16 scales and how to read them) once it compresses.
Attention then never rebuilds the float context: it rotates the queries once,
reads keys and values ``chunk`` tokens at a time (centroid table lookups, one
matmul per chunk), runs an online softmax in float32 across the chunks and
un-rotates the output rows once at the end. Transient memory is bounded by one
chunk of float32 keys or values plus the chunk's scores.

The hook
--------
mlx-lm models call ``scaled_dot_product_attention(queries, keys, values,
cache=..., scale=..., mask=...)`` which they import by name from
``mlx_lm.models.base``. ``install()`` replaces that function in ``base`` with
``scaled_dot_product_attention`` below, which sends ``PackedKV`` inputs here and
everything else to the original unchanged, and rebinds the name in every
``mlx_lm.models.*`` module that is already imported (modules imported later
pick the patched one up from ``base``). It is idempotent and is called when
``turbocluster.runtime.cache.turbo_cache`` is imported.

Why this hook rather than mlx-lm's own ``cache.bits`` route to
``quantized_scaled_dot_product_attention``: that route passes only
``group_size`` and ``bits``, so the cache would have to fake affine-quantization
attributes that other mlx-lm code reads as "this is a QuantizedKVCache", and it
rejects attention sinks before we could. Dispatching on the type of the keys is
explicit, needs no fake attributes, and leaves every other cache on mlx-lm's
own path.
"""

import functools
import math
import sys

import mlx.core as mx
import numpy as np

from ...kernels import fused as fused_gpu
from ...kernels import native as native_cpu
from ...kernels import turboquant as tq
from ...kernels.packed import PackedKV  # noqa: F401  (re-exported: the kernels layer owns it)
from . import batched
from .recent import SplitKV

CHUNK_TOKENS = 4096  # most keys read per chunk
CHUNK_SCORES = 1 << 22  # most float32 scores per chunk (queries x keys), bounds prefill memory


def codebook_values(kv: PackedKV, start=0, stop=None):
    """Unscaled codebook values of tokens [start, stop): float32 [B, H, stop - start, dim]."""
    return tq.codebook_values(kv.packed[..., start:stop, :], kv.bits, kv.dim, kv.codebook)


def dequantize(kv: PackedKV, start=0, stop=None):
    """Stored vectors of tokens [start, stop) in float32, in the space they were stored in."""
    return codebook_values(kv, start, stop) * kv.scales[..., start:stop, :].astype(mx.float32)


# --- attention ---------------------------------------------------------------------


def _chunk_tokens(batch, n_q_heads, n_queries):
    rows = max(1, batch * n_q_heads * n_queries)
    return max(256, min(CHUNK_TOKENS, CHUNK_SCORES // rows // 256 * 256))


def _split_mask(mask, n_q_heads, n_kv_heads):
    """Bring an array mask to broadcast against scores [B, n_kv, n_rep, L, T]."""
    if mask.ndim <= 2:
        return mask
    if mask.ndim == 3:
        mask = mask[None]
    if mask.ndim != 4:
        raise ValueError(f"attention mask must have at most 4 axes, got shape {mask.shape}")
    heads = mask.shape[1]
    if heads == 1:
        return mx.expand_dims(mask, 2)
    if heads == n_q_heads:
        return mask.reshape(mask.shape[0], n_kv_heads, n_q_heads // n_kv_heads, *mask.shape[2:])
    raise ValueError(f"attention mask has {heads} heads, expected 1 or {n_q_heads}")


def turbo_scaled_dot_product_attention(queries, keys: PackedKV, values: PackedKV, scale, mask=None, native=None, with_lse=False):
    """softmax(scale * q k^T + mask) v with k and v read from ``PackedKV``.

    queries: [B, n_q_heads, L, D]; keys, values: [B, n_kv_heads, T, D] packed.
    mask: None, "causal" (the L queries are the last L positions) or an array
    broadcastable to [B, n_q_heads, L, T] (bool: True attends; else additive).
    Returns [B, n_q_heads, L, Dv] in the queries' dtype.
    native: None picks the native CPU kernel where it applies (see below);
    False forces MLX ops; True requires the native kernel.
    with_lse: return (float32 output, log-sum-exp of each row's scores [B, n_q, L, 1]).
    """
    B, n_q, L, D = queries.shape
    _, n_kv, T, _ = keys.packed.shape
    if D != keys.dim:
        raise ValueError(f"queries have head dim {D} but keys {keys.dim}")
    if n_q % n_kv:
        raise ValueError(f"{n_q} query heads are not a multiple of {n_kv} key/value heads")
    n_rep, Dv = n_q // n_kv, values.dim

    q = queries.astype(mx.float32)
    if keys.rotated:
        q = tq.rotate(q)
    q = (q * scale).reshape(B, n_kv, n_rep * L, D)

    causal = isinstance(mask, str)
    if causal:
        if mask != "causal":
            raise ValueError(f"mask must be None, 'causal' or an array, got {mask!r}")
        mask = None
    elif mask is not None:
        mask = _split_mask(mask, n_q, n_kv)

    if native is None:
        native = mask is None and native_cpu.applies(n_rep * L)
    elif native and (native_cpu.library() is None or mask is not None):
        raise ValueError("the native kernel needs a C compiler, the CPU and a None or 'causal' mask")
    dtype = mx.float32 if with_lse else queries.dtype
    if native:
        out = native_cpu.attention(q, keys, values, L, causal, with_lse)
        if with_lse:
            return _finish(out[0].reshape(B, n_q, L, Dv), values, dtype), out[1].reshape(B, n_q, L, 1)
        return _finish(out.reshape(B, n_q, L, Dv), values, dtype)

    chunk = _chunk_tokens(B, n_q, L)
    neg = mx.finfo(mx.float32).min
    m_run = l_run = acc = None
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        k_c = codebook_values(keys, t0, t1)
        k_s = keys.scales[..., t0:t1, :].astype(mx.float32).swapaxes(-1, -2)
        s = (q @ k_c.swapaxes(-1, -2)) * k_s  # [B, n_kv, R, Tc]
        s = s.reshape(B, n_kv, n_rep, L, t1 - t0)
        if causal:
            if t1 - 1 > T - L:  # some key in the chunk is in some query's future
                q_pos = mx.arange(T - L, T)[:, None]
                s = mx.where(q_pos >= mx.arange(t0, t1)[None], s, neg)
        elif mask is not None:
            mask_c = mask[..., t0:t1]
            s = mx.where(mask_c, s, neg) if mask_c.dtype == mx.bool_ else s + mask_c.astype(mx.float32)
        m_c = s.max(axis=-1, keepdims=True)
        m_new = m_c if m_run is None else mx.maximum(m_run, m_c)
        p = mx.exp(s - m_new)
        p_sum = p.sum(axis=-1, keepdims=True)
        v_c = codebook_values(values, t0, t1)
        v_s = values.scales[..., t0:t1, :].astype(mx.float32).swapaxes(-1, -2)
        pv = (p.reshape(B, n_kv, n_rep * L, t1 - t0) * v_s) @ v_c
        pv = pv.reshape(B, n_kv, n_rep, L, Dv)
        if m_run is None:
            l_run, acc = p_sum, pv
        else:
            corr = mx.exp(m_run - m_new)
            l_run = l_run * corr + p_sum
            acc = acc * corr + pv
        m_run = m_new
    out = _finish((acc / l_run).reshape(B, n_q, L, Dv), values, dtype)
    return (out, (m_run + mx.log(l_run)).reshape(B, n_q, L, 1)) if with_lse else out


def _float_attention(q, k, v, scale, allowed):
    """(output, log-sum-exp) of float32 attention; ``allowed``: None or bool [..., L, Tf]."""
    B, n_q, L, D = q.shape
    n_kv = k.shape[1]
    q = (q.astype(mx.float32) * scale).reshape(B, n_kv, -1, D)
    s = (q @ k.astype(mx.float32).swapaxes(-1, -2)).reshape(B, n_kv, n_q // n_kv, L, -1)
    if allowed is not None:
        s = mx.where(allowed, s, mx.finfo(mx.float32).min)
    m = s.max(axis=-1, keepdims=True)
    p = mx.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    out = (p.reshape(B, n_kv, -1, k.shape[2]) @ v.astype(mx.float32)).reshape(B, n_kv, n_q // n_kv, L, -1) / l
    return out.reshape(B, n_q, L, -1), (m + mx.log(l)).reshape(B, n_q, L, 1)


def split_attention(queries, keys: SplitKV, values: SplitKV, scale, mask=None):
    """Attention over a ``SplitKV``: the packed middle and the float16 sinks and window, merged exactly.

    Each part runs its own softmax and returns its log-sum-exp; the outputs are
    weighted by ``exp(lse_part - lse_total)``. mask: None, "causal" (the L
    queries are the last L positions) or an array over all ``total`` positions.
    """
    B, n_q, L, D = queries.shape
    T, lo, hi = keys.total, keys.n_sinks, keys.total - keys.n_window
    pos_f = keys.float_positions()
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"mask must be None, 'causal' or an array, got {mask!r}")
        q_pos = mx.arange(T - L, T)[:, None]
        mask_f = q_pos >= pos_f[None] if L > 1 else None
        mask_p = (q_pos >= mx.arange(lo, hi)[None]) if hi - 1 > T - L else None
    elif mask is not None:
        mask_f = _split_mask(mx.take(mask, pos_f, axis=-1), n_q, keys.packed.packed.shape[1])
        mask_p = mask[..., lo:hi]
    else:
        mask_f = mask_p = None
    if mask_f is not None and mask_f.dtype != mx.bool_:  # an additive mask: keep what it does not rule out
        mask_f = mask_f > mx.finfo(mx.float32).min / 2
    out, lse = _float_attention(queries, keys.floats, values.floats, scale, mask_f)
    if hi > lo:
        out_p, lse_p = turbo_scaled_dot_product_attention(queries, keys.packed, values.packed, scale, mask=mask_p, with_lse=True)
        if keys.key_mean is not None:  # the packed scores lack q . mean (a constant per query row)
            n_kv = keys.key_mean.shape[1]
            q = queries.astype(mx.float32).reshape(B, n_kv, -1, D)
            shift = (q @ keys.key_mean.astype(mx.float32).swapaxes(-1, -2)) * scale
            lse_p = lse_p + shift.reshape(B, n_q, L, 1)
        top = mx.maximum(lse, lse_p)
        w, w_p = mx.exp(lse - top), mx.exp(lse_p - top)
        out = (out * w + out_p * w_p) / (w + w_p)
    return out.astype(queries.dtype)


def _finish(out, values: PackedKV, dtype):
    """Back from the storage space: un-rotate once per output row, add the value mean."""
    if values.rotated:
        out = tq.unrotate(out)
    if values.mean is not None:
        B, n_q, L, Dv = out.shape
        n_kv = values.mean.shape[1]
        out = out.reshape(B, n_kv, n_q // n_kv, L, Dv) + values.mean.astype(mx.float32)[:, :, None]
        out = out.reshape(B, n_q, L, Dv)
    return out.astype(dtype)


# --- GPU dispatch (owned by the GPU kernels: turbocluster/kernels/fused.py) ---------


def gpu_attention(queries, keys: PackedKV, values: PackedKV, scale, mask):
    """Fused CUDA/Metal attention over the packed cache, or None to run the reference above.

    None on the CPU, with TURBOCLUSTER_FUSED=0, or when the kernel variant failed
    its self-check against ``turbo_scaled_dot_product_attention`` (logged once).
    """
    return fused_gpu.attention(queries, keys, values, scale, mask, reference=turbo_scaled_dot_product_attention)


def gpu_warm_up(k_bits: int, v_bits: int, k_dim: int, v_dim: int, n_rep: int) -> bool:
    """Compile and self-check the fused kernels a cache of these widths will use (before its first step)."""
    return fused_gpu.warm_up(k_bits, v_bits, k_dim, v_dim, n_rep, reference=turbo_scaled_dot_product_attention)


# --- the hook ------------------------------------------------------------------------

_original_sdpa = None


def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx-lm's ``base.scaled_dot_product_attention`` that also reads ``PackedKV`` and batched sessions."""
    if isinstance(keys, batched.BatchedKV):
        if sinks is not None:
            raise ValueError("a batched decode step does not support attention sinks")
        return batched.attention(scaled_dot_product_attention, queries, keys, values, scale, mask)
    if isinstance(keys, SplitKV):
        if sinks is not None:
            raise ValueError("TurboQuant attention does not support attention sinks")
        return split_attention(queries, keys, values, scale, mask)
    if isinstance(keys, PackedKV):
        if sinks is not None:
            raise ValueError("TurboQuant attention does not support attention sinks")
        out = gpu_attention(queries, keys, values, scale, mask)
        if out is not None:
            return out
        return turbo_scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    return _original_sdpa(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)


def install():
    """Route mlx-lm attention through ``scaled_dot_product_attention`` above (idempotent)."""
    global _original_sdpa
    from mlx_lm.models import base

    if base.scaled_dot_product_attention is not scaled_dot_product_attention:
        _original_sdpa = base.scaled_dot_product_attention
        base.scaled_dot_product_attention = scaled_dot_product_attention
    for name, module in list(sys.modules.items()):
        if name.startswith("mlx_lm.models.") and module is not None:
            if getattr(module, "scaled_dot_product_attention", None) is _original_sdpa:
                module.scaled_dot_product_attention = scaled_dot_product_attention
