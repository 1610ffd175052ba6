"""Caches, model loading, nodes and the coordinator."""

from .loader import load
from .turbo_cache import TurboQuantKVCache, make_turbo_cache
