"""Caches, model loading, nodes and the coordinator."""

from .model.loader import load
from .cache.turbo_cache import TurboQuantKVCache, make_turbo_cache
