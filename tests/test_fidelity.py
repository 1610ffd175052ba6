"""Sinks, recent window, per-layer widths and presets of TurboQuantKVCache (issue 13)."""

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import llama

from turbocluster.kernels import turboquant as tq
from turbocluster.runtime.cache import attention, presets
from turbocluster.runtime.cache import turbo_cache as tc
from turbocluster.runtime.cache.config import CacheConfig, CacheConfigError
from turbocluster.runtime.cache.factory import make_caches
from turbocluster.runtime.cache.recent import SplitKV
from turbocluster.runtime.cache.turbo_cache import TurboQuantKVCache, make_turbo_cache
from turbocluster.runtime.sessions import transfer
from turbocluster.runtime.sessions.container import pack_session, unpack_session

LAYERS = 3
MODEL_ID = "test/tiny-llama@random-fid"


@pytest.fixture(scope="module")
def model():
    mx.random.seed(0)
    m = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=LAYERS, intermediate_size=256,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5, vocab_size=128))
    mx.eval(m.parameters())
    return m


def _kv(t, seed=1, heads=2, dim=64):
    k = mx.random.normal((1, heads, t, dim), key=mx.random.key(seed))
    return k, mx.random.normal((1, heads, t, dim), key=mx.random.key(seed + 1))


def _feed(cache, k, v, pieces=(17, 1, 1, 9, 1)):
    at = 0
    for n in pieces:
        out = cache.update_and_fetch(k[..., at : at + n, :], v[..., at : at + n, :])
        at += n
    return out, at


def test_sink_and_window_positions_read_back_bit_identical_float16():
    k, v = _kv(40)
    c = TurboQuantKVCache(4, 3, sinks=3, window=5, key_mean=True)
    (kk, vv), t = _feed(c, k, v)
    f16 = lambda a: a.astype(mx.float16)
    assert isinstance(kk, SplitKV) and (kk.n_sinks, kk.n_window, kk.total) == (3, 5, t)
    assert mx.array_equal(kk.floats, mx.concatenate([f16(k[..., :3, :]), f16(k[..., t - 5 : t, :])], axis=2)).item()
    assert mx.array_equal(vv.floats, mx.concatenate([f16(v[..., :3, :]), f16(v[..., t - 5 : t, :])], axis=2)).item()
    assert kk.floats.dtype == mx.float16 and kk.packed.packed.shape[2] == t - 8


def test_window_cache_compressed_part_equals_plain_cache():
    k, v = _kv(40)
    plain, windowed = TurboQuantKVCache(4, 3, key_mean=True), TurboQuantKVCache(4, 3, key_mean=True, sinks=2, window=6)
    _feed(plain, k, v)
    _feed(windowed, k, v)
    a, b = plain.state_fields(), windowed.state_fields()
    for name in tc.PACKED_FIELDS + ("key_mean",):
        assert mx.array_equal(a[name], b[name]).item(), name


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("queries", [1, 7])
def test_split_attention_equals_attention_over_the_same_stored_vectors(native, queries, monkeypatch):
    if not native:
        monkeypatch.setattr(attention.native_cpu, "applies", lambda rows: False)
    k, v = _kv(40)
    t = 40
    c = TurboQuantKVCache(4, 3, sinks=3, window=5, key_mean=True)
    c.update_and_fetch(k[..., : t - queries, :], v[..., : t - queries, :])
    kk, vv = c.update_and_fetch(k[..., t - queries :, :], v[..., t - queries :, :])
    q = mx.random.normal((1, 4, queries, 64), key=mx.random.key(9))
    mask = "causal" if queries > 1 else None
    out = attention.scaled_dot_product_attention(q, kk, vv, cache=c, scale=0.125, mask=mask)
    f32 = lambda a: a.astype(mx.float16).astype(mx.float32)
    kd = tq.decode(c.k_packed[..., :t, :], c.k_scales[..., :t, :], 4) + c.key_mean.astype(mx.float32)
    vd = tq.decode(c.v_packed[..., :t, :], c.v_scales[..., :t, :], 3)
    kd = mx.concatenate([f32(k[..., :3, :]), kd[..., 3 : t - 5, :], f32(k[..., t - 5 :, :])], axis=2)
    vd = mx.concatenate([f32(v[..., :3, :]), vd[..., 3 : t - 5, :], f32(v[..., t - 5 :, :])], axis=2)
    ref = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=0.125, mask=mask)
    assert mx.abs(out - ref).max().item() < 1e-4


def test_trim_then_refeed_equals_never_trimmed():
    k, v = _kv(40)
    a, b = TurboQuantKVCache(4, 3, sinks=3, window=5), TurboQuantKVCache(4, 3, sinks=3, window=5)
    _feed(a, k, v, (29,))
    _feed(b, k, v, (33,))
    b.trim(4)
    fa, fb = a.state_fields(), b.state_fields()
    assert fa["offset"] == fb["offset"] == 29
    # b's window lost its 4 newest positions: it now holds the one before them only
    assert mx.array_equal(fb["window_keys"], fa["window_keys"][..., -1:, :]).item()
    assert mx.array_equal(fa["sink_keys"], fb["sink_keys"]).item()
    b.trim(28)  # below the sinks
    assert b.state_fields()["sink_keys"].shape[2] == 1 and b.state_fields()["window_keys"].shape[2] == 0


def test_state_round_trip_and_version_1_state():
    k, v = _kv(30)
    c = TurboQuantKVCache(5, 3, sinks=2, window=4, key_mean=True)
    _feed(c, k, v, (30,))
    d = TurboQuantKVCache.from_state(c.state)
    assert d.meta_state == c.meta_state and d.settings()["window"] == "4"
    for name, x in c.state_fields().items():
        y = d.state_fields()[name]
        assert (x == y) if not isinstance(x, mx.array) else mx.array_equal(x, y).item(), name
    old = TurboQuantKVCache(4, 4)
    _feed(old, k, v, (30,))
    v1 = old.state[: len(tc.STATE_FIELDS_V1)]
    v1 = v1[:-1] + (old.meta_state[: len(tc.SETTINGS_V1)],)
    restored = TurboQuantKVCache.from_fields(tc.named_state(v1, version=1), version=1)
    assert (restored.sinks, restored.window, restored.offset) == (0, 0, 30)


def _meta(n):
    return {"model": MODEL_ID, "layers": (0, LAYERS), "num_tokens": n, "token_ids": list(range(n)), "cache_config": {"kv": "test"}}


def _greedy(model, prompt, caches, n):
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=n, prompt_cache=caches)]


@pytest.mark.parametrize("how", ["container", "delta"])
def test_greedy_tokens_identical_when_restored_mid_way(model, how):
    prompt, n, k = list(range(3, 40)), 24, 10
    make = lambda: make_turbo_cache(model, k_bits=4, v_bits=3, key_mean=True, sinks=2, window=8, layer_bits={1: (5, 4)})
    want = _greedy(model, prompt, make(), n)
    caches = make()
    first = _greedy(model, prompt, caches, k)
    for c in caches:  # generate_step fed the k-th token already: hand it back so it is fed again
        c.trim(1)
    if how == "container":
        restored, _ = unpack_session(pack_session(caches, _meta(caches[0].offset)))
    else:  # a pre-copied move: the first 20 positions as a whole container, then the tail as a delta
        head = [TurboQuantKVCache.from_state(c.state) for c in caches]
        for h in head:
            h.trim(h.offset - 20)
        restored, _ = unpack_session(pack_session(head, _meta(20)))
        tail, _ = unpack_session(pack_session(transfer.delta(caches, 20), _meta(caches[0].offset - 20)))
        transfer.append(restored, tail)
    assert [c.meta_state for c in restored] == [c.meta_state for c in caches]
    rest = _greedy(model, [first[-1]], restored, n - k)  # fed y[k-1] again, it yields y[k] on
    assert first + rest == want


def test_config_carries_sinks_window_and_layer_bits(model):
    cfg = CacheConfig.from_dict({"k_bits": 4, "v_bits": 3, "sinks": 4, "window": 64, "layer_bits": [[1, 5, 4]]})
    assert cfg.layer_bits == ((1, 5, 4),) and CacheConfig.from_dict(cfg.to_dict()) == cfg
    from turbocluster.proto import turbo_pb2 as pb

    assert CacheConfig.from_proto(cfg.to_proto(pb)) == cfg
    caches = make_caches(model, cfg)
    assert [(c.k_bits, c.v_bits, c.sinks, c.window) for c in caches] == [(4, 3, 4, 64), (5, 4, 4, 64), (4, 3, 4, 64)]
    with pytest.raises(CacheConfigError):
        CacheConfig.from_dict({"sinks": 4})  # needs a TurboQuant cache


def test_presets_resolve_and_unknown_names_are_refused(model):
    for name in ("best", "small"):
        cfg = presets.resolve(name)
        caches = make_turbo_cache(model, preset=name)
        assert [(c.k_bits, c.v_bits) for c in caches] == [cfg.bits_of(i) for i in range(LAYERS)]
        assert all(c.sinks == cfg.sinks and c.window == cfg.window and c.key_mean_enabled for c in caches)
    with pytest.raises(presets.PresetError) as e:
        make_turbo_cache(model, preset="bestest")
    assert e.value.code == "UNKNOWN_PRESET" and "best" in str(e.value)


def test_cli_kv_preset():
    from turbocluster.runtime.cli import cluster
    from turbocluster.runtime.cli.output import UsageError

    args = cluster.parser().parse_args(["generate", "--kv-preset", "small"])
    assert CacheConfig.from_dict(cluster.cache_of(args)) == presets.resolve("small")
    with pytest.raises(UsageError, match="unknown cache preset 'tiny'"):
        cluster.cache_of(cluster.parser().parse_args(["generate", "--kv-preset", "tiny"]))
    with pytest.raises(UsageError):
        cluster.cache_of(cluster.parser().parse_args(["generate", "--kv-preset", "best", "--kv-bits", "4"]))
