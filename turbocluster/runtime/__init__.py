"""Caches, model loading, nodes and the coordinator."""
from .turbo_cache import TurboQuantKVCache, make_turbo_cache
