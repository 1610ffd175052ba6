"""Run one shard of an mlx-lm model: embed on the first, layers everywhere, head on the last.

A shard is the ordinary mlx-lm ``Model`` whose ``model.model.layers`` holds only
layers ``[start, end)`` (``loader.load(layers=...)`` makes one; a whole model is
the shard ``(0, n)``). The functions here repeat the model's own ``__call__``
op for op, split at layer boundaries, so a pipeline of shards gives bit-for-bit
the logits of the whole model. What differs between architectures (embedding
scale, which layers use a sliding window, which cache builds each mask) is
decided by the *global* layer index, because a gemma3 shard starting at layer 7
must still treat layer 11 as its global layer.
"""

import copy

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask

SUPPORTED = ("llama", "qwen3", "qwen2", "mistral", "gemma3_text")


def layer_range(model):
    """``(start, end, total)`` of a shard; a plain mlx-lm model is the whole range."""
    n = len(model.model.layers)
    start, end = getattr(model, "layer_range", (0, n))
    total = getattr(model, "num_layers_total", n)
    if end - start != n:
        raise ValueError(f"shard says layers {start}:{end} but holds {n} layers")
    return start, end, total


def model_type(model):
    return getattr(model, "model_type", None) or model.args.model_type


def is_first(model):
    return layer_range(model)[0] == 0


def is_last(model):
    start, end, total = layer_range(model)
    return end == total


def sliding_windows(model):
    """Per held layer: the sliding-window size, or None for a global (full attention) layer."""
    start, end, _ = layer_range(model)
    kind = model_type(model)
    args = model.args
    if kind == "gemma3_text":
        p = args.sliding_window_pattern
        return [None if g % p == p - 1 else args.sliding_window for g in range(start, end)]
    if kind == "llama":
        return [model.model.sliding_window if l.use_sliding else None for l in model.model.layers]
    if kind in SUPPORTED:
        return [None] * (end - start)
    raise ValueError(f"model type {kind!r} is not supported by stage.py; supported: {', '.join(SUPPORTED)}")


def embed(model, tokens):
    """Token ids ``[1, L]`` to the first hidden state, scaled as the model scales it."""
    h = model.model.embed_tokens(tokens)
    if model_type(model) == "gemma3_text":
        h *= mx.array(model.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)
    return h


def run_layers(model, h, caches, overlap=False):
    """The held transformer layers, with masks built as the whole model builds them.

    ``overlap=True`` starts evaluating each layer as soon as its graph is built,
    so building layer i+1 in Python overlaps computing layer i (what
    mlx-lm's ``generate_step`` gets from ``async_eval`` across steps, which a
    pipeline stage cannot do: its next input is on another machine). Same ops,
    same results.
    """
    windows = sliding_windows(model)
    if caches is None:
        caches = [None] * len(windows)
    if len(caches) != len(windows):
        raise ValueError(f"expected {len(windows)} caches for the held layers, got {len(caches)}")
    masks = {}
    for w, c in zip(windows, caches):
        # The model builds each kind of mask from the first layer of that kind;
        # all caches of one kind are at the same position, so the first held one serves.
        if w not in masks:
            masks[w] = create_attention_mask(h, c, window_size=w)
    for layer, w, c in zip(model.model.layers, windows, caches):
        h = layer(h, masks[w], c)
        if overlap:
            mx.async_eval(h)
    return h


def head(model, h):
    """Final norm and output projection (tied embeddings use ``as_linear``)."""
    out = model.model.norm(h)
    if hasattr(model, "lm_head"):
        return model.lm_head(out)
    return model.model.embed_tokens.as_linear(out)


def forward(model, x, caches, want_logits=True):
    """One step through the shard: token ids on the first shard, hidden states elsewhere.

    Returns logits on the last shard when ``want_logits``, otherwise the hidden state.
    """
    h = embed(model, x) if is_first(model) and x.dtype in (mx.int32, mx.uint32) else x
    h = run_layers(model, h, caches)
    if want_logits and is_last(model):
        return head(model, h)
    return h


def shard(model, start, end):
    """A view of a whole in-memory model holding layers ``[start, end)`` (shares weights; tests and benchmarks)."""
    n = len(model.model.layers)
    if not 0 <= start < end <= n:
        raise ValueError(f"layer range {start}:{end} must satisfy 0 <= start < end <= {n}")
    part = copy.copy(model)
    part.model = copy.copy(model.model)
    part.model.layers = model.model.layers[start:end]
    part.layer_range = (start, end)
    part.num_layers_total = n
    return part
