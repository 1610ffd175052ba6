"""The cache classes a session may hold, by kind code: the one registry.

Sessions (container, transfer, migration) recognise a cache by ``kind_of``
(its exact class looked up here), never by comparing class names, and build
one from the network only through ``class_of`` (a name from the wire is looked
up, never imported or evaluated). The kind codes are the wire's ``class``
strings (``docs/session-format.md``).
"""

from typing import Optional

from mlx_lm.models.cache import ChunkedKVCache, KVCache, QuantizedKVCache, RotatingKVCache

from .turbo_cache import TurboQuantKVCache

KV = "KVCache"
ROTATING = "RotatingKVCache"
QUANTIZED = "QuantizedKVCache"
CHUNKED = "ChunkedKVCache"
TURBO = "TurboQuantKVCache"

_KINDS = {KVCache: KV, RotatingKVCache: ROTATING, QuantizedKVCache: QUANTIZED, ChunkedKVCache: CHUNKED, TurboQuantKVCache: TURBO}
_CLASSES = {kind: cls for cls, kind in _KINDS.items()}
KINDS = tuple(_CLASSES)  # every kind code, mlx-lm's first
BATCHED = (KV, TURBO)  # full-attention kinds whose decode steps a node may batch (cache/batched.py)


def register(cls: type, kind: str) -> None:
    """Allow ``cls`` in sessions under ``kind`` (its ``state`` must be plain arrays and ints)."""
    if _CLASSES.get(kind, cls) is not cls or _KINDS.get(cls, kind) != kind:
        raise ValueError(f"cache kind {kind!r} or class {cls.__name__} is already registered differently")
    _KINDS[cls], _CLASSES[kind] = kind, cls


def kind_of(cache) -> Optional[str]:
    """The kind code of ``cache``'s exact class, or None when sessions cannot carry it."""
    return _KINDS.get(type(cache))


def kind_of_class(cls: type) -> Optional[str]:
    """The kind code of exactly ``cls``, or None."""
    return _KINDS.get(cls)


def class_of(kind) -> Optional[type]:
    """The registered class for a kind code, or None."""
    return _CLASSES.get(kind) if isinstance(kind, str) else None


def is_turbo(cache) -> bool:
    return kind_of(cache) == TURBO


def batchable(caches) -> bool:
    """Whether a session's caches can share a batched decode step: every one of a ``BATCHED`` kind."""
    return bool(caches) and all(_KINDS.get(type(c)) in BATCHED for c in caches)
