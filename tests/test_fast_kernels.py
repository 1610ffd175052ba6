"""GPU fast paths (Metal, CUDA) match the plain-mx reference bit for bit.

Runs only where a GPU backend exists; CI's CPU machine skips it.
"""

import mlx.core as mx
import pytest

from turbocluster.kernels import fast
from turbocluster.kernels import turboquant as tq

pytestmark = pytest.mark.skipif(fast.backend() is None, reason="no Metal or CUDA device on this machine")


def _reference(monkeypatch):
    monkeypatch.setitem(fast._state, fast.backend(), None)


def test_fast_path_passes_its_self_check():
    assert tq.fast_kernels() is not None


@pytest.mark.parametrize("bits", tq.SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 17, 128), (1, 8, 33, 256), (4, 80), (3, 96)])
def test_fast_encode_and_decode_match_the_reference_bit_for_bit(bits, shape, monkeypatch):
    mx.random.seed(bits * 1000 + shape[-1])
    x = mx.random.normal(shape) * mx.random.uniform(0.01, 30.0, shape[:-1] + (1,))
    fast_packed, fast_scales = tq.encode(x, bits)
    fast_rot = tq.dequantize_rotated(fast_packed, fast_scales, bits)
    with monkeypatch.context() as m:
        _reference(m)
        ref_packed, ref_scales = tq.encode(x, bits)
        ref_rot = tq.dequantize_rotated(ref_packed, ref_scales, bits)
    assert mx.array_equal(fast_packed, ref_packed)
    assert mx.array_equal(fast_scales, ref_scales)
    assert mx.array_equal(fast_rot, ref_rot)
