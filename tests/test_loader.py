"""The bundled GGUF and mlx-lm directories load whole or as layer ranges, with the real SmolLM2 weights."""

import json
import re
from pathlib import Path
import mlx.core as mx
import pytest
from mlx_lm import generate
from mlx_lm.models.base import create_attention_mask

from turbocluster.runtime.model import gguf
from turbocluster.runtime.model import loader

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def full():
    return loader.load()


@pytest.fixture(scope="module")
def prompt(full):
    return full[1].apply_chat_template(CHAT, add_generation_prompt=True)


def test_greedy_chat_answer_names_paris(full, prompt):
    model, tok = full
    text = generate(model, tok, prompt, max_tokens=12)
    assert "Paris" in text, text


def test_unpermuted_rows_match_traditional_rope_on_gguf_rows(full, prompt):
    # Un-permuting Q/K rows + HF RoPE must equal llama.cpp's layout + interleaved RoPE.
    tensors, meta = gguf.read(loader.default_model_path())
    keep = gguf._unpermute
    gguf._unpermute = lambda w, n: w
    try:
        raw = gguf.build_model(tensors, meta, 0, 30, loader.use_float32())
    finally:
        gguf._unpermute = keep
    for layer in raw.model.layers:
        layer.self_attn.rope.traditional = True
    x = mx.array([prompt])
    assert mx.allclose(raw(x), full[0](x), atol=1e-3).item()


def test_tokenizer_round_trips_and_knows_special_ids(full):
    tok = full[1]
    text = "Hello world! 12345 naïve café\n\tcode()"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert [tok.decode([i]) for i in tok.encode("123")] == ["1", "2", "3"]  # digits split one by one
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
    assert tok.eos_token_ids == {2}


def test_layer_range_keeps_only_those_layers(full):
    shard, _ = loader.load(layers=(10, 20))
    assert len(shard.model.layers) == 10
    assert (shard.layer_range, shard.num_layers_total) == ((10, 20), 30)
    assert (full[0].layer_range, full[0].num_layers_total) == ((0, 30), 30)
    assert not hasattr(shard.model, "embed_tokens") and not hasattr(shard.model, "norm")
    assert loader.parameter_bytes(shard) < loader.parameter_bytes(full[0]) / 3


def test_two_shards_give_the_full_models_logits(full, prompt):
    first, _ = loader.load(layers=(0, 13))
    last, _ = loader.load(layers=(13, 30))
    assert hasattr(last.model, "embed_tokens")  # tied head
    x = mx.array([prompt])
    h = first.model.embed_tokens(x)
    mask = create_attention_mask(h, None)
    for layer in first.model.layers + last.model.layers:
        h = layer(h, mask, None)
    logits = last.model.embed_tokens.as_linear(last.model.norm(h))
    assert mx.array_equal(logits, full[0](x)).item()


@pytest.mark.parametrize("bad", [(-1, 5), (5, 5), (20, 10), (0, 31)])
def test_bad_layer_ranges_raise(bad):
    with pytest.raises(ValueError, match="must satisfy 0 <= start < end <= 30"):
        loader.load(layers=bad)


def test_describe_matches_the_loaded_model(full):
    model = full[0]
    d = loader.describe()
    args = model.args
    assert d["name"] == "SmolLM2-135M-Instruct.Q4_1"
    assert (d["num_layers"], d["hidden_size"], d["num_heads"], d["num_kv_heads"], d["head_dim"], d["vocab_size"]) == (
        30, 576, 9, 3, 64, 49152
    )
    assert (args.num_attention_heads, args.num_key_value_heads, args.vocab_size) == (9, 3, 49152)
    assert d["layer_bytes"] == [loader.parameter_bytes(layer) for layer in model.model.layers]
    assert d["embed_bytes"] == loader.parameter_bytes(model.model.embed_tokens)
    assert d["head_bytes"] == loader.parameter_bytes(model.model.norm)
    assert sum(d["layer_bytes"]) + d["embed_bytes"] + d["head_bytes"] == loader.parameter_bytes(model)
    assert len(d["identity"]) == 64 and loader.describe()["identity"] == d["identity"]


def test_missing_gguf_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loader.load(tmp_path / "nope.gguf")


def test_random_mlx_lm_directory_loads_whole_and_sharded(tiny_model_dirs):
    from conftest import build_tiny

    path = tiny_model_dirs["qwen3"]
    reference = build_tiny("qwen3")
    reference.set_dtype(mx.float32)
    model, tok = loader.load(path)
    assert (model.layer_range, model.num_layers_total) == ((0, 5), 5)
    x = mx.array([tok.encode("Hello there")])
    assert mx.allclose(model(x), reference(x), atol=1e-4).item()

    shard, _ = loader.load(path, layers=(1, 3))
    assert len(shard.model.layers) == 2 and not hasattr(shard.model, "embed_tokens")
    d = loader.describe(path)
    config = json.loads((Path(path) / "config.json").read_text())
    assert (d["model_type"], d["num_layers"], d["num_kv_heads"], d["head_dim"]) == (
        "qwen3",
        5,
        config["num_key_value_heads"],
        config.get("head_dim", config["hidden_size"] // config["num_attention_heads"]),
    )
    assert loader.parameter_bytes(shard) == sum(d["layer_bytes"][1:3])
    assert d["embed_bytes"] == loader.parameter_bytes(model.model.embed_tokens)
    assert d["identity"] != loader.describe()["identity"]


def test_loading_reports_the_bytes_read_per_tensor(tiny_model_dirs):
    from mlx.utils import tree_flatten

    seen = []
    net, _ = loader.load(tiny_model_dirs["qwen3"], layers=(1, 4), tokenizer=False, progress=lambda d, t: seen.append((d, t)))
    weights = sum(v.nbytes for _, v in tree_flatten(net.parameters()))
    assert len(seen) > 5 and seen[-1] == (weights, weights)
    assert all(a[0] < b[0] and a[1] == b[1] for a, b in zip(seen, seen[1:]))  # strictly growing, one total


def test_load_progress_prints_whole_lines_per_node_when_not_a_terminal():
    import io

    from turbocluster.proto import turbo_pb2 as pb
    from turbocluster.runtime.cli.output import LoadProgress

    out = io.StringIO()
    bars = LoadProgress(["10.0.0.1:7070", "10.0.0.2:7070"], stream=out)
    for f in (0.0, 0.1, 0.2, 0.3, 0.55, 0.6, 0.95):
        for a in ("10.0.0.1:7070", "10.0.0.2:7070"):
            bars.update(a, pb.LoadProgress(fraction=f, stage="load" if f else "describe", message=f"{f * 100:.0f} MiB"))
    bars.update("10.0.0.1:7070", pb.LoadProgress(fraction=1.0, stage="ready", message="ready", done=True))
    bars.close()
    lines = out.getvalue().splitlines()
    assert all(re.match(r"  10\.0\.0\.[12]:7070: (describe|load|ready) \d+% ", line) for line in lines), lines
    ones = [line for line in lines if "10.0.0.1" in line]
    # describe, then one line per quarter of the load (0-24%, 25-49%, 50-74%, 75-99%), then ready
    assert [line.split()[1] for line in ones] == ["describe", "load", "load", "load", "load", "ready"]
