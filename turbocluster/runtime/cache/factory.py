"""The one place a shard's layer caches are made from a cache setting.

The types come from the model itself (``model.make_cache()`` over the whole
model, through ``shard.make_full_cache``): ``RotatingKVCache`` for sliding
layers, ``ArraysCache``/``MambaCache`` for SSM and linear-attention layers,
``KVCache`` for the rest. A TurboQuant setting replaces only plain ``KVCache``
layers, and not those the setting keeps in fp16 (``fp16_layers``, counted over
the *model's* attention layers) nor those whose attention uses sinks, which
the packed attention does not read (gpt-oss).
"""

import logging
from typing import List

import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import CacheList, KVCache

from ..model import shard
from . import attention
from .config import CacheConfig, CacheConfigError
from .turbo_cache import TurboQuantKVCache

logger = logging.getLogger(__name__)


def make_fp16_caches(model, max_context=None):
    """Plain mlx-lm caches for the held layers, as ``model.make_cache()`` makes them for the whole model."""
    return shard.make_caches(model)


def _has_sinks(layer) -> bool:
    return any(k.rsplit(".", 1)[-1] == "sinks" for k, _ in tree_flatten(layer.parameters()))


def make_caches(model, cache=None, max_context=None):
    """Caches for the held layers: fp16 when the setting (a ``CacheConfig`` or its dict) has zero bits, else TurboQuant."""
    config = CacheConfig.from_dict(cache)
    start, end, _ = shard.layer_range(model)
    full = shard.make_full_cache(model)
    held = full[start:end]
    if not config.turbo:
        return held
    refusal = shard.packed_cache_refusal(model)
    if refusal:
        raise CacheConfigError(refusal)
    attn = [i for i, c in enumerate(full) if _plain(c)]
    n = config.fp16_layers
    keep = set(attn[:n]) | set(attn[len(attn) - n :] if n else [])
    layers = shard.held_layers(model)
    out = []
    for i, c, layer in zip(range(start, end), held, layers):
        if i in keep or not _plain(c):
            out.append(c)
        elif _has_sinks(layer):
            logger.debug("layer %d keeps an fp16 cache: its attention uses sinks", i)
            out.append(c)
        else:
            out.append(_packed(c, config, i))
    warm_up_gpu(model, out)
    return out


def warm_up_gpu(model: nn.Module, caches: List) -> None:
    """On a GPU, compile and self-check the fused kernels now, at session open, never inside a step."""
    if attention.fused_gpu.backend() is None:
        return
    args = getattr(model, "args", None)
    n_heads = getattr(args, "num_attention_heads", None)
    if not n_heads:
        return
    n_kv = getattr(args, "num_key_value_heads", None) or n_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // n_heads
    for k_bits, v_bits in sorted({(c.k_bits, c.v_bits) for c in caches if isinstance(c, TurboQuantKVCache)}):
        attention.gpu_warm_up(k_bits, v_bits, head_dim, head_dim, max(1, n_heads // n_kv))


def _plain(c) -> bool:
    """A plain KVCache, or a CacheList holding one (hybrid layers such as falcon_h1's)."""
    return type(c) is KVCache or (type(c) is CacheList and any(type(x) is KVCache for x in c.caches))


def _packed(c, config: CacheConfig, layer: int):
    def turbo(x):
        if type(x) is not KVCache:
            return x
        return TurboQuantKVCache(*config.bits_of(layer), config.quantized_start, **config.cache_options())

    return CacheList(*(turbo(x) for x in c.caches)) if type(c) is CacheList else turbo(c)
