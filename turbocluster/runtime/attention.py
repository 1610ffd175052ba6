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
``turbocluster.runtime.turbo_cache`` is imported.

Why this hook rather than mlx-lm's own ``cache.bits`` route to
``quantized_scaled_dot_product_attention``: that route passes only
``group_size`` and ``bits``, so the cache would have to fake affine-quantization
attributes that other mlx-lm code reads as "this is a QuantizedKVCache", and it
rejects attention sinks before we could. Dispatching on the type of the keys is
explicit, needs no fake attributes, and leaves every other cache on mlx-lm's
own path.
"""

import ctypes
import functools
import hashlib
import math
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

from ..kernels import turboquant as tq

CHUNK_TOKENS = 4096  # most keys read per chunk
CHUNK_SCORES = 1 << 22  # most float32 scores per chunk (queries x keys), bounds prefill memory


@dataclass(frozen=True, eq=False)
class PackedKV:
    """Keys or values of one layer as stored by ``TurboQuantKVCache``.

    ``packed`` is uint32 [B, H, T, words] and ``scales`` float16 [B, H, T, 1] in
    the format of ``turbocluster.kernels.turboquant``; a vector is
    ``scale * codebook[idx]``, in the rotated space when ``rotated``.
    ``codebook`` None means the format's Lloyd-Max centroids. ``mean``
    (values only, [B, H, 1, dim], unrotated space) was subtracted before
    encoding; attention adds it back to its output (the weights sum to one).
    """

    packed: mx.array
    scales: mx.array
    bits: int
    dim: int
    codebook: Optional[Tuple[float, ...]] = None
    rotated: bool = True
    mean: Optional[mx.array] = None

    @property
    def shape(self):
        return (*self.packed.shape[:-1], self.dim)


# --- reading packed vectors ----------------------------------------------------------
#
# Indices are a little-endian bit stream (see turboquant.pack), so on a
# little-endian host the bytes of the uint32 words are the stream's bytes in
# order. We cut the stream into fields of F = m * bits bits (m indices each) and
# look each field up in a table of 2**F rows of m centroids: one gather per m
# coordinates instead of one per coordinate, plus a few shifts.

_FIELDS = {2: 4, 3: 4, 4: 4, 5: 2, 6: 2, 7: 2, 8: 2}  # indices per field


@functools.lru_cache(maxsize=None)
def _lookup_table(bits, codebook):
    m = _FIELDS[bits]
    values = np.asarray(codebook if codebook is not None else tq.centroids(bits), dtype=np.float32)
    if values.shape != (1 << bits,):
        raise ValueError(f"a {bits}-bit codebook needs {1 << bits} values, got {values.shape[0]}")
    field = np.arange(1 << (m * bits), dtype=np.int64)
    cols = [values[(field >> (bits * j)) & ((1 << bits) - 1)] for j in range(m)]
    return mx.array(np.stack(cols, axis=1))


def _fields(packed, bits, dim):
    """The packed stream cut into F-bit fields, as an integer array [..., dim / m]."""
    m = _FIELDS[bits]
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


def codebook_values(kv: PackedKV, start=0, stop=None):
    """Unscaled codebook values of tokens [start, stop): float32 [B, H, stop - start, dim]."""
    packed = kv.packed[..., start:stop, :]
    f = _fields(packed, kv.bits, kv.dim)
    c = mx.take(_lookup_table(kv.bits, kv.codebook), f, axis=0)
    return c.reshape(*packed.shape[:-1], kv.dim)


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


def turbo_scaled_dot_product_attention(queries, keys: PackedKV, values: PackedKV, scale, mask=None, native=None):
    """softmax(scale * q k^T + mask) v with k and v read from ``PackedKV``.

    queries: [B, n_q_heads, L, D]; keys, values: [B, n_kv_heads, T, D] packed.
    mask: None, "causal" (the L queries are the last L positions) or an array
    broadcastable to [B, n_q_heads, L, T] (bool: True attends; else additive).
    Returns [B, n_q_heads, L, Dv] in the queries' dtype.
    native: None picks the native CPU kernel where it applies (see below);
    False forces MLX ops; True requires the native kernel.
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

    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"mask must be None, 'causal' or an array, got {mask!r}")
    elif mask is not None:
        mask = _split_mask(mask, n_q, n_kv)

    if native is None:
        native = _use_native(mask, n_rep * L)
    elif native and (_native_library() is None or not (mask is None or isinstance(mask, str))):
        raise ValueError("the native kernel needs a C compiler, the CPU and a None or 'causal' mask")
    if native:
        out = _native_attention(q, keys, values, L, mask == "causal").reshape(B, n_q, L, Dv)
        return _finish(out, values, queries.dtype)

    chunk = _chunk_tokens(B, n_q, L)
    neg = mx.finfo(mx.float32).min
    m_run = l_run = acc = None
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        k_c = codebook_values(keys, t0, t1)
        k_s = keys.scales[..., t0:t1, :].astype(mx.float32).swapaxes(-1, -2)
        s = (q @ k_c.swapaxes(-1, -2)) * k_s  # [B, n_kv, R, Tc]
        s = s.reshape(B, n_kv, n_rep, L, t1 - t0)
        if mask == "causal":
            if t1 - 1 > T - L:  # some key in the chunk is in some query's future
                q_pos = mx.arange(T - L, T)[:, None]
                s = mx.where(q_pos >= mx.arange(t0, t1)[None], s, neg)
        elif mask is not None:
            m_c = mask[..., t0:t1]
            s = mx.where(m_c, s, neg) if m_c.dtype == mx.bool_ else s + m_c.astype(mx.float32)
        m_c = s.max(axis=-1, keepdims=True)
        if m_run is None:
            m_new = m_c
        else:
            m_new = mx.maximum(m_run, m_c)
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
    return _finish((acc / l_run).reshape(B, n_q, L, Dv), values, queries.dtype)


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


# --- the native CPU kernel ------------------------------------------------------------
#
# MLX has no custom CPU kernels, and with MLX ops the centroid lookup is a
# gather that costs more than the whole float32 attention it replaces. For
# decode on the CPU (few query rows, mask None or "causal") we compile this C
# kernel once with the system compiler, the way MLX compiles its own fused CPU
# kernels, and call it through ctypes on zero-copy numpy views. It reads the
# same bit stream with field lookup tables (``_NATIVE_FIELDS``), keeps every
# score and sum in float32 and matches the MLX path to float rounding. Without
# a compiler, on other devices, or with TURBOCLUSTER_NATIVE=0, the MLX path runs.

NATIVE_MAX_ROWS = 32  # query rows per kv head (n_rep * L) up to which the native kernel runs
_NATIVE_FIELDS = {2: 4, 3: 4, 4: 2, 5: 2, 6: 2, 7: 2, 8: 1}  # must match DEF_UNPACK below
_NATIVE_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

/* Read F-bit field k of a little-endian bit stream of nbytes bytes. */
static inline uint32_t field(const uint8_t *row, int nbytes, int k, int F) {
  const int bit = k * F, byte = bit >> 3, sh = bit & 7;
  uint32_t v = 0;
  if (byte + 4 <= nbytes) memcpy(&v, row + byte, 4);
  else for (int j = 0; byte + j < nbytes; j++) v |= (uint32_t)row[byte + j] << (8 * j);
  return (v >> sh) & ((1u << F) - 1);
}

#define DEF_UNPACK(NAME, F, M)                                                      \
  static void NAME(const uint8_t *restrict row, int dim, const float *restrict lut, \
                   float *restrict out) {                                           \
    const int nf = dim / M, nbytes = dim * F / M / 8;                               \
    for (int k = 0; k < nf; k++)                                                    \
      memcpy(out + k * M, lut + (size_t)field(row, nbytes, k, F) * M, M * 4);       \
  }
DEF_UNPACK(unpack_2, 8, 4)
DEF_UNPACK(unpack_3, 12, 4)
DEF_UNPACK(unpack_4, 8, 2)
DEF_UNPACK(unpack_5, 10, 2)
DEF_UNPACK(unpack_6, 12, 2)
DEF_UNPACK(unpack_7, 14, 2)
DEF_UNPACK(unpack_8, 8, 1)

typedef void (*unpack_fn)(const uint8_t *, int, const float *, float *);
static unpack_fn pick(int b) {
  switch (b) {
  case 2: return unpack_2; case 3: return unpack_3; case 4: return unpack_4;
  case 5: return unpack_5; case 6: return unpack_6; case 7: return unpack_7;
  case 8: return unpack_8; default: return 0;
  }
}

/* q: [B, H, R, D] float32, rows r = rep * L + l, already rotated and scaled.
   kp/vp: packed uint32, strides (elements) for b, h, t in kps/vps; ks/vs: float32
   scales with strides kss/vss. Luts: 2**F rows of M centroids. out: [B, H, R, Dv]. */
int turbo_attention(int B, int H, int R, int L, int T, int D, int Dv, int causal,
                    const float *q, float *out,
                    const uint32_t *kp, const int64_t *kps, const float *ks, const int64_t *kss, int kbits, const float *klut,
                    const uint32_t *vp, const int64_t *vps, const float *vs, const int64_t *vss, int vbits, const float *vlut) {
  unpack_fn uk = pick(kbits), uv = pick(vbits);
  if (!uk || !uv) return -1;
  int fail = 0; /* one thread: OpenMP's spinning workers slowed MLX's own CPU work */
  for (int b = 0; b < B; b++)
    for (int h = 0; h < H; h++) {
      float *sc = malloc(sizeof(float) * ((size_t)R * T + D + Dv + (size_t)R * Dv));
      if (!sc) { fail = 1; continue; }
      float *kbuf = sc + (size_t)R * T, *vbuf = kbuf + D, *acc = vbuf + Dv;
      const float *qq = q + ((size_t)(b * H + h) * R) * D;
      const uint32_t *kph = kp + b * kps[0] + h * kps[1];
      const float *ksh = ks + b * kss[0] + h * kss[1];
      for (int t = 0; t < T; t++) {
        uk((const uint8_t *)(kph + t * kps[2]), D, klut, kbuf);
        const float s = ksh[t * kss[2]];
        for (int r = 0; r < R; r++) {
          const float *qr = qq + (size_t)r * D;
          float dot = 0.f;
          for (int d = 0; d < D; d++) dot += qr[d] * kbuf[d];
          sc[(size_t)r * T + t] = dot * s;
        }
      }
      for (int r = 0; r < R; r++) {
        float *row = sc + (size_t)r * T;
        int valid = causal ? T - L + (r % L) + 1 : T;
        if (valid > T) valid = T;
        float m = -INFINITY;
        for (int t = 0; t < valid; t++) m = row[t] > m ? row[t] : m;
        float sum = 0.f;
        for (int t = 0; t < valid; t++) { row[t] = expf(row[t] - m); sum += row[t]; }
        const float inv = 1.f / sum;
        for (int t = 0; t < valid; t++) row[t] *= inv;
        for (int t = valid; t < T; t++) row[t] = 0.f;
        for (int d = 0; d < Dv; d++) acc[(size_t)r * Dv + d] = 0.f;
      }
      const uint32_t *vph = vp + b * vps[0] + h * vps[1];
      const float *vsh = vs + b * vss[0] + h * vss[1];
      for (int t = 0; t < T; t++) {
        uv((const uint8_t *)(vph + t * vps[2]), Dv, vlut, vbuf);
        const float s = vsh[t * vss[2]];
        for (int r = 0; r < R; r++) {
          const float w = sc[(size_t)r * T + t] * s;
          float *a = acc + (size_t)r * Dv;
          for (int d = 0; d < Dv; d++) a[d] += w * vbuf[d];
        }
      }
      memcpy(out + ((size_t)(b * H + h) * R) * Dv, acc, sizeof(float) * R * Dv);
      free(sc);
    }
  return fail ? -2 : 0;
}
"""


@functools.lru_cache(maxsize=None)
def _native_library():
    """The compiled kernel (ctypes), or None where it cannot be built or is switched off."""
    if os.environ.get("TURBOCLUSTER_NATIVE", "1") == "0" or sys.byteorder != "little":
        return None
    tag = hashlib.sha256((_NATIVE_SOURCE + platform.machine()).encode()).hexdigest()[:16]
    cache_dir = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "turbocluster")
    path = os.path.join(cache_dir, f"turbo_attention-{tag}.so")
    if not os.path.exists(path):
        cc = os.environ.get("CC", "cc")
        try:
            os.makedirs(cache_dir, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
                c_file, so_file = os.path.join(tmp, "k.c"), os.path.join(tmp, "k.so")
                with open(c_file, "w") as f:
                    f.write(_NATIVE_SOURCE)
                cmd = [cc, "-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", c_file, "-o", so_file, "-lm"]
                subprocess.run(cmd, check=True, capture_output=True, timeout=120)
                os.replace(so_file, path)  # atomic: concurrent builders agree
        except (OSError, subprocess.SubprocessError) as e:
            warnings.warn(f"TurboQuant native CPU attention unavailable ({e}); using MLX ops")
            return None
    lib = ctypes.CDLL(path)
    lib.turbo_attention.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=None)
def _native_table(bits, codebook):
    m = _NATIVE_FIELDS[bits]
    values = np.asarray(codebook if codebook is not None else tq.centroids(bits), dtype=np.float32)
    field = np.arange(1 << (m * bits), dtype=np.int64)
    return np.ascontiguousarray(np.stack([values[(field >> (bits * j)) & ((1 << bits) - 1)] for j in range(m)], axis=1))


def _use_native(mask, rows):
    return (
        rows <= NATIVE_MAX_ROWS
        and (mask is None or isinstance(mask, str))
        and mx.default_device() == mx.cpu
        and _native_library() is not None
    )


def _native_attention(q, keys: PackedKV, values: PackedKV, L, causal):
    """q: [B, n_kv, R, D] float32, rotated and scaled. Returns [B, n_kv, R, Dv] float32."""
    lib = _native_library()
    ks, vs = keys.scales.astype(mx.float32), values.scales.astype(mx.float32)
    mx.eval(q, ks, vs, keys.packed, values.packed)
    qn = np.ascontiguousarray(np.asarray(q))
    arrays = [np.asarray(a) for a in (keys.packed, ks, values.packed, vs)]
    strides = [np.array([s // a.itemsize for s in a.strides[:3]], dtype=np.int64) for a in arrays]
    if any(a.strides[-1] != a.itemsize for a in arrays):
        raise ValueError("packed keys and values must be contiguous along the last axis")
    B, H, R, D = qn.shape
    T = arrays[0].shape[2]
    out = np.empty((B, H, R, values.dim), dtype=np.float32)
    klut, vlut = _native_table(keys.bits, keys.codebook), _native_table(values.bits, values.codebook)
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)
    rc = lib.turbo_attention(
        B, H, R, L, T, D, values.dim, int(causal), p(qn), p(out),
        p(arrays[0]), p(strides[0]), p(arrays[1]), p(strides[1]), keys.bits, p(klut),
        p(arrays[2]), p(strides[2]), p(arrays[3]), p(strides[3]), values.bits, p(vlut),
    )
    if rc:
        raise RuntimeError(f"turbo_attention kernel failed with code {rc}")
    return mx.array(out)


# --- the hook ------------------------------------------------------------------------

_original_sdpa = None


def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx-lm's ``base.scaled_dot_product_attention`` that also reads ``PackedKV``."""
    if isinstance(keys, PackedKV):
        if sinks is not None:
            raise ValueError("TurboQuant attention does not support attention sinks")
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
