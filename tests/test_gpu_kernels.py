"""The fused GPU attention (kernels/fused.py) against the plain-mx reference.

The CUDA/Metal kernels run only where MLX has a GPU backend; elsewhere those
tests skip and say so. What is composed from mx ops (the log-sum-exp merge of
partial results, the prefill path with the reference dequantizer, the cached
self-check verdicts, the dispatch fallback) runs everywhere.
"""

import logging

import mlx.core as mx
import pytest

from turbocluster.kernels import fused, fused_check
from turbocluster.kernels import turboquant as tq
from turbocluster.runtime.cache import attention as att
from turbocluster.runtime.cache.attention import PackedKV

GPU = fused.backend()
needs_gpu = pytest.mark.skipif(GPU is None, reason="no CUDA or Metal GPU backend on this machine (MLX CPU build): the fused kernels cannot run")


def _packed(x, bits, mean=None, rotated=True):
    p, s = tq.encode(x, bits)
    return PackedKV(p, s, bits, x.shape[-1], None, rotated, mean)


def _case(seed, B, n_kv, n_rep, L, T, dk, dv, kb, vb, value_mean=False):
    mx.random.seed(seed)
    q = mx.random.normal((B, n_kv * n_rep, L, dk))
    k = mx.random.normal((B, n_kv, T, dk))
    v = mx.random.normal((B, n_kv, T, dv))
    mean = mx.random.normal((B, n_kv, 1, dv)) if value_mean else None
    return q, _packed(k, kb), _packed(v, vb, mean)


def _reference(q, keys, values, mask):
    """The plain-mx reference in exact float32: on the CPU (GPU float32 matmuls may use TF32)."""
    with mx.stream(mx.cpu):
        out = att.turbo_scaled_dot_product_attention(q, keys, values, scale=q.shape[-1] ** -0.5, mask=mask, native=False)
        mx.eval(out)
    return out


@pytest.fixture
def on_cpu():
    """Tests composed from mx ops run on the CPU everywhere (exact float32, no TF32)."""
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


def _close(got, want, tol):
    err = mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item()
    assert err <= tol * max(1.0, mx.abs(want).max().item()), err


# --- everywhere ----------------------------------------------------------------------


def test_lse_merge_of_splits_equals_one_softmax(on_cpu):
    mx.random.seed(0)
    s = mx.random.normal((3, 5, 1000)) * 4  # scores of 3 x 5 rows over 1000 keys
    v = mx.random.normal((1000, 16))
    want = mx.softmax(s, axis=-1) @ v
    accs, mls = [], []
    for t0 in range(0, 1000, 300):  # ragged splits, as the kernel makes them
        part = s[..., t0 : t0 + 300]
        m = part.max(axis=-1, keepdims=True)
        p = mx.exp(part - m)
        accs.append(p @ v[t0 : t0 + 300])
        mls.append(mx.concatenate([m, p.sum(axis=-1, keepdims=True)], axis=-1))
    got = fused.combine_splits(mx.stack(accs, axis=-2), mx.stack(mls, axis=-2))
    _close(got, want, 1e-5)


def test_lse_merge_ignores_a_fully_masked_split(on_cpu):
    acc = mx.array([[[1.0, 2.0], [0.0, 0.0]]])
    ml = mx.array([[[0.5, 2.0], [-3.0e38, 0.0]]])  # second split saw only masked keys
    assert mx.allclose(fused.combine_splits(acc, ml), mx.array([[0.5, 1.0]])).item()


@pytest.mark.parametrize(
    "bits,dk,n_rep,mask",
    [(4, 64, 1, None), (3, 64, 3, "causal"), (5, 128, 4, "causal"), (2, 64, 2, "bool"), (8, 128, 1, "additive"), (6, 80, 2, "causal")],
)
def test_prefill_path_composed_from_mx_ops_matches_the_reference(bits, dk, n_rep, mask, on_cpu):
    q, keys, values = _case(bits, 1, 2, n_rep, 24, 40, dk, dk, bits, 3, value_mean=bits == 5)
    if mask == "bool":
        mask = mx.random.uniform(shape=(24, 40)) > 0.3
    elif mask == "additive":
        mask = mx.random.normal((1, 1, 24, 40))
    got = fused.prefill_attention(q, keys, values, dk**-0.5, mask, dequant=fused.reference_dequantize)
    _close(got, _reference(q, keys, values, mask), 1e-4)


def test_selfcheck_verdicts_are_cached_on_disk(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TURBOCLUSTER_SELFCHECK_DIR", str(tmp_path))
    monkeypatch.setattr(fused_check, "_memory", {})
    calls = []

    def bad():
        calls.append(1)
        raise AssertionError("differs by 0.5")

    with caplog.at_level(logging.WARNING, logger="turbocluster.kernels.fused_check"):
        assert fused_check.verdict("cuda", "decode-x", "src v1", bad) is False
    assert "differs by 0.5" in caplog.text and calls == [1]
    monkeypatch.setattr(fused_check, "_memory", {})  # a new process: read from disk, not re-run
    assert fused_check.verdict("cuda", "decode-x", "src v1", bad) is False and calls == [1]
    assert fused_check.verdict("cuda", "decode-x", "src v2", lambda: None) is True  # edited source: checked again
    assert (tmp_path / "selfcheck.json").exists()


def test_kernel_sources_render_for_both_backends():
    from turbocluster.kernels import fused_source as src

    for kind, barrier in (("cuda", "__syncthreads()"), ("metal", "threadgroup_barrier(mem_flags::mem_threadgroup)")):
        for body in (src.DECODE, src.COMBINE, src.DEQUANT, src.ENCODE):
            text = src.render(body, kind)
            assert "$" not in text
        assert barrier in src.render(src.DECODE, kind) and barrier in src.render(src.COMBINE, kind)


@pytest.mark.parametrize("dim", [64, 80, 128, 256])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_encode_twin_agrees_with_the_codec(bits, dim, on_cpu):
    """The fused encode's mx twin (kernel order) gives the codec's codes up to float rounding at boundaries."""
    mx.random.seed(bits * 1000 + dim)
    x = (mx.random.normal((2, 3, 150, dim)) * 3).astype(mx.float16)
    mean = x[:, :, :1] * 0.5
    for m in (None, mean):
        want = tq.encode(x if m is None else x.astype(mx.float32) - m.astype(mx.float32), bits)
        got = fused.reference_encode(x, bits, m)
        idx_want, idx_got = tq.unpack(want[0], bits, dim), tq.unpack(got[0], bits, dim)
        assert (idx_want != idx_got).sum().item() <= 2  # of 90,000-230,000 coordinates
        assert mx.allclose(got[1].astype(mx.float32), want[1].astype(mx.float32), rtol=2e-3, atol=0)  # an ulp or two of float16.item()
    # a broken twin is caught: the codes of another width, or of unrotated vectors, differ
    assert not mx.array_equal(fused.reference_encode(x, bits)[0], tq.pack(tq.quantize(x.astype(mx.float32), bits), bits)).item()


@pytest.mark.skipif(GPU is not None, reason="checks the CPU fallback")
def test_dispatch_falls_back_to_the_reference_without_a_gpu():
    q, keys, values = _case(1, 1, 2, 2, 1, 50, 64, 64, 4, 4)
    assert att.gpu_attention(q, keys, values, 0.125, None) is None
    got = att.scaled_dot_product_attention(q, keys, values, cache=None, scale=0.125, mask=None)
    _close(got, att.turbo_scaled_dot_product_attention(q, keys, values, scale=0.125), 1e-5)


# --- GPU only ------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize(
    "kb,vb,dim", [(2, 2, 64), (3, 3, 128), (4, 4, 128), (5, 3, 128), (6, 6, 256), (7, 5, 64), (8, 8, 256), (4, 2, 64), (3, 3, 256)]
)
def test_fused_decode_matches_the_reference(kb, vb, dim):
    for n_rep in (1, 4, 8):
        q, keys, values = _case(kb * 10 + vb + n_rep, 1, 2, n_rep, 1, 1500, dim, dim, kb, vb)
        got = fused.decode_attention(q, keys, values, dim**-0.5, kind=GPU)
        _close(got, _reference(q, keys, values, None), 2e-4)


@needs_gpu
@pytest.mark.parametrize("n_rep,L", [(1, 3), (2, 4), (4, 2), (8, 4), (3, 5)])
def test_fused_decode_causal_rows_value_mean_and_batches(n_rep, L):
    q, keys, values = _case(n_rep * 7 + L, 2, 3, n_rep, L, 777, 128, 64, 5, 3, value_mean=True)
    got = fused.decode_attention(q, keys, values, 128**-0.5, causal=True, kind=GPU)
    _close(got, _reference(q, keys, values, "causal"), 2e-4)


@needs_gpu
@pytest.mark.parametrize("T", [1, 31, 257, 65536])
def test_fused_decode_context_lengths(T):
    q, keys, values = _case(T, 1, 8, 4, 1, T, 128, 128, 3, 3)
    _close(fused.decode_attention(q, keys, values, 128**-0.5, kind=GPU), _reference(q, keys, values, None), 2e-4)


@needs_gpu
@pytest.mark.parametrize("bits", tq.SUPPORTED_BITS)
@pytest.mark.parametrize("dim", [80, 128])
def test_fused_dequantize_is_bit_identical(bits, dim):
    kv = fused._random_packed(2, 3, 41, dim, bits, cap=64, keys=fused._keys(bits + dim))
    for dtype in (mx.float32, mx.float16) if bits != 4 else (mx.float32, mx.float16, mx.bfloat16):
        assert mx.array_equal(fused.dequantize(kv, dtype, GPU), fused.reference_dequantize(kv, dtype)).item()


@needs_gpu
@pytest.mark.parametrize("mask", [None, "causal", "bool"])
def test_fused_prefill_matches_the_reference(mask):
    q, keys, values = _case(3, 1, 8, 4, 300, 1200, 128, 128, 4, 3)
    if mask == "bool":
        mask = mx.random.uniform(shape=(300, 1200)) > 0.2
    got = fused.prefill_attention(q, keys, values, 128**-0.5, mask)
    _close(got, _reference(q, keys, values, mask), 5e-3)  # SDPA's float32 matmuls may round through TF32


@needs_gpu
def test_hook_sends_packed_kv_to_the_fused_path():
    q, keys, values = _case(5, 1, 2, 4, 1, 600, 128, 128, 4, 4)
    assert att.gpu_attention(q, keys, values, 128**-0.5, None) is not None
    got = att.scaled_dot_product_attention(q, keys, values, cache=None, scale=128**-0.5, mask=None)
    _close(got, _reference(q, keys, values, None), 2e-4)


@needs_gpu
@pytest.mark.parametrize(
    "kb,vb,dk,dv",  # every width 2-8 and head dims 64/80/128/256, one compiled variant each
    [(2, 2, 64, 64), (3, 3, 128, 128), (4, 4, 128, 128), (5, 3, 128, 128), (6, 7, 256, 256), (8, 8, 64, 64), (4, 2, 80, 128), (3, 5, 256, 256)],
)
def test_fused_encode_is_bit_identical(kb, vb, dk, dv):
    mx.random.seed(kb * 100 + vb * 10 + dk)
    for dtype in (mx.float16, mx.bfloat16, mx.float32):
        k = (mx.random.normal((2, 3, 70, dk)) * 2).astype(dtype)
        v = mx.random.normal((2, 3, 71, dv)).astype(dtype)[:, :, 1:]  # strided
        for means in ((None, None), (k[:, :, :1].astype(mx.float16), v[:, :, 2:3].astype(mx.float16))):
            got = fused.encode_kv(k, v, kb, vb, *means, kind=GPU)
            with mx.stream(mx.cpu):
                want = fused.reference_encode(k, kb, means[0]) + fused.reference_encode(v, vb, means[1])
                mx.eval(want)
            for a, b in zip(got, want):
                assert a.shape == b.shape and a.dtype == b.dtype
                assert mx.array_equal(a, b).item()


@needs_gpu
def test_cache_encodes_on_the_gpu_in_one_launch_and_attends_as_the_reference():
    from turbocluster.runtime.cache.turbo_cache import TurboQuantKVCache

    mx.random.seed(11)
    k = mx.random.normal((1, 8, 300, 128)).astype(mx.float16)
    v = mx.random.normal((1, 8, 300, 128)).astype(mx.float16)
    q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
    cache = TurboQuantKVCache(k_bits=5, v_bits=3, key_mean=True)
    assert cache._fused_encode(k[:, :, :1], v[:, :, :1]) is not None  # the fused path applies here
    cache = TurboQuantKVCache(k_bits=5, v_bits=3, key_mean=True)
    keys, values = cache.update_and_fetch(k[:, :, :299], v[:, :, :299])
    keys, values = cache.update_and_fetch(k[:, :, 299:], v[:, :, 299:])
    want_k = fused.reference_encode(k, 5, cache.key_mean)
    with mx.stream(mx.cpu):
        want_k = fused.reference_encode(k, 5, cache.key_mean)
        want_v = fused.reference_encode(v, 3)
        mx.eval(want_k, want_v)
    assert mx.array_equal(keys.packed, want_k[0]).item() and mx.array_equal(values.packed, want_v[0]).item()
    got = att.scaled_dot_product_attention(q, keys, values, cache=None, scale=128**-0.5, mask=None)
    _close(got, _reference(q.astype(mx.float32), keys, values, None), 2e-3)


@needs_gpu
def test_a_self_check_leaves_the_callers_random_stream_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOCLUSTER_SELFCHECK_DIR", str(tmp_path))
    monkeypatch.setattr(fused_check, "_memory", {})
    fused.encode_verdict.cache_clear()
    mx.random.seed(5)
    want = mx.random.normal((4,))
    mx.random.seed(5)
    assert fused.encode_verdict(GPU, 4, 3, 64, 64)  # runs the check: nothing stored in tmp_path yet
    assert mx.array_equal(mx.random.normal((4,)), want).item()
