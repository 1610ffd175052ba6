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
        for body in (src.DECODE, src.COMBINE, src.DEQUANT):
            text = src.render(body, kind)
            assert "$" not in text
        assert barrier in src.render(src.DECODE, kind) and barrier in src.render(src.COMBINE, kind)


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
    mx.random.seed(bits + dim)
    kv = fused._random_packed(2, 3, 41, dim, bits, cap=64)
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
