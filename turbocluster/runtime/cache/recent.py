"""Attention sinks and a recent window for ``TurboQuantKVCache``: tokens also kept in float16.

A cache built with ``sinks=S`` keeps the first S positions (BOS, the chat
template's head) and with ``window=W`` the last W positions in float16 next to
their packed form. Every position is still encoded as it arrives (so the
packed buffers are exactly those of the same cache without sinks or window);
attention reads a position from float16 while it is a sink or in the window
and from the packed words once it has left the window.

``fetch`` gives attention a ``SplitKV``: the packed middle [S, T - W) as
``PackedKV`` and the float16 positions (sinks, then window) with their
positions; ``attention.split_attention`` merges the two softmaxes exactly
(log-sum-exp). Bytes: the packed words of every position plus
``2 * dim * 2`` bytes per float16 key and value (``S + W`` positions at most).

State (``turbo_cache.STATE_FIELDS``, schema version 2): ``sink_keys``,
``sink_values`` [B, H, <= S, D] and ``window_keys``, ``window_values``
[B, H, <= W, D], float16, or None.
"""

import logging
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from ...kernels.packed import PackedKV

logger = logging.getLogger(__name__)

FIELDS = ("sink_keys", "sink_values", "window_keys", "window_values")


@dataclass(frozen=True, eq=False)
class SplitKV:
    """One layer's keys or values for attention: a packed middle and float16 ends.

    ``packed``: positions [n_sinks, total - n_window) as ``PackedKV`` (T may be 0);
    ``floats``: float16 [B, H, n_sinks + n_window, D], the sinks then the window.
    ``key_mean`` (keys only): the mean subtracted from the packed keys, [B, H, 1, D].
    Softmax ignores it within the packed part, but merging with the float part
    must add ``q . mean`` back to the packed part's scores.
    """

    packed: PackedKV
    floats: mx.array
    n_sinks: int
    n_window: int
    total: int
    key_mean: Optional[mx.array] = None

    def float_positions(self):
        """Positions of ``floats`` along the token axis: int32 [n_sinks + n_window]."""
        sinks = mx.arange(self.n_sinks)
        return mx.concatenate([sinks, mx.arange(self.total - self.n_window, self.total)]) if self.n_window else sinks


def check(sinks, window) -> None:
    for name, n in (("sinks", sinks), ("window", window)):
        if type(n) is not int or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")


def reset(cache) -> None:
    for k in FIELDS:
        setattr(cache, k, None)


def _cat(old, new):
    return new if old is None else mx.concatenate([old, new], axis=2)


def remember(cache, keys, values, first: int) -> None:
    """Keep float16 copies of the new positions ``first..`` that are sinks or in the window."""
    n = keys.shape[2]
    take = max(0, min(n, cache.sinks - first))
    if take:
        cache.sink_keys = _cat(cache.sink_keys, keys[..., :take, :].astype(mx.float16))
        cache.sink_values = _cat(cache.sink_values, values[..., :take, :].astype(mx.float16))
    if cache.window and n > take:
        w = cache.window
        cache.window_keys = _cat(cache.window_keys, keys[..., take:, :][..., -w:, :].astype(mx.float16))[..., -w:, :]
        cache.window_values = _cat(cache.window_values, values[..., take:, :][..., -w:, :].astype(mx.float16))[..., -w:, :]


def counts(cache):
    """(sinks held, window positions held) that apply at the cache's offset."""
    ns = 0 if cache.sink_keys is None else min(cache.sink_keys.shape[2], cache.offset)
    nw = 0 if cache.window_keys is None else min(cache.window_keys.shape[2], cache.offset - ns)
    return ns, nw


def trim(cache, n: int) -> None:
    """Drop the float16 copies of the last ``n`` positions (call after lowering ``offset``)."""
    if cache.window_keys is not None:  # the window holds the last positions: the trimmed ones are its tail
        keep = cache.window_keys.shape[2] - min(cache.window_keys.shape[2], n)
        cache.window_keys, cache.window_values = cache.window_keys[..., :keep, :], cache.window_values[..., :keep, :]
    if cache.sink_keys is not None and cache.sink_keys.shape[2] > cache.offset:
        t = cache.offset
        cache.sink_keys, cache.sink_values = cache.sink_keys[..., :t, :], cache.sink_values[..., :t, :]


def fetch(cache):
    """Keys and values for attention: ``SplitKV`` when float16 positions apply, else ``PackedKV``."""
    k, v = cache.fetch()
    ns, nw = counts(cache)
    if not ns and not nw:
        return k, v
    t = cache.offset
    parts = lambda s, w: [a for a, n in ((s, ns), (w, nw)) if n]
    fk = mx.concatenate(parts(cache.sink_keys[..., :ns, :] if ns else None, cache.window_keys[..., -nw:, :] if nw else None), axis=2)
    fv = mx.concatenate(parts(cache.sink_values[..., :ns, :] if ns else None, cache.window_values[..., -nw:, :] if nw else None), axis=2)
    middle = lambda p: PackedKV(p.packed[..., ns : t - nw, :], p.scales[..., ns : t - nw, :], p.bits, p.dim, p.codebook, p.rotated, p.mean)
    return SplitKV(middle(k), fk, ns, nw, t, cache.key_mean), SplitKV(middle(v), fv, ns, nw, t)


def nbytes(cache) -> int:
    return sum(getattr(cache, k).nbytes for k in FIELDS if getattr(cache, k) is not None)


def check_fields(fields: dict, sinks: int, window: int, lead, k_dim: int, v_dim: int) -> None:
    """ValueError unless the four fields are None or float16 [*lead, n, dim] with n <= sinks / window."""
    for name, limit in (("sink", sinks), ("window", window)):
        k, v = fields[f"{name}_keys"], fields[f"{name}_values"]
        if k is None and v is None:
            continue
        if not (isinstance(k, mx.array) and isinstance(v, mx.array)):
            raise ValueError(f"{name}_keys and {name}_values must both be arrays or both be absent")
        if k.dtype != mx.float16 or v.dtype != mx.float16 or k.ndim != 4 or v.ndim != 4:
            raise ValueError(f"{name}_keys and {name}_values must be float16 [B, H, n, D]")
        n = k.shape[2]
        if k.shape != (*lead, n, k_dim) or v.shape != (*lead, n, v_dim) or n > limit:
            raise ValueError(f"expected {name} keys/values of shape {(*lead, f'n<={limit}', k_dim)} / {v_dim}, found {k.shape} / {v.shape}")
