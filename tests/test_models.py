"""Any mlx-lm model through the one shard runner: a matrix of architectures, split 2 and 3 ways.

Each architecture is a tiny random-weight mlx-lm model built here
(``ModelArgs.from_dict``), saved as an mlx-lm directory with the bundled
tokenizer beside it, and loaded back both whole (``mlx_lm.utils.load_model``,
the reference) and as shards (``loader.load(path, layers=...)``, what a node
loads). The shards run chained in this process through ``shard.forward`` with
caches from ``cache.factory.make_caches``, stepping as ``generate_step`` does
(prefill all but the last prompt token, then one token a step, greedy).

Asserted: fp16 greedy tokens are identical to ``mlx_lm.generate_step`` on the
whole model with mlx-lm's own caches. TurboQuant 4-bit: identical to
``generate_step`` on the whole model with the same TurboQuant caches
(``make_caches`` on the whole model) — splitting must not change a single op,
so the tolerance is zero; the packed cache's own error against fp16 is the
codec's business (tests/test_turbo_cache.py), not the runner's. Two
architectures also run through real node processes on loopback.
"""

import math

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from conftest import bundled_tokenizer
from turbocluster.runtime.cache.config import CacheConfigError
from turbocluster.runtime.cache.factory import make_caches
from turbocluster.runtime.cache.turbo_cache import TurboQuantKVCache
from turbocluster.runtime.model import loader
from turbocluster.runtime.model import shard as stage

VOCAB = 49152  # the bundled tokenizer's
WINDOW = 8  # sliding windows shorter than the prompt, so rotating caches wrap
BASE = dict(
    hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, rms_norm_eps=1e-5, vocab_size=VOCAB, max_position_embeddings=512, rope_theta=10000.0,
    tie_word_embeddings=False,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)

ARCHS = {
    "llama": dict(BASE, model_type="llama", tie_word_embeddings=True),
    "llama_swa": dict(
        BASE, model_type="llama", sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
    ),
    "mistral": dict(BASE, model_type="mistral"),
    "qwen2": dict(BASE, model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(BASE, model_type="qwen3"),
    "qwen3_moe": dict(BASE, **MOE, model_type="qwen3_moe"),
    "gemma": dict(BASE, model_type="gemma"),
    "gemma2": dict(BASE, model_type="gemma2", query_pre_attn_scalar=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(
        BASE, model_type="gemma3_text", num_hidden_layers=6, sliding_window=WINDOW, sliding_window_pattern=3,
        query_pre_attn_scalar=16, rope_local_base_freq=10000.0,
    ),
    "phi3": dict(BASE, model_type="phi3"),
    "mixtral": dict(BASE, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        BASE, model_type="deepseek_v3", kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
        first_k_dense_replace=1, moe_layer_freq=1, n_group=1, topk_group=1, routed_scaling_factor=1.0,
    ),
    "olmo2": dict(BASE, model_type="olmo2"),
    "granite": dict(
        BASE, model_type="granite", logits_scaling=2.0, attention_multiplier=0.25, embedding_multiplier=2.0,
        residual_multiplier=0.5, attention_bias=False, mlp_bias=False,
    ),
    "cohere": dict(BASE, model_type="cohere", logit_scale=0.5, layer_norm_eps=1e-5),
    "cohere2": dict(BASE, model_type="cohere2", logit_scale=0.5, layer_norm_eps=1e-5, sliding_window=WINDOW, sliding_window_pattern=2),
    "starcoder2": dict(BASE, model_type="starcoder2", norm_epsilon=1e-5),
    "gpt_oss": dict(
        BASE, model_type="gpt_oss", num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    ),
    "olmoe": dict(BASE, model_type="olmoe", num_experts=4, num_experts_per_tok=2),
    "glm4": dict(BASE, model_type="glm4", attention_bias=False, partial_rotary_factor=0.5),
    "smollm3": dict(BASE, model_type="smollm3", no_rope_layer_interval=2),
    "internlm2": dict(BASE, model_type="internlm2"),
    "stablelm": dict(BASE, model_type="stablelm", use_qkv_bias=False, partial_rotary_factor=0.5, layer_norm_eps=1e-5),
    "minicpm": dict(BASE, model_type="minicpm", dim_model_base=32, scale_depth=1.4, scale_emb=4.0),
    "phimoe": dict(BASE, model_type="phimoe", num_local_experts=4, num_experts_per_tok=2),
    "lfm2": dict(
        BASE, model_type="lfm2", norm_eps=1e-5, conv_bias=False, conv_L_cache=3, block_dim=64, block_ff_dim=128,
        block_multiple_of=16, block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=False, full_attn_idxs=[1, 3],
    ),
    "mamba": dict(
        model_type="mamba", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, state_size=16, num_hidden_layers=4,
        conv_kernel=4, use_bias=False, use_conv_bias=True, time_step_rank=8, tie_word_embeddings=True,
    ),
    # hybrids and state-space models
    "qwen3_next": dict(
        BASE, **MOE, model_type="qwen3_next", full_attention_interval=2, linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, shared_expert_intermediate_size=32,
        partial_rotary_factor=0.5,
    ),
    "falcon_h1": dict(
        BASE, model_type="falcon_h1", mamba_d_head=16, mamba_n_heads=8, mamba_d_ssm=128, mamba_d_state=16,
        mamba_chunk_size=8, mamba_d_conv=4, mamba_n_groups=1,
    ),
    "mamba2": dict(
        model_type="mamba2", num_heads=8, head_dim=16, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
        state_size=16, num_hidden_layers=4, layer_norm_epsilon=1e-5, conv_kernel=4, n_groups=1, use_bias=False,
        use_conv_bias=True, tie_word_embeddings=True, time_step_limit=[0.0, math.inf], time_step_rank=8, chunk_size=8,
    ),
    "gemma3": dict(
        model_type="gemma3", vocab_size=VOCAB,
        text_config=dict(
            model_type="gemma3_text", hidden_size=64, num_hidden_layers=6, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, sliding_window=WINDOW, sliding_window_pattern=3,
            max_position_embeddings=512, query_pre_attn_scalar=16,
        ),
    ),
}

REFUSED = {
    "nemotron_h": dict(
        BASE, model_type="nemotron_h", hybrid_override_pattern="M*-M", attention_bias=False, mamba_num_heads=8,
        mamba_head_dim=16, mamba_proj_bias=False, ssm_state_size=16, conv_kernel=4, n_groups=1, mlp_bias=False,
        layer_norm_epsilon=1e-5, use_bias=False, use_conv_bias=True, chunk_size=8,
    ),
}

PROMPT = [5, 17, 300, 41, 9, 1000, 77, 12, 3, 8, 600, 2]  # longer than the windows
STEPS = 8
TURBO4 = {"k_bits": 4, "v_bits": 4}


def splits(n, k):
    """``k`` contiguous ranges over ``n`` layers, the first ones one layer larger."""
    base, extra = divmod(n, k)
    out, at = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        out.append((at, at + size))
        at += size
    return out


def build(kind, path):
    """Save a random-weight ``kind`` model (float32) with the bundled tokenizer as an mlx-lm directory."""
    from mlx_lm.utils import save_config, save_model

    from mlx_lm.utils import _get_classes

    cfg = ARCHS[kind]
    model_class, args_class = _get_classes(cfg)
    mx.random.seed(0)
    model = model_class(args_class.from_dict(cfg))
    # random weights with a little spread so greedy tokens are not all one token
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    save_model(path, model)
    save_config({**cfg, "torch_dtype": "float32"}, path / "config.json")
    _tokenizer()._tokenizer.save_pretrained(str(path))
    return path


_TOK = []


def _tokenizer():
    if not _TOK:
        _TOK.append(bundled_tokenizer())
    return _TOK[0]


def reference(model, cache):
    """Greedy tokens of mlx-lm's own generate_step on the whole model."""
    out = []
    for token, _ in generate_step(mx.array(PROMPT), model, max_tokens=STEPS, prompt_cache=cache):
        out.append(int(token))
    return out


def pipeline(parts, cache):
    """Greedy tokens of the shards chained in-process, stepping as generate_step does."""
    caches = [make_caches(p, cache) for p in parts]

    def run(x):
        for p, c in zip(parts, caches):
            x = stage.forward(p, x, c)
        return x

    run(mx.array([PROMPT[:-1]]))
    token, out = PROMPT[-1], []
    for _ in range(STEPS):
        logits = run(mx.array([[token]]))[:, -1, :]
        token = int(mx.argmax(logits, axis=-1).item())
        out.append(token)
    return out, caches


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = build(kind, tmp_path_factory.mktemp(kind))
        return made[kind]

    return get


@pytest.mark.parametrize("kind", list(ARCHS))
def test_shards_generate_what_mlx_lm_generates(kind, model_dir):
    from mlx_lm.utils import load_model

    path = model_dir(kind)
    whole, _ = load_model(path)
    whole.set_dtype(mx.float32)
    stage.check_splittable(whole)
    n = stage.layer_range(whole)[2]
    ref = reference(whole, make_prompt_cache(whole))
    packed = stage.packed_cache_refusal(whole) is None
    ref_turbo = reference(whole, make_caches(whole, TURBO4)) if packed else None
    for k in (2, 3):
        parts = [loader.load(str(path), layers=r)[0] for r in splits(n, k)]
        ours, _ = pipeline(parts, None)
        assert ours == ref, f"{kind} fp16 over {splits(n, k)}: {ours} != mlx-lm {ref}"
        if not packed:  # refused with the reason, never silently wrong
            with pytest.raises(CacheConfigError, match=ARCHS[kind]["model_type"]):
                make_caches(parts[-1], TURBO4)
            continue
        ours, caches = pipeline(parts, TURBO4)
        assert ours == ref_turbo, f"{kind} turbo4 over {splits(n, k)}: {ours} != mlx-lm with the same caches {ref_turbo}"
        flat = [x for cs in caches for c in cs for x in getattr(c, "caches", [c])]  # CacheList: hybrid layers
        turbo = [c for c in flat if isinstance(c, TurboQuantKVCache)]
        if kind in NO_TURBO_LAYERS:
            assert not turbo
        else:
            assert turbo, f"{kind}: no layer got a TurboQuant cache"


# Architectures none of whose layers gets a TurboQuant cache, and why.
NO_TURBO_LAYERS = {
    "mamba": "every layer is an SSM layer (its state is not KV)",
    "mamba2": "every layer is an SSM layer (its state is not KV)",
    "gpt_oss": "its attention uses sinks, which the packed attention does not read: its KV layers stay fp16",
}


def test_matrix_covers_the_architectures_the_issue_names():
    named = {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3",
             "mixtral", "deepseek_v3", "olmo2", "granite", "cohere", "starcoder2", "gpt_oss", "qwen3_next"}
    assert named <= set(ARCHS) and len(ARCHS) >= 20


@pytest.mark.parametrize("kind", list(REFUSED))
def test_unsplittable_architecture_is_refused_naming_it(kind, tmp_path):
    cfg = REFUSED[kind]
    with pytest.raises(stage.UnsplittableModel, match=kind) as e:
        stage.check_splittable(cfg)
    assert e.value.code == stage.REFUSED_CODE and e.value.model_type == kind
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(cfg)
    with pytest.raises(stage.UnsplittableModel, match=kind):
        stage.check_splittable(model_class(args_class.from_dict(cfg)))


def test_unknown_architecture_is_refused():
    with pytest.raises(stage.UnsplittableModel, match="no_such_arch"):
        stage.check_splittable({"model_type": "no_such_arch", "num_layers": 4})


# --------------------------------------------------------------------------- real nodes


@pytest.mark.parametrize("kind", ["gemma3", "qwen3_next"])
def test_through_real_nodes_greedy_identical_to_mlx_lm(local_nodes, model_dir, kind):
    from mlx_lm.utils import load_model

    from turbocluster.runtime.cluster.cluster import Cluster

    path = str(model_dir(kind))
    whole, _ = load_model(model_dir(kind))
    whole.set_dtype(mx.float32)
    for cache, ref in ((None, reference(whole, make_prompt_cache(whole))), (TURBO4, reference(whole, make_caches(whole, TURBO4)))):
        for k in (2, 3):
            with Cluster.connect(path, nodes=[n.address for n in local_nodes[:k]]) as cluster:
                cluster.load(cluster.plan(context=64, cache=cache))
                ours = list(cluster.generate_tokens(PROMPT, max_tokens=STEPS, cache=cache, stop_at_eos=False))
            assert ours == ref, f"{kind} {cache or 'fp16'} over {k} nodes"


def test_plan_refuses_an_unsplittable_architecture_before_any_node_loads(local_nodes, tmp_path):
    from mlx_lm.utils import _get_classes, save_config, save_model

    from turbocluster.runtime.cluster.cluster import Cluster
    from turbocluster.runtime.transport.errors import ClusterError

    cfg = REFUSED["nemotron_h"]
    model_class, args_class = _get_classes(cfg)
    model = model_class(args_class.from_dict(cfg))
    mx.eval(model.parameters())
    save_model(tmp_path, model)
    save_config({**cfg, "num_hidden_layers": 4}, tmp_path / "config.json")
    _tokenizer()._tokenizer.save_pretrained(str(tmp_path))
    with Cluster.connect(str(tmp_path), nodes=[local_nodes[0].address]) as cluster:
        before = cluster.clients[0].info()
        with pytest.raises(ClusterError, match="nemotron_h") as e:
            cluster.plan(context=64)
        assert e.value.code.name == "UNIMPLEMENTED" and e.value.impossible
        after = cluster.clients[0].info()
    assert (after.model_identity, after.load_state) == (before.model_identity, before.load_state)
