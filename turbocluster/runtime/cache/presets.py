"""Named cache settings: the measured best configurations, by name.

``make_turbo_cache(model, preset="best")``, ``--kv-preset best`` on the CLIs
(``cli.cluster.cache_of``) and ``resolve(name)`` all read ``PRESETS``. A preset
is a ``CacheConfig``, so a session built from one carries its settings (layer
bits included) like any other. The numbers behind each are in docs/cache.md
("Fidelity"): SmolLM2-135M, GPL-3 and MPL-1.1 texts, per-layer widths from a
sensitivity measurement on Apache-2.0 (``allocate``), never on a scored text.
"""

import logging

from .config import CacheConfig, CacheConfigError

logger = logging.getLogger(__name__)

# Widths per layer of SmolLM2-135M: allocate.allocate over allocate.measure on
# 1024 tokens of Apache-2.0 (last 256 queries), within 4.25 (resp. 3.25) bits
# per coordinate at a 4096-token context, the float16 sinks and window counted.
_BEST_LAYERS = ((0, 3, 3), (1, 4, 3), (2, 4, 4), (3, 4, 3), (4, 4, 3), (5, 4, 3), (6, 4, 3), (7, 4, 3), (8, 4, 3), (9, 4, 3),
                (10, 4, 4), (11, 4, 4), (12, 4, 4), (13, 5, 4), (14, 4, 3), (15, 5, 3), (16, 5, 4), (17, 4, 3), (18, 5, 4), (19, 5, 3),
                (20, 4, 3), (21, 4, 3), (22, 4, 3), (23, 4, 4), (24, 4, 3), (25, 5, 3), (26, 4, 4), (27, 4, 3), (28, 4, 3), (29, 3, 3))
_SMALL_LAYERS = ((0, 3, 2), (1, 3, 2), (2, 3, 3), (3, 3, 3), (4, 3, 2), (5, 3, 3), (6, 3, 2), (7, 3, 2), (8, 3, 2), (9, 3, 2),
                 (10, 3, 3), (11, 3, 3), (12, 4, 3), (13, 4, 3), (14, 3, 2), (15, 3, 2), (16, 3, 3), (17, 4, 2), (18, 3, 3), (19, 4, 2),
                 (20, 4, 3), (21, 3, 2), (22, 4, 2), (23, 3, 3), (24, 3, 2), (25, 4, 3), (26, 4, 3), (27, 3, 2), (28, 3, 2), (29, 3, 2))

PRESETS = {
    # 4.23 bits per coordinate at 4096 positions (bench_quality row alloc425-s4w64)
    "best": CacheConfig(k_bits=4, v_bits=3, key_mean=True, sinks=4, window=64, layer_bits=_BEST_LAYERS),
    # 3.24 bits per coordinate at 4096 positions (bench_quality row alloc325-s4w32)
    "small": CacheConfig(k_bits=3, v_bits=3, key_mean=True, sinks=4, window=32, layer_bits=_SMALL_LAYERS),
}


class PresetError(CacheConfigError):
    """An unknown preset name. ``code``: UNKNOWN_PRESET."""

    code = "UNKNOWN_PRESET"


def resolve(name: str) -> CacheConfig:
    """The preset ``name``, or PresetError naming the known ones."""
    try:
        return PRESETS[name].check()
    except (KeyError, TypeError):
        raise PresetError(f"unknown cache preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
