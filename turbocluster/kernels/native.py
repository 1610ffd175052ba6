"""Native CPU attention over TurboQuant-packed keys and values (C, compiled at first use).

MLX has no custom CPU kernels, and with MLX ops the centroid lookup is a
gather that costs more than the whole float32 attention it replaces. For
decode on the CPU (few query rows, mask None or "causal") we compile this C
kernel once with the system compiler, the way MLX compiles its own fused CPU
kernels, and call it through ctypes on zero-copy numpy views. It reads the
same bit stream with field lookup tables (``format.FIELD_INDICES``, the C unpack routines generated from it), keeps every
score and sum in float32 and matches the MLX path to float rounding. Without
a compiler, on other devices, or with TURBOCLUSTER_NATIVE=0, the MLX path runs.

No ``-ffast-math``: linking it would switch the whole process to flush
subnormals to zero.
"""

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import warnings

import mlx.core as mx
import numpy as np

from . import turboquant as tq
from .format import FIELD_INDICES, field_indices

NATIVE_MAX_ROWS = 32  # query rows per kv head (n_rep * L) up to which the native kernel runs
_NATIVE_HEAD = r"""
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
"""
_NATIVE_BODY = r"""
/* q: [B, H, R, D] float32, rows r = rep * L + l, already rotated and scaled.
   kp/vp: packed uint32, strides (elements) for b, h, t in kps/vps; ks/vs: float32
   scales with strides kss/vss. Luts: 2**F rows of M centroids. out: [B, H, R, Dv].
   lse: NULL, or [B, H, R] to receive each row's log-sum-exp of its scores. */
int turbo_attention(int B, int H, int R, int L, int T, int D, int Dv, int causal,
                    const float *q, float *out,
                    const uint32_t *kp, const int64_t *kps, const float *ks, const int64_t *kss, int kbits, const float *klut,
                    const uint32_t *vp, const int64_t *vps, const float *vs, const int64_t *vss, int vbits, const float *vlut,
                    float *lse) {
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
        if (lse) lse[(size_t)(b * H + h) * R + r] = m + logf(sum);
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


def _unpack_source():
    """The per-width unpack routines and their dispatch, generated from ``format.FIELD_INDICES``."""
    lines = [f"DEF_UNPACK(unpack_{b}, {m * b}, {m})" for b, m in sorted(FIELD_INDICES.items())]
    cases = " ".join(f"case {b}: return unpack_{b};" for b in sorted(FIELD_INDICES))
    lines += [
        "",
        "typedef void (*unpack_fn)(const uint8_t *, int, const float *, float *);",
        f"static unpack_fn pick(int b) {{ switch (b) {{ {cases} default: return 0; }} }}",
        "",
    ]
    return "\n".join(lines) + "\n"


_NATIVE_SOURCE = _NATIVE_HEAD + _unpack_source() + _NATIVE_BODY


@functools.lru_cache(maxsize=None)
def library():
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
                cmd = [cc, "-O3", "-march=native", "-fPIC", "-shared", c_file, "-o", so_file, "-lm"]
                subprocess.run(cmd, check=True, capture_output=True, timeout=120)
                os.replace(so_file, path)  # atomic: concurrent builders agree
        except (OSError, subprocess.SubprocessError) as e:
            warnings.warn(f"TurboQuant native CPU attention unavailable ({e}); using MLX ops")
            return None
    lib = ctypes.CDLL(path)
    lib.turbo_attention.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=None)
def _table(bits, codebook):
    m = field_indices(bits)
    values = np.asarray(codebook if codebook is not None else tq.centroids(bits), dtype=np.float32)
    field = np.arange(1 << (m * bits), dtype=np.int64)
    return np.ascontiguousarray(np.stack([values[(field >> (bits * j)) & ((1 << bits) - 1)] for j in range(m)], axis=1))


def applies(rows):
    """Whether the kernel serves ``rows`` query rows per kv head here (mask None or "causal")."""
    return rows <= NATIVE_MAX_ROWS and mx.default_device() == mx.cpu and library() is not None


def attention(q, keys, values, L, causal, with_lse=False):
    """q: [B, n_kv, R, D] float32, rotated and scaled. Returns [B, n_kv, R, Dv] float32.

    with_lse: also return each row's log-sum-exp of its scores, [B, n_kv, R, 1]
    (what merging with attention over other keys needs: ``attention.split_attention``).
    """
    lib = library()
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
    klut, vlut = _table(keys.bits, keys.codebook), _table(values.bits, values.codebook)
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)
    lse = np.empty((B, H, R, 1), dtype=np.float32) if with_lse else None
    rc = lib.turbo_attention(
        B, H, R, L, T, D, values.dim, int(causal), p(qn), p(out),
        p(arrays[0]), p(strides[0]), p(arrays[1]), p(strides[1]), keys.bits, p(klut),
        p(arrays[2]), p(strides[2]), p(arrays[3]), p(strides[3]), values.bits, p(vlut),
        p(lse) if with_lse else None,
    )
    if rc:
        raise RuntimeError(f"turbo_attention kernel failed with code {rc}")
    return (mx.array(out), mx.array(lse)) if with_lse else mx.array(out)
