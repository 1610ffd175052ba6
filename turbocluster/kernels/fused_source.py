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
        "$NGX": "gridDim.x",
        "$ALIGN": "__align__(16)",
        "$GLOBAL": "(blockIdx.x * blockDim.x + threadIdx.x)",
        "$SHARED": "__shared__",
        "$SPTR": "",
        "$BARRIER": "__syncthreads()",
        "$UNROLL4": "#pragma unroll 4",
        "$HALF": "__half",
    },
    "metal": {
        "$TID": "thread_position_in_threadgroup.x",
        "$GX": "threadgroup_position_in_grid.x",
        "$GY": "threadgroup_position_in_grid.y",
        "$GZ": "threadgroup_position_in_grid.z",
        "$NGX": "threadgroups_per_grid.x",
        "$ALIGN": "",
        "$GLOBAL": "thread_position_in_grid.x",
        "$SHARED": "threadgroup",
        "$SPTR": "threadgroup",
        "$BARRIER": "threadgroup_barrier(mem_flags::mem_threadgroup)",
        "$UNROLL4": "",
        "$HALF": "half",
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
__device__ inline float tq_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ inline float tq_rsqrt(float x) { return rsqrtf(x); }
// correctly rounded and never contracted into an FMA: the encode kernel must match mx ops bit for bit
__device__ inline float tq_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ inline float tq_add(float a, float b) { return __fadd_rn(a, b); }
__device__ inline float tq_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ inline float tq_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ inline float tq_sqrt(float x) { return __fsqrt_rn(x); }
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
inline float tq_f(bfloat16_t x) { return float(x); }
inline float tq_rsqrt(float x) { return metal::rsqrt(x); }
inline float tq_mul(float a, float b) { return a * b; }
inline float tq_add(float a, float b) { return a + b; }
inline float tq_sub(float a, float b) { return a - b; }
inline float tq_div(float a, float b) { return metal::precise::divide(a, b); }
inline float tq_sqrt(float x) { return metal::precise::sqrt(x); }
inline float tq_warp_max(float v) { return simd_max(v); }
inline float tq_warp_sum(float v) { return simd_sum(v); }
template <typename T> inline T tq_out(float v) { return static_cast<T>(v); }
""",
}

# In-place Walsh-Hadamard butterflies of ROWS rows of DIM floats in shared memory at X,
# block by block (the binary decomposition of DIM, largest block first, as
# ``format.rotation_blocks``), each block scaled by 1/sqrt(its size) at the end: the
# transform of ``turboquant._hadamard`` without its signs. Used by both decode kernels.
_FWHT = """
  for (int h = 1; h < DIM; h <<= 1) {
    $BARRIER;
    for (int p = tid; p < ROWS * (DIM / 2); p += NT) {
      const int r = p / (DIM / 2);
      const int e = p - r * (DIM / 2);
      const int i = (e / h) * 2 * h + (e % h);
      int start = 0, size = 0;
      for (int k = 16; k >= 0; --k) {
        if ((DIM >> k) & 1) {
          if (i < start + (1 << k)) { size = 1 << k; break; }
          start += 1 << k;
        }
      }
      if (h < size) {
        const float a = X[r * DIM + i];
        const float c = X[r * DIM + i + h];
        X[r * DIM + i] = a + c;
        X[r * DIM + i + h] = a - c;
      }
    }
  }
  $BARRIER;
"""

# Decode attention over packed keys and values, pass 1 (split-K / flash-decoding): one
# threadgroup per (split of the context, kv head, tile of RT query rows). Template: BK, BV
# (bits), D, DV (head dims), RT, NT (threads), TMAX (most tokens per split), L (query
# positions), CAUSAL, ROT (keys rotated: rotate the query here), QT (query dtype).
# Inputs: q [B, n_q, L, D] (raw queries, any strides); kp/vp packed words [B, H, T, W] and
# ks/vs float16 scales [B, H, T, 1], any strides (slices of the cache's buffers read in
# place); kcb (key codebook times the softmax scale), vcb; ksign (the format's signs, D).
# The number of splits is the grid's; each covers ceil(T / splits) tokens. Packed words
# of a chunk of tokens are staged in shared memory with coalesced loads (rows padded to an
# odd number of words, so a thread per token reads them without bank conflicts); the
# query tile is rotated once in shared memory. Outputs per (row, split): the unnormalised
# value sum in the rotated space, and (max score, sum of exp) for the merge.
DECODE = """
  constexpr int WK = (D * BK + 31) / 32;
  constexpr int WV = (DV * BV + 31) / 32;
  constexpr int WKP = WK | 1;
  constexpr int WVP = WV | 1;
  constexpr int SB = 4352;  // staging words (17 KiB)
  constexpr int CK0 = SB / WKP;
  constexpr int CK = CK0 >= NT ? NT : (CK0 / 32) * 32;  // tokens per key chunk
  constexpr int CV0 = SB / WVP;
  constexpr int CV = CV0 >= NT ? NT : (CV0 / 32) * 32;
  constexpr int BUF = (CK * WKP > CV * WVP) ? CK * WKP : CV * WVP;
  constexpr int NG = DV / 4;
  constexpr int NL = NT / NG;
  constexpr int NWARP = NT / 32;
  constexpr int SREG = (RT * TMAX > NL * RT * DV) ? RT * TMAX : NL * RT * DV;
  constexpr float NEG = -3.0e38f;
  constexpr unsigned int MK = (1u << BK) - 1u;
  constexpr unsigned int MV = (1u << BV) - 1u;

  $SHARED $ALIGN float smem[RT * D + SREG + TMAX + (1 << BK) + (1 << BV)];
  $SHARED unsigned int buf[BUF];
  $SPTR float* q_s = smem;
  $SPTR float* s_s = smem + RT * D;
  $SPTR float* vsc_s = s_s + SREG;  // the split's value scales
  $SPTR float* kcb_s = vsc_s + TMAX;
  $SPTR float* vcb_s = kcb_s + (1 << BK);

  const int tid = $TID;
  const int nsplit = $NGX;
  const int split = $GX;
  const int bh = $GY;
  const int row0 = $GZ * RT;
  const int H = kp_shape[1];
  const int T = kp_shape[2];
  const int n_rep = q_shape[1] / H;
  const int n_rows = n_rep * L;
  const int b = bh / H;
  const int h = bh - b * H;
  const int tps = (T + nsplit - 1) / nsplit;
  const int t0 = split * tps;
  const int t1 = min(T, t0 + tps);
  const int n_tok = max(0, t1 - t0);

  for (int i = tid; i < RT * D; i += NT) {
    const int r = i / D;
    const int d = i - r * D;
    const int row = row0 + r;
    float x = 0.0f;
    if (row < n_rows) {
      const int qh = h * n_rep + row / L;
      const int l = row % L;
      x = tq_f(q[(long)b * q_strides[0] + (long)qh * q_strides[1] + (long)l * q_strides[2] + (long)d * q_strides[3]]);
      if (ROT) x *= ksign[d];
    }
    q_s[i] = x;
  }
  for (int i = tid; i < (1 << BK); i += NT) kcb_s[i] = kcb[i];
  for (int i = tid; i < (1 << BV); i += NT) vcb_s[i] = vcb[i];
  if (ROT) {
    {
      constexpr int DIM = D;
      constexpr int ROWS = RT;
      $SPTR float* X = q_s;
$FWHT
    }
    for (int i = tid; i < RT * D; i += NT) {
      const int d = i % D;
      int size = 0, start = 0;
      for (int k = 16; k >= 0; --k) {
        if ((D >> k) & 1) {
          if (d < start + (1 << k)) { size = 1 << k; break; }
          start += 1 << k;
        }
      }
      q_s[i] *= tq_rsqrt((float)size);
    }
  }
  $BARRIER;

  // scores: chunks of CK tokens, packed words staged in shared memory, a thread per token
  const long kbase = (long)b * kp_strides[0] + (long)h * kp_strides[1];
  const long ksbase = (long)b * ks_strides[0] + (long)h * ks_strides[1];
  const long vsbase = (long)b * vs_strides[0] + (long)h * vs_strides[1];
  for (int c0 = 0; c0 < n_tok; c0 += CK) {
    const int nc = min(CK, n_tok - c0);
    {
      // all of this thread's loads in flight at once, then into shared memory
      constexpr int PER = (CK * WK + NT - 1) / NT;
      constexpr int BATCH = PER < 8 ? PER : 8;
      #pragma unroll 1
      for (int u0 = 0; u0 < PER; u0 += BATCH) {
        unsigned int tmp[BATCH];
        #pragma unroll
        for (int u = 0; u < BATCH; ++u) {
          const int i = tid + (u0 + u) * NT;
          const int j = i / WK;
          tmp[u] = (i < nc * WK) ? kp[kbase + (long)(t0 + c0 + j) * kp_strides[2] + (i - j * WK)] : 0u;
        }
        #pragma unroll
        for (int u = 0; u < BATCH; ++u) {
          const int i = tid + (u0 + u) * NT;
          const int j = i / WK;
          if (i < nc * WK) buf[j * WKP + (i - j * WK)] = tmp[u];
        }
      }
    }
    float sc = 0.0f;
    if (tid < nc) {
      const int tok = t0 + c0 + tid;
      sc = tq_f(ks[ksbase + (long)tok * ks_strides[2]]);
      vsc_s[c0 + tid] = tq_f(vs[vsbase + (long)tok * vs_strides[2]]);
    }
    $BARRIER;
    if (tid < nc) {
      const int j = tid;
      const int tok = t0 + c0 + j;
      unsigned int w[WK + 1];
      #pragma unroll
      for (int k = 0; k < WK; ++k) w[k] = buf[j * WKP + k];
      w[WK] = 0u;
      float acc[RT];
      #pragma unroll
      for (int r = 0; r < RT; ++r) acc[r] = 0.0f;
      #pragma unroll
      for (int i4 = 0; i4 < D / 4; ++i4) {
        float c[4];
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int bit = (i4 * 4 + e) * BK;
          const int k = bit >> 5;
          const int o = bit & 31;
          unsigned int v = w[k] >> o;
          if (o + BK > 32) v |= w[k + 1] << (32 - o);
          c[e] = kcb_s[v & MK];
        }
        #pragma unroll
        for (int r = 0; r < RT; ++r) {
          const float4 qv = (($SPTR const float4*)q_s)[r * (D / 4) + i4];
          acc[r] += qv.x * c[0] + qv.y * c[1] + qv.z * c[2] + qv.w * c[3];
        }
      }
      #pragma unroll
      for (int r = 0; r < RT; ++r) {
        const int row = row0 + r;
        bool ok = row < n_rows;
        if (CAUSAL) ok = ok && (tok <= T - L + row % L);
        s_s[r * TMAX + c0 + j] = ok ? acc[r] * sc : NEG;
      }
    }
    $BARRIER;
  }

  // softmax of the split, a warp per row; probabilities times the value scales
  const int lane = tid & 31;
  const int warp = tid >> 5;
  for (int r = warp; r < RT; r += NWARP) {
    float m = NEG;
    for (int j = lane; j < n_tok; j += 32) m = tq_max(m, s_s[r * TMAX + j]);
    m = tq_warp_max(m);
    const bool dead = m < -1.0e38f;
    float l = 0.0f;
    for (int j = lane; j < n_tok; j += 32) {
      const float p = dead ? 0.0f : tq_exp(s_s[r * TMAX + j] - m);
      l += p;
      s_s[r * TMAX + j] = p * vsc_s[j];
    }
    l = tq_warp_sum(l);
    if (lane == 0 && row0 + r < n_rows) {
      const long o = (((long)bh * n_rows + row0 + r) * nsplit + split) * 2;
      ml[o] = m;
      ml[o + 1] = l;
    }
  }
  $BARRIER;

  // values: chunks of CV tokens staged in shared memory; a thread per 4 coordinates
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
  for (int c0 = 0; c0 < n_tok; c0 += CV) {
    const int nc = min(CV, n_tok - c0);
    {
      constexpr int PER = (CV * WV + NT - 1) / NT;
      constexpr int BATCH = PER < 8 ? PER : 8;
      #pragma unroll 1
      for (int u0 = 0; u0 < PER; u0 += BATCH) {
        unsigned int tmp[BATCH];
        #pragma unroll
        for (int u = 0; u < BATCH; ++u) {
          const int i = tid + (u0 + u) * NT;
          const int j = i / WV;
          tmp[u] = (i < nc * WV) ? vp[vbase + (long)(t0 + c0 + j) * vp_strides[2] + (i - j * WV)] : 0u;
        }
        #pragma unroll
        for (int u = 0; u < BATCH; ++u) {
          const int i = tid + (u0 + u) * NT;
          const int j = i / WV;
          if (i < nc * WV) buf[j * WVP + (i - j * WV)] = tmp[u];
        }
      }
    }
    $BARRIER;
    if (lnum < NL) {
      $UNROLL4
      for (int j = lnum; j < nc; j += NL) {
        const unsigned int w0 = buf[j * WVP + k0];
        const unsigned int w1 = (k0 + 1 < WV) ? buf[j * WVP + k0 + 1] : 0u;
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
          const float pr = s_s[r * TMAX + c0 + j];
          #pragma unroll
          for (int cc = 0; cc < 4; ++cc) acc[r][cc] += pr * c[cc];
        }
      }
    }
    $BARRIER;
  }
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

# Decode attention, pass 2: the log-sum-exp merge of the splits (``fused.combine_splits``),
# the un-rotation of the output row (ROT) and the value mean (MEAN), one threadgroup per
# output row. Template: DV, NT, ROT, MEAN, OutT. Inputs: acc [BH, R, S, DV], ml [BH, R, S, 2]
# from pass 1, vsign (DV signs), mean [B, H, 1, DV] float16 (any strides; read when MEAN).
# Output [BH * R, DV] in OutT, i.e. [B, n_q, L, DV].
COMBINE = """
  constexpr int SMAX = 1024;
  constexpr float NEG = -3.0e38f;
  constexpr int NGR = NT / DV;
  $SHARED float w_s[SMAX];
  $SHARED float red[NT > DV ? NT : DV];
  $SHARED float o_s[DV];
  const int tid = $TID;
  const int row = $GX;
  const int S = acc_shape[2];
  const int n_rows = acc_shape[1];
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const long base = (long)row * S;

  float m = NEG;
  for (int s = tid; s < S; s += NT) m = tq_max(m, ml[(base + s) * 2]);
  m = tq_warp_max(m);
  if (lane == 0) red[warp] = m;
  $BARRIER;
  float top = NEG;
  for (int k = 0; k < NT / 32; ++k) top = tq_max(top, red[k]);
  $BARRIER;
  float l = 0.0f;
  for (int s = tid; s < S; s += NT) {
    const float w = tq_exp(ml[(base + s) * 2] - top);
    if (s < SMAX) w_s[s] = w;
    l += w * ml[(base + s) * 2 + 1];
  }
  l = tq_warp_sum(l);
  if (lane == 0) red[warp] = l;
  $BARRIER;
  float lsum = 0.0f;
  for (int k = 0; k < NT / 32; ++k) lsum += red[k];
  $BARRIER;

  const int d = tid % DV;
  const int grp = tid / DV;
  if (grp < NGR) {
    float sum = 0.0f;
    for (int s = grp; s < S; s += NGR) {
      const float w = s < SMAX ? w_s[s] : tq_exp(ml[(base + s) * 2] - top);
      sum += acc[(base + s) * DV + d] * w;
    }
    red[grp * DV + d] = sum;
  }
  $BARRIER;
  for (int i = tid; i < DV; i += NT) {
    float sum = 0.0f;
    for (int k = 0; k < NGR; ++k) sum += red[k * DV + i];
    o_s[i] = sum / lsum;
  }
  if (ROT) {
    constexpr int DIM = DV;
    constexpr int ROWS = 1;
    $SPTR float* X = o_s;
$FWHT
  }
  $BARRIER;
  for (int i = tid; i < DV; i += NT) {
    float x = o_s[i];
    if (ROT) {
      int size = 0, start = 0;
      for (int k = 16; k >= 0; --k) {
        if ((DV >> k) & 1) {
          if (i < start + (1 << k)) { size = 1 << k; break; }
          start += 1 << k;
        }
      }
      x *= tq_rsqrt((float)size) * vsign[i];
    }
    if (MEAN) {
      const int H = mean_shape[1];
      const int bh = row / n_rows;
      const int b = bh / H;
      const int hh = bh - b * H;
      x += tq_f(mean[(long)b * mean_strides[0] + (long)hh * mean_strides[1] + (long)i * mean_strides[3]]);
    }
    out[(long)row * DV + i] = tq_out<OutT>(x);
  }
"""

# Encode of new keys and values in one launch (rotate, normalise, quantize, pack, scale):
# one threadgroup of NT threads per vector, a thread per coordinate; grid y 0 = keys,
# 1 = values. Template: BK, BV, D, DV (dims), P, PV (next powers of two), NT, KMEAN, VMEAN.
# Inputs: k [B, H, n, D], v [B, H, n, DV] (any float dtype, any strides), kmean/vmean
# [B, H, 1, dim] (read when KMEAN/VMEAN), ksign/vsign (the format's signs), kbs/vbs
# (1/sqrt(block size) per coordinate), kcb/vcb (centroids), kbd/vbd (boundaries), root
# ([sqrt(D), sqrt(DV)] as float32). Outputs kp [B, H, n, WK] uint32, ks [B, H, n, 1] half,
# vp, vs. Every float step is a single correctly rounded operation in a fixed order
# (butterflies, then pairwise tree sums), so ``fused.reference_encode``, the same steps
# spelled in mx ops, gives the same bits.
ENCODE = """
  $SHARED float x_s[256];
  $SHARED float a_s[256];
  $SHARED float c_s[256];
  $SHARED unsigned int i_s[256];
  const int tid = $TID;
  const int vec = $GX;
  if ($GY == 0) {
@SIDE_K
  } else {
@SIDE_V
  }
"""

_ENCODE_SIDE = """
    constexpr int DIM = @DIM;
    constexpr int PW = @P;
    constexpr int BITS = @BITS;
    constexpr int W = (DIM * BITS + 31) / 32;
    constexpr int ROWS = 1;
    const int H = @X_shape[1];
    const int n = @X_shape[2];
    const int t = vec % n;
    const int bh = vec / n;
    const int h = bh % H;
    const int b = bh / H;
    $SPTR float* X = x_s;
    for (int i = tid; i < DIM; i += NT) {
      float x = tq_f(@X[(long)b * @X_strides[0] + (long)h * @X_strides[1] + (long)t * @X_strides[2] + (long)i * @X_strides[3]]);
      if (@MEAN) x = tq_sub(x, tq_f(@Xmean[(long)b * @Xmean_strides[0] + (long)h * @Xmean_strides[1] + (long)i * @Xmean_strides[3]]));
      X[i] = tq_mul(x, @Xsign[i]);
    }
$FWHT
    for (int i = tid; i < PW; i += NT) {
      float y = 0.0f;
      if (i < DIM) {
        y = tq_mul(X[i], @Xbs[i]);
        X[i] = y;
      }
      a_s[i] = tq_mul(y, y);
    }
    for (int st = PW / 2; st > 0; st >>= 1) {
      $BARRIER;
      for (int i = tid; i < st; i += NT) a_s[i] = tq_add(a_s[i], a_s[i + st]);
    }
    $BARRIER;
    const float inv = tq_div(root[@R], tq_max(tq_sqrt(a_s[0]), 1e-30f));
    $BARRIER;
    for (int i = tid; i < PW; i += NT) {
      float yc = 0.0f, cc = 0.0f;
      if (i < DIM) {
        const float y = X[i];
        const float u = tq_mul(y, inv);
        unsigned int idx = 0;
        for (int j = 0; j < (1 << BITS) - 1; ++j) idx += (u > @Xbd[j]) ? 1u : 0u;
        const float c = @Xcb[idx];
        i_s[i] = idx;
        yc = tq_mul(y, c);
        cc = tq_mul(c, c);
      }
      a_s[i] = yc;
      c_s[i] = cc;
    }
    for (int st = PW / 2; st > 0; st >>= 1) {
      $BARRIER;
      for (int i = tid; i < st; i += NT) {
        a_s[i] = tq_add(a_s[i], a_s[i + st]);
        c_s[i] = tq_add(c_s[i], c_s[i + st]);
      }
    }
    $BARRIER;
    if (tid == 0) @Xs[vec] = tq_out<$HALF>(tq_div(a_s[0], tq_max(c_s[0], 1e-30f)));
    for (int k = tid; k < W; k += NT) {
      unsigned int word = 0u;
      const int first = (32 * k) / BITS;
      const int last = min((32 * k + 31) / BITS, DIM - 1);
      for (int i = first; i <= last; ++i) {
        const int off = i * BITS - 32 * k;
        word |= (off >= 0) ? (i_s[i] << off) : (i_s[i] >> (-off));
      }
      @Xp[(long)vec * W + k] = word;
    }
"""


def _encode_source():
    sides = {}
    for name, x, dim, p, bits, mean, r in (("K", "k", "D", "P", "BK", "KMEAN", 0), ("V", "v", "DV", "PV", "BV", "VMEAN", 1)):
        body = _ENCODE_SIDE.replace("$FWHT", _FWHT)
        for a, b in (("@Xmean", x + "mean"), ("@Xsign", x + "sign"), ("@Xbs", x + "bs"), ("@Xbd", x + "bd"), ("@Xcb", x + "cb"),
                     ("@Xs", x + "s"), ("@Xp", x + "p"), ("@X", x), ("@DIM", dim), ("@P", p), ("@BITS", bits),
                     ("@MEAN", mean), ("@R", str(r))):
            body = body.replace(a, b)
        sides[name] = body
    return ENCODE.replace("@SIDE_K", sides["K"]).replace("@SIDE_V", sides["V"])


ENCODE = _encode_source()

DECODE = DECODE.replace("$FWHT", _FWHT)
COMBINE = COMBINE.replace("$FWHT", _FWHT)

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
