"""GPU fast paths for the TurboQuant format (Metal and CUDA), matching the reference bit for bit.

Two kernels cover the integer side of the format, where float rounding cannot
creep in: ``quantize_pack`` (normalised rotated coordinates -> packed words)
and ``dequantize`` (packed words + scales -> ``scale * centroid[idx]``).
The rotation itself stays ``mx.hadamard_transform``, which every backend
already implements natively, so the reference and the fast path feed the
kernels identical inputs.

Bit width and head dim are runtime arguments, so each backend compiles two
kernels in all. On first use on a machine they are checked against the
plain-``mx`` reference over every width (a second or two); the verdict is
cached on disk (``fused_check``), so later processes skip the check. If they
do not compile or do not match bit for bit, the fast path is switched off with
a warning and the reference is used. ``TURBO_FAST_KERNELS=0`` switches it off
outright.
"""

import functools
import logging
import os
import warnings

import mlx.core as mx

from . import format as fmt
from . import fused_check

logger = logging.getLogger(__name__)

_PACK_BODY = """
    unsigned int elem = {thread_id};
    if (elem >= count[0]) return;
    const int BITS = count[1];
    const int D = count[2];
    const int W = count[3];
    unsigned int row = elem / W;
    int k = elem % W;
    unsigned int word = 0;
    int first = (32 * k) / BITS;
    int last = min((32 * k + 31) / BITS, D - 1);
    for (int i = first; i <= last; ++i) {{
        float u = coords[row * D + i];
        unsigned int idx = 0;
        for (int j = 0; j < (1 << BITS) - 1; ++j) {{
            idx += (u > bounds[j]) ? 1u : 0u;
        }}
        int off = i * BITS - 32 * k;
        word |= (off >= 0) ? (idx << off) : (idx >> (-off));
    }}
    packed[elem] = word;
"""

_DEQUANT_BODY = """
    unsigned int elem = {thread_id};
    if (elem >= count[0]) return;
    const int BITS = count[1];
    const int D = count[2];
    const int W = count[3];
    unsigned int row = elem / D;
    int i = elem % D;
    int bit = i * BITS;
    int k = bit / 32;
    int off = bit % 32;
    unsigned int v = words[row * W + k] >> off;
    if (off + BITS > 32) {{
        v |= words[row * W + k + 1] << (32 - off);
    }}
    v &= (1u << BITS) - 1u;
    out[elem] = codebook[v] * scales[row];
"""

_THREAD_ID = {
    "metal": "thread_position_in_grid.x",
    "cuda": "cooperative_groups::this_grid().thread_rank()",
}

_state = {}  # backend -> kernels dict, or None when unavailable or failed the self-check


def backend():
    """'metal', 'cuda' or None: which fast path applies to the default device."""
    if os.environ.get("TURBO_FAST_KERNELS", "1") == "0":
        return None
    if mx.default_device() != mx.gpu:
        return None
    return _gpu_kind()


@functools.lru_cache(maxsize=None)
def _gpu_kind():
    """Which GPU backend this MLX build has (asked once: it runs on every layer of every step)."""
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return None


def _build(kind):
    make = mx.fast.metal_kernel if kind == "metal" else mx.fast.cuda_kernel
    tid = _THREAD_ID[kind]
    return {
        "pack": make(
            name="turbo_quantize_pack",
            input_names=["coords", "bounds", "count"],
            output_names=["packed"],
            source=_PACK_BODY.format(thread_id=tid),
        ),
        "dequant": make(
            name="turbo_dequantize",
            input_names=["words", "scales", "codebook", "count"],
            output_names=["out"],
            source=_DEQUANT_BODY.format(thread_id=tid),
        ),
    }


@functools.lru_cache(maxsize=256)
def _params(total, bits, dim, words):
    return mx.array([total, bits, dim, words], dtype=mx.uint32)


@functools.lru_cache(maxsize=None)
def _table(kind, bits):
    """The boundaries or centroids of a width as a device array, made once (not per call)."""
    return mx.array(fmt.boundaries(bits) if kind == "bounds" else fmt.centroids(bits), dtype=mx.float32)


def _launch(kernel, inputs, total, shape, dtype, bits, dim, words):
    return kernel(
        inputs=inputs + [_params(total, bits, dim, words)],
        grid=(max(total, 1), 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[shape],
        output_dtypes=[dtype],
    )[0]


def _quantize_pack(kernels, coords, bits, words, bounds):
    n, dim = coords.shape
    return _launch(kernels["pack"], [coords.astype(mx.float32), bounds], n * words, (n, words), mx.uint32, bits, dim, words)


def _dequantize(kernels, packed, scales, bits, dim, codebook):
    n, words = packed.shape
    return _launch(
        kernels["dequant"], [packed, scales.astype(mx.float32), codebook], n * dim, (n, dim), mx.float32, bits, dim, words
    )


def kernels_for_device(reference=None):
    """The verified kernels for the default device, or None to use the reference.

    ``reference(u, bits, dim, scales) -> (packed, values)`` is the plain-``mx``
    codec the kernels are checked against on first use (``turboquant`` passes
    its own; the fast path never imports the reference). Without one, only an
    earlier check's verdict is returned.
    """
    kind = backend()
    if kind is None:
        return None
    if kind not in _state:
        if reference is None:
            return None
        _state[kind] = _self_check(kind, reference)
    return _state[kind]


def _source(kind):
    tid = _THREAD_ID[kind]
    return _PACK_BODY.format(thread_id=tid) + _DEQUANT_BODY.format(thread_id=tid)


def _self_check(kind, reference):
    def check():
        kernels = _build(kind)
        keys = iter(mx.random.split(mx.random.key(1234), 64))  # its own stream: the caller's generator is left alone
        for bits in fmt.SUPPORTED_BITS:
            for dim in (48, 64, 80):
                u = mx.random.normal((37, dim), key=next(keys)) * 1.3
                bounds = mx.array(fmt.boundaries(bits), dtype=mx.float32)
                codebook = mx.array(fmt.centroids(bits), dtype=mx.float32)
                fast_packed = _quantize_pack(kernels, u, bits, fmt.packed_words(dim, bits), bounds)
                scales = mx.random.uniform(0.1, 2.0, (37, 1), key=next(keys)).astype(mx.float16)
                ref_packed, ref = reference(u, bits, dim, scales)
                fast = _dequantize(kernels, ref_packed, scales, bits, dim, codebook)
                if not (mx.array_equal(ref_packed, fast_packed).item() and mx.array_equal(ref, fast).item()):
                    raise AssertionError(f"{kind} kernels differ from the reference at {bits} bits, dim {dim}")

    if fused_check.verdict(kind, "encode-pack-dequant", _source(kind), check):
        return _build(kind)
    warnings.warn(f"TurboQuant {kind} fast path disabled, using the reference (see the log)")
    return None


def quantize_pack(coords, bits, words):
    """Packed words for [N, D] normalised rotated coordinates, on the fast path."""
    return _quantize_pack(kernels_for_device(), coords, bits, words, _table("bounds", bits))


def dequantize(packed, scales, bits, dim):
    """``scale * centroid[idx]`` (float32 [N, D]) from [N, W] words, on the fast path."""
    return _dequantize(kernels_for_device(), packed, scales, bits, dim, _table("centroids", bits))
