"""Kernel source of the fused TurboQuant attention, written once for CUDA and Metal.

The bodies use a few ``$NAME`` placeholders (thread and group indices,
shared/threadgroup memory, barriers) that ``render`` fills in per backend; the
rest is the common subset of CUDA C++ and the Metal shading language. Helper
functions (half to float, warp/SIMD reductions) live in a per-backend header.
Placeholders are substituted in Python rather than by macros because
``mx.fast.metal_kernel`` adds the thread-position attributes a body mentions
by scanning the body's text.
"""

_PRELUDE = {
    "cuda": {
        "$TID": "threadIdx.x",
        "$GX": "blockIdx.x",
        "$GY": "blockIdx.y",
        "$GZ": "blockIdx.z",
        "$GLOBAL": "(blockIdx.x * blockDim.x + threadIdx.x)",
        "$SHARED": "__shared__",
        "$SPTR": "",
        "$BARRIER": "__syncthreads()",
        "$UNROLL4": "#pragma unroll 4",
    },
    "metal": {
        "$TID": "thread_position_in_threadgroup.x",
        "$GX": "threadgroup_position_in_grid.x",
        "$GY": "threadgroup_position_in_grid.y",
        "$GZ": "threadgroup_position_in_grid.z",
        "$GLOBAL": "thread_position_in_grid.x",
        "$SHARED": "threadgroup",
        "$SPTR": "threadgroup",
        "$BARRIER": "threadgroup_barrier(mem_flags::mem_threadgroup)",
        "$UNROLL4": "",
    },
}

HEADER = {
    "cuda": """
#include <cuda_fp16.h>
#include <cuda_bf16.h>
__device__ inline float tq_exp(float x) { return expf(x); }
__device__ inline float tq_max(float a, float b) { return fmaxf(a, b); }
__device__ inline float tq_f(__half x) { return __half2float(x); }
__device__ inline float tq_f(float x) { return x; }
__device__ inline float tq_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ inline float tq_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename T> __device__ inline T tq_out(float v) { return static_cast<T>(v); }
template <> __device__ inline __half tq_out<__half>(float v) { return __float2half(v); }
template <> __device__ inline __nv_bfloat16 tq_out<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
""",
    "metal": """
inline float tq_exp(float x) { return metal::precise::exp(x); }
inline float tq_max(float a, float b) { return metal::max(a, b); }
inline float tq_f(half x) { return float(x); }
inline float tq_f(float x) { return x; }
inline float tq_warp_max(float v) { return simd_max(v); }
inline float tq_warp_sum(float v) { return simd_sum(v); }
template <typename T> inline T tq_out(float v) { return static_cast<T>(v); }
""",
}

# Decode attention over packed keys and values, one (split of the context, kv head, tile of
# query rows) per threadgroup. Template: BK, BV (bits), D, DV (head dims), RT (query rows per
# tile), NT (threads), TMAX (most tokens per split). Inputs: q [BH, R, D] float32, already
# rotated and scaled; kp/vp packed words [B, H, T, W] and ks/vs float16 scales [B, H, T, 1],
# any strides (slices of the cache's buffers are read in place); kcb/vcb codebooks;
# params = [R, T, L, tokens per split, causal, splits]. Outputs per (row, split): the
# unnormalised value sum in the rotated space, and (max score, sum of exp) for the merge.
DECODE = """
  constexpr int WK = (D * BK + 31) / 32;
  constexpr int WV = (DV * BV + 31) / 32;
  constexpr int NG = DV / 4;
  constexpr int NL = NT / NG;
  constexpr int NWARP = NT / 32;
  constexpr int SREG = (RT * TMAX > NL * RT * DV) ? RT * TMAX : NL * RT * DV;
  constexpr float NEG = -3.0e38f;
  constexpr unsigned int MK = (1u << BK) - 1u;
  constexpr unsigned int MV = (1u << BV) - 1u;

  $SHARED float smem[RT * D + (1 << BK) + (1 << BV) + SREG];
  $SPTR float* q_s = smem;
  $SPTR float* kcb_s = smem + RT * D;
  $SPTR float* vcb_s = kcb_s + (1 << BK);
  $SPTR float* s_s = vcb_s + (1 << BV);

  const int tid = $TID;
  const int split = $GX;
  const int bh = $GY;
  const int row0 = $GZ * RT;
  const int n_rows = params[0];
  const int T = params[1];
  const int L = params[2];
  const int tps = params[3];
  const int causal = params[4];
  const int nsplit = params[5];
  const int H = kp_shape[1];
  const int b = bh / H;
  const int h = bh - b * H;
  const int t0 = split * tps;
  const int t1 = min(T, t0 + tps);
  const int n_tok = max(0, t1 - t0);

  for (int i = tid; i < RT * D; i += NT) {
    const int r = i / D;
    q_s[i] = (row0 + r < n_rows) ? q[((long)bh * n_rows + row0) * D + i] : 0.0f;
  }
  for (int i = tid; i < (1 << BK); i += NT) kcb_s[i] = kcb[i];
  for (int i = tid; i < (1 << BV); i += NT) vcb_s[i] = vcb[i];
  $BARRIER;

  const long kbase = (long)b * kp_strides[0] + (long)h * kp_strides[1];
  const long ksbase = (long)b * ks_strides[0] + (long)h * ks_strides[1];
  for (int j = tid; j < n_tok; j += NT) {
    const int tok = t0 + j;
    const long off = kbase + (long)tok * kp_strides[2];
    unsigned int w[WK];
    #pragma unroll
    for (int k = 0; k < WK; ++k) w[k] = kp[off + k];
    float acc[RT];
    #pragma unroll
    for (int r = 0; r < RT; ++r) acc[r] = 0.0f;
    #pragma unroll
    for (int i = 0; i < D; ++i) {
      const int bit = i * BK;
      const int k = bit >> 5;
      const int o = bit & 31;
      unsigned int v = w[k] >> o;
      if (o + BK > 32) v |= w[k + 1] << (32 - o);
      const float c = kcb_s[v & MK];
      #pragma unroll
      for (int r = 0; r < RT; ++r) acc[r] += q_s[r * D + i] * c;
    }
    const float sc = tq_f(ks[ksbase + (long)tok * ks_strides[2]]);
    #pragma unroll
    for (int r = 0; r < RT; ++r) {
      const int row = row0 + r;
      bool ok = row < n_rows;
      if (causal) ok = ok && (tok <= T - L + row % L);
      s_s[r * TMAX + j] = ok ? acc[r] * sc : NEG;
    }
  }
  $BARRIER;

  const int lane = tid & 31;
  const int warp = tid >> 5;
  const long vsbase = (long)b * vs_strides[0] + (long)h * vs_strides[1];
  for (int r = warp; r < RT; r += NWARP) {
    float m = NEG;
    for (int j = lane; j < n_tok; j += 32) m = tq_max(m, s_s[r * TMAX + j]);
    m = tq_warp_max(m);
    const bool dead = m < -1.0e38f;
    float l = 0.0f;
    for (int j = lane; j < n_tok; j += 32) {
      const float p = dead ? 0.0f : tq_exp(s_s[r * TMAX + j] - m);
      l += p;
      s_s[r * TMAX + j] = p * tq_f(vs[vsbase + (long)(t0 + j) * vs_strides[2]]);
    }
    l = tq_warp_sum(l);
    if (lane == 0 && row0 + r < n_rows) {
      const long o = (((long)bh * n_rows + row0 + r) * nsplit + split) * 2;
      ml[o] = m;
      ml[o + 1] = l;
    }
  }
  $BARRIER;

  const int g = tid % NG;
  const int lnum = tid / NG;
  float acc[RT][4];
  #pragma unroll
  for (int r = 0; r < RT; ++r) {
    #pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = 0.0f;
  }
  const long vbase = (long)b * vp_strides[0] + (long)h * vp_strides[1];
  const int bit0 = g * 4 * BV;
  const int k0 = bit0 >> 5;
  const int o0 = bit0 & 31;
  if (lnum < NL) {
    $UNROLL4
    for (int j = lnum; j < n_tok; j += NL) {
      const long off = vbase + (long)(t0 + j) * vp_strides[2] + k0;
      const unsigned int w0 = vp[off];
      const unsigned int w1 = (k0 + 1 < WV) ? vp[off + 1] : 0u;
      float c[4];
      #pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
        const int p = o0 + cc * BV;
        unsigned int v;
        if (p >= 32) {
          v = w1 >> (p - 32);
        } else {
          v = w0 >> p;
          if (p + BV > 32) v |= w1 << (32 - p);
        }
        c[cc] = vcb_s[v & MV];
      }
      #pragma unroll
      for (int r = 0; r < RT; ++r) {
        const float pr = s_s[r * TMAX + j];
        #pragma unroll
        for (int cc = 0; cc < 4; ++cc) acc[r][cc] += pr * c[cc];
      }
    }
  }
  $BARRIER;
  if (lnum < NL) {
    #pragma unroll
    for (int r = 0; r < RT; ++r) {
      #pragma unroll
      for (int cc = 0; cc < 4; ++cc) s_s[(lnum * RT + r) * DV + g * 4 + cc] = acc[r][cc];
    }
  }
  $BARRIER;
  for (int i = tid; i < RT * DV; i += NT) {
    const int r = i / DV;
    if (row0 + r < n_rows) {
      float sum = 0.0f;
      for (int ln = 0; ln < NL; ++ln) sum += s_s[ln * RT * DV + i];
      out[(((long)bh * n_rows + row0 + r) * nsplit + split) * DV + (i - r * DV)] = sum;
    }
  }
"""

# Packed words + scales -> scale * codebook[idx] in OutT, [B, H, T, D] row-contiguous, from
# packed input of any strides. Template: BITS, D, OutT. params = [number of elements].
DEQUANT = """
  const long elem = $GLOBAL;
  if (elem >= (long)params[0]) return;
  constexpr unsigned int MASK = (1u << BITS) - 1u;
  const int H = kp_shape[1];
  const int T = kp_shape[2];
  const int i = elem % D;
  const long row = elem / D;
  const int t = row % T;
  const long bh = row / T;
  const int h = bh % H;
  const long b = bh / H;
  const long base = b * kp_strides[0] + h * kp_strides[1] + (long)t * kp_strides[2];
  const int bit = i * BITS;
  const int k = bit >> 5;
  const int o = bit & 31;
  unsigned int v = kp[base + k] >> o;
  if (o + BITS > 32) v |= kp[base + k + 1] << (32 - o);
  const float s = tq_f(ks[b * ks_strides[0] + h * ks_strides[1] + (long)t * ks_strides[2]]);
  out[elem] = tq_out<OutT>(cb[v & MASK] * s);
"""


def render(source: str, backend: str) -> str:
    """``source`` with its placeholders filled in for ``backend`` ('cuda' or 'metal')."""
    for name, value in sorted(_PRELUDE[backend].items(), key=lambda kv: -len(kv[0])):
        source = source.replace(name, value)
    if "$" in source:
        raise ValueError(f"unfilled placeholder in {backend} kernel source")
    return source
