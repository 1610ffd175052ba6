"""TurboQuantKVCache inside real mlx-lm models (tiny, random weights, built here)."""

import mlx.core as mx
import pytest
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models import gemma3_text, llama, qwen3

from turbocluster.kernels import turboquant as tq
from turbocluster.kernels import native
from turbocluster.runtime.cache import attention
from turbocluster.runtime.cache.turbo_cache import TurboQuantKVCache, make_cache, make_turbo_cache

VOCAB = 128


def _llama(**kw):
    args = dict(model_type="llama", hidden_size=128, num_hidden_layers=3, intermediate_size=256, num_attention_heads=6,
                num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB, head_dim=64, tie_word_embeddings=True)
    args.update(kw)
    return llama.Model(llama.ModelArgs(**args))


def _qwen3():
    return qwen3.Model(qwen3.ModelArgs(model_type="qwen3", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                                       num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6, vocab_size=VOCAB,
                                       max_position_embeddings=4096, head_dim=128, tie_word_embeddings=True, rope_theta=10000.0))


def _gemma3():
    return gemma3_text.Model(gemma3_text.ModelArgs(model_type="gemma3_text", hidden_size=128, num_hidden_layers=4,
                                                   intermediate_size=256, num_attention_heads=6, num_key_value_heads=1,
                                                   head_dim=256, vocab_size=VOCAB, query_pre_attn_scalar=256,
                                                   sliding_window=48, sliding_window_pattern=2))


MODELS = {"llama": _llama, "qwen3": _qwen3, "gemma3_text": _gemma3}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    mx.random.seed(7)
    m = MODELS[request.param]()
    mx.eval(m.parameters())
    return m


def _tokens(n, seed=3):
    return mx.random.randint(0, VOCAB, (1, n), key=mx.random.key(seed))


def _run(model, cache, tokens, prefill=96, chunk=32):
    """Prefill ``prefill`` tokens at once, then feed the rest ``chunk`` at a time; all logits."""
    outs = [model(tokens[:, :prefill], cache=cache)]
    for i in range(prefill, tokens.shape[1], chunk):
        outs.append(model(tokens[:, i : i + chunk], cache=cache))
    return mx.concatenate(outs, axis=1)


def _greedy_pair(model, ref_cache, cache, prompt, n):
    """Greedy decode with ``cache``, feeding the same tokens to ``ref_cache``; both argmaxes per step."""
    a, b = model(prompt, cache=ref_cache), model(prompt, cache=cache)
    ref, out = [], []
    for _ in range(n):
        ref.append(a[:, -1].argmax(-1).item())
        tok = b[:, -1].argmax(-1)
        out.append(tok.item())
        a, b = model(tok[:, None], cache=ref_cache), model(tok[:, None], cache=cache)
    return ref, out


def _kl(ref, out):
    p = mx.softmax(ref.astype(mx.float32), axis=-1)
    return (p * (mx.log(p + 1e-30) - mx.log(mx.softmax(out, axis=-1) + 1e-30))).sum(-1).mean().item()


# --- inside models --------------------------------------------------------------------


def test_logits_close_to_float_cache_at_8_bits_and_sane_at_3_and_4(model):
    tokens = _tokens(160)
    ref = _run(model, mlx_cache.make_prompt_cache(model), tokens)
    # The random gemma3 (one kv head of 256 dims, flat outputs) is the most
    # sensitive: at 4 bits its KL is ~0.04 and top-1 ~0.66 (llama 0.004 / 0.91).
    kls = []
    for bits, max_kl, min_top1 in ((8, 1e-3, 0.97), (4, 0.08, 0.6), (3, 0.25, 0.4)):
        cache = make_turbo_cache(model, k_bits=bits, v_bits=bits)
        out = _run(model, cache, tokens)
        assert any(isinstance(c, TurboQuantKVCache) and c.compressed for c in cache)
        top1 = (out.argmax(-1) == ref.argmax(-1)).mean().item()
        kls.append(_kl(ref, out))
        assert kls[-1] < max_kl, bits
        assert top1 >= min_top1, (bits, top1)
    assert kls[0] < kls[1] < kls[2]


def test_greedy_tokens_mostly_equal_at_8_bits(model):
    prompt = _tokens(40, seed=5)
    ref, out = _greedy_pair(model, mlx_cache.make_prompt_cache(model), make_turbo_cache(model, 8, 8), prompt, 24)
    assert sum(a == b for a, b in zip(ref, out)) >= 22, (ref, out)


def test_gemma3_keeps_sliding_window_caches():
    m = _gemma3()
    caches = make_turbo_cache(m, k_bits=4, v_bits=4)
    assert [type(c).__name__ for c in caches] == ["RotatingKVCache", "TurboQuantKVCache"] * 2


def test_fp16_layers_stay_float_and_count_against_the_full_model():
    m = _llama(num_hidden_layers=6)
    names = [type(c).__name__ for c in make_turbo_cache(m, fp16_layers=1)]
    assert names == ["KVCache"] + ["TurboQuantKVCache"] * 4 + ["KVCache"]
    m.layer_range, m.num_layers_total = (6, 8), 8  # pretend this holds layers 6..7 of 8
    m.model.layers = m.model.layers[:2]
    names = [type(c).__name__ for c in make_turbo_cache(m, fp16_layers=1)]
    assert names == ["TurboQuantKVCache", "KVCache"]
    names = [type(c).__name__ for c in make_turbo_cache(m, fp16_layers=2)]
    assert names == ["KVCache", "KVCache"]
    caches = make_turbo_cache(m, fp16_layers=2, layers=(2, 4), layer_bits={3: (8, 2)})
    assert [(c.k_bits, c.v_bits) for c in caches] == [(4, 4), (8, 2)]


def test_make_cache_without_bits_is_plain_kv():
    m = _llama()
    assert all(type(c) is mlx_cache.KVCache for c in make_cache(m))
    caches = make_cache(m, kv_bits=4, v_bits=3)
    assert (caches[0].k_bits, caches[0].v_bits) == (4, 3)


def test_uncompressed_before_quantized_start_exactly_equal_then_compresses():
    mx.random.seed(1)
    m = _llama()
    mx.eval(m.parameters())
    tokens = _tokens(80)
    ref_cache, cache = mlx_cache.make_prompt_cache(m), make_turbo_cache(m, 3, 3, quantized_start=64)
    ref = _run(m, ref_cache, tokens[:, :64], prefill=40, chunk=8)
    out = _run(m, cache, tokens[:, :64], prefill=40, chunk=8)
    assert mx.array_equal(ref, out)
    assert not cache[0].compressed and cache[0].offset == 64
    out = m(tokens[:, 64:65], cache=cache)
    assert cache[0].compressed and cache[0].offset == 65
    assert not mx.array_equal(out, m(tokens[:, 64:65], cache=ref_cache))


def test_trim_then_continue_matches_fresh_run():
    mx.random.seed(2)
    m = _llama()
    mx.eval(m.parameters())
    tokens = _tokens(120)
    cache = make_turbo_cache(m, 4, 4)
    m(tokens[:, :100], cache=cache)
    assert mlx_cache.trim_prompt_cache(cache, 20) == 20
    assert cache[0].offset == 80
    a = m(tokens[:, 80:120], cache=cache)
    fresh = make_turbo_cache(m, 4, 4)
    m(tokens[:, :80], cache=fresh)
    b = m(tokens[:, 80:120], cache=fresh)
    assert mx.allclose(a, b, atol=1e-4)


def test_save_and_load_prompt_cache_give_identical_continuation(tmp_path):
    mx.random.seed(4)
    m = _llama()
    mx.eval(m.parameters())
    tokens = _tokens(90)
    for options in ({}, {"key_mean": True, "quantized_start": 200}):
        cache = make_turbo_cache(m, 5, 3, fp16_layers=1, **options)
        m(tokens[:, :70], cache=cache)
        path = str(tmp_path / "cache.safetensors")
        mlx_cache.save_prompt_cache(path, cache)
        loaded = mlx_cache.load_prompt_cache(path)
        copied = [type(c).from_state(c.state) for c in cache]
        assert [type(c) for c in loaded] == [type(c) for c in cache]
        assert repr(loaded[1]) == repr(cache[1])
        a = m(tokens[:, 70:], cache=cache)
        assert mx.array_equal(a, m(tokens[:, 70:], cache=loaded))
        assert mx.array_equal(a, m(tokens[:, 70:], cache=copied))


def test_stream_generate_with_prompt_cache():
    from mlx_lm import stream_generate
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(VOCAB)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1"))
    mx.random.seed(6)
    m = _llama()
    mx.eval(m.parameters())
    cache = make_turbo_cache(m, k_bits=4, v_bits=3)
    prompt = " ".join(words[2:40])
    pieces = list(stream_generate(m, tokenizer, prompt, max_tokens=8, prompt_cache=cache))
    assert 1 <= len(pieces) <= 8
    assert cache[0].compressed and cache[0].offset >= 38


# --- the attention kernel ---------------------------------------------------------------


@pytest.mark.parametrize("dim,n_q,n_kv", [(64, 3, 3), (128, 6, 2), (256, 6, 1), (64, 12, 2)])
@pytest.mark.parametrize("mask", [None, "causal", "bool", "additive"])
@pytest.mark.parametrize("native", [False, None])
def test_attention_equals_dense_reference_on_decoded_kv(dim, n_q, n_kv, mask, native, monkeypatch):
    monkeypatch.setattr(attention, "CHUNK_TOKENS", 256)  # several chunks: online softmax
    keys = [mx.random.normal((2, n_kv, 600, dim), key=mx.random.key(i)) for i in range(2)]
    L = 1 if mask is None else 7
    q = mx.random.normal((2, n_q, L, dim), key=mx.random.key(9))
    cache = TurboQuantKVCache(5, 3)
    k, v = cache.update_and_fetch(*keys)
    kd, vd = tq.decode(k.packed, k.scales, 5), tq.decode(v.packed, v.scales, 3)
    m = mask
    if mask in ("bool", "additive"):
        m = mx.random.uniform(shape=(2, 1, L, 600), key=mx.random.key(1)) > 0.3
        if mask == "additive":
            m = mx.where(m, 0.0, -1e9)
    out = attention.turbo_scaled_dot_product_attention(q, k, v, scale=dim**-0.5, mask=m, native=native)
    ref = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=dim**-0.5, mask=m)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert mx.allclose(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("native", [False, None])
def test_key_and_value_means_are_exact_in_attention(native):
    """Keys minus a fixed mean give the same softmax; the value mean is added back."""
    kv = [mx.random.normal((1, 2, 300, 64), key=mx.random.key(i)) + 3.0 for i in range(2)]
    q = mx.random.normal((1, 6, 1, 64), key=mx.random.key(5))
    cache = TurboQuantKVCache(6, 5, key_mean=True, value_mean=True)
    k, v = cache.update_and_fetch(*kv)
    assert v.mean is not None and cache.key_mean.shape == (1, 2, 1, 64)
    kd = tq.decode(k.packed, k.scales, 6) + cache.key_mean.astype(mx.float32)
    vd = tq.decode(v.packed, v.scales, 5) + v.mean.astype(mx.float32)
    out = attention.turbo_scaled_dot_product_attention(q, k, v, scale=0.125, native=native)
    ref = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=0.125, mask=None)
    assert mx.allclose(out, ref, atol=1e-4)
    plain = TurboQuantKVCache(6, 5)
    pk, pv = plain.update_and_fetch(*kv)
    err = lambda a, b: mx.abs(a - b).mean().item()
    assert err(kd, kv[0]) < err(tq.decode(pk.packed, pk.scales, 6), kv[0])  # the mean helps here


@pytest.mark.parametrize("k_bits,v_bits", [(2, 8), (3, 7), (5, 6), (4, 4)])
def test_native_kernel_matches_mlx_ops_for_every_bit_width(k_bits, v_bits):
    if native.library() is None:
        pytest.skip("no C compiler")
    kv = [mx.random.normal((1, 2, 300, 80), key=mx.random.key(i)) for i in range(2)]
    q = mx.random.normal((1, 6, 3, 80), key=mx.random.key(5))
    cache = TurboQuantKVCache(k_bits, v_bits, codebook="lloyd-max")
    cache.update_and_fetch(*kv)
    cache.trim(17)  # views into a larger buffer
    k, v = cache.fetch()
    for mask in (None, "causal"):
        a = attention.turbo_scaled_dot_product_attention(q, k, v, scale=0.1, mask=mask, native=True)
        b = attention.turbo_scaled_dot_product_attention(q, k, v, scale=0.1, mask=mask, native=False)
        assert mx.allclose(a, b, atol=2e-5), (k_bits, v_bits, mask)


def test_prefill_then_decode_through_the_hook():
    mx.random.seed(8)
    q = mx.random.normal((1, 6, 50, 64))
    kv = [mx.random.normal((1, 2, 50, 64)) for _ in range(2)]
    cache = TurboQuantKVCache(6, 4)
    k, v = cache.update_and_fetch(*kv)
    from mlx_lm.models import base

    out = base.scaled_dot_product_attention(q, k, v, cache=cache, scale=0.125, mask="causal")
    ref = mx.fast.scaled_dot_product_attention(q, tq.decode(k.packed, k.scales, 6), tq.decode(v.packed, v.scales, 4), scale=0.125, mask="causal")
    assert mx.allclose(out, ref, atol=2e-5)
    assert llama.scaled_dot_product_attention is attention.scaled_dot_product_attention
    k, v = cache.update_and_fetch(mx.ones((1, 2, 1, 64)), mx.ones((1, 2, 1, 64)))
    assert k.packed.shape[2] == 51 and cache.make_mask(1, return_array=False, window_size=None) is None


def test_hook_is_idempotent_and_reaches_models_imported_later():
    import importlib

    from mlx_lm.models import base

    attention.install()
    attention.install()
    assert base.scaled_dot_product_attention is attention.scaled_dot_product_attention
    assert attention._original_sdpa is not attention.scaled_dot_product_attention
    late = importlib.import_module("mlx_lm.models.starcoder2")
    assert late.scaled_dot_product_attention is attention.scaled_dot_product_attention


# --- memory ------------------------------------------------------------------------


@pytest.mark.parametrize("k_bits,v_bits,dim", [(4, 4, 64), (3, 3, 128), (6, 2, 64), (5, 3, 256)])
def test_nbytes_within_2_percent_of_theory(k_bits, v_bits, dim):
    B, H, T = 1, 3, 512
    cache = TurboQuantKVCache(k_bits, v_bits)
    for i in range(0, T, 128):
        cache.update_and_fetch(mx.random.normal((B, H, 128, dim)), mx.random.normal((B, H, 128, dim)))
    theory = B * H * T * (tq.vector_nbytes(dim, k_bits) + tq.vector_nbytes(dim, v_bits))
    assert abs(cache.nbytes - theory) <= 0.02 * theory
    assert cache.stored_nbytes == theory
    per_token = cache.nbytes / T / H
    fp16 = 2 * 2 * dim
    assert per_token < fp16 * (k_bits + v_bits + 1) / 32  # packed, not floats


# --- bad inputs --------------------------------------------------------------------------


def test_bad_bits_and_head_dims_raise_clear_errors():
    with pytest.raises(ValueError, match="k_bits must be one of"):
        TurboQuantKVCache(k_bits=9)
    with pytest.raises(ValueError, match="v_bits must be one of"):
        TurboQuantKVCache(v_bits=1)
    with pytest.raises(ValueError, match="quantized_start"):
        TurboQuantKVCache(quantized_start=-1)
    with pytest.raises(ValueError, match="codebook"):
        TurboQuantKVCache(codebook="nope")
    with pytest.raises(ValueError, match="multiple of 16"):
        TurboQuantKVCache().update_and_fetch(mx.zeros((1, 1, 4, 40)), mx.zeros((1, 1, 4, 40)))
    with pytest.raises(ValueError, match="fp16_layers"):
        make_turbo_cache(_llama(), fp16_layers=-1)


def test_state_by_name_and_unknown_versions_refused_with_a_code():
    from turbocluster.runtime.cache import turbo_cache as tc

    c = TurboQuantKVCache(4, 3)
    c.update_and_fetch(mx.random.normal((1, 2, 5, 64)), mx.random.normal((1, 2, 5, 64)))
    fields = c.state_fields()
    assert fields["offset"] == 5 and fields["k_packed"].shape[2] == 5
    assert dict(zip(tc.STATE_FIELDS, c.state)).keys() == fields.keys()
    back = TurboQuantKVCache.from_fields(fields)
    assert back.settings() == c.settings() and mx.array_equal(back.fetch()[0].packed, c.fetch()[0].packed)
    with pytest.raises(tc.CacheStateError) as e:
        TurboQuantKVCache.from_fields(fields, version=tc.STATE_VERSION + 1)
    assert e.value.code == "STATE_VERSION"
    with pytest.raises(tc.CacheStateError) as e:
        tc.named_state(c.state[:-1])
    assert e.value.code == "STATE_FIELDS"
