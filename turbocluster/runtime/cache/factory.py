"""The one place a shard's layer caches are made from a cache setting."""

from mlx_lm.models.cache import KVCache, RotatingKVCache

from ..model import shard
from .config import CacheConfig
from .turbo_cache import make_turbo_cache


def make_fp16_caches(model, max_context=None):
    """Plain mlx-lm caches for the held layers, as ``model.make_cache()`` makes them for the whole model."""
    return [KVCache() if w is None else RotatingKVCache(max_size=w) for w in shard.sliding_windows(model)]


def make_caches(model, cache=None, max_context=None):
    """Caches for the held layers: fp16 when the setting (a ``CacheConfig`` or its dict) has zero bits, else TurboQuant."""
    config = CacheConfig.from_dict(cache)
    if not config.turbo:
        return make_fp16_caches(model, max_context)
    return make_turbo_cache(
        model,
        k_bits=config.k_bits,
        v_bits=config.v_bits,
        fp16_layers=config.fp16_layers,
        quantized_start=config.quantized_start,
        key_mean=config.key_mean,
    )
