"""Several sessions' caches of one layer seen as one batch, so their decode steps share one forward.

A node batches the one-position steps of different sessions that are queued
at once (``node/batcher.py``): the projections and MLPs run on ``[B, 1, D]``,
while each session keeps its own cache (packed TurboQuant or float16, any
length). ``BatchedCache`` is what the model's attention sees in place of one
cache: ``offset`` is an array of the sessions' offsets (mlx-lm's RoPE takes
one offset per batch row, as its own batch generator uses), and
``update_and_fetch`` appends row i to session i's cache and returns
``BatchedKV``, one fetched result per session. ``attention.py``'s hook then
runs each session's attention on its own keys and values and stacks the rows.

Only full-attention caches take part (``kinds.batchable``): a sliding window
or an SSM state is never batched, and such steps run alone as before.
"""

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True, eq=False)
class BatchedKV:
    """One layer's fetched keys (or values) of each session in a batch, in batch order."""

    parts: tuple
    caches: tuple


class BatchedCache:
    """One layer's caches of B sessions, read and written by a ``[B, 1, D]`` step."""

    def __init__(self, caches):
        self.caches = tuple(caches)

    @property
    def offset(self) -> mx.array:
        return mx.array([c.offset for c in self.caches], dtype=mx.int32)

    def make_mask(self, n: int, window_size=None, return_array: bool = False):
        if n != 1 or window_size is not None:
            raise ValueError(f"a batched step takes one position per session without a window, got {n}")
        return None

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if keys.shape[0] != len(self.caches):
            raise ValueError(f"{keys.shape[0]} batch rows for {len(self.caches)} sessions")
        fetched = [c.update_and_fetch(keys[i : i + 1], values[i : i + 1]) for i, c in enumerate(self.caches)]
        return (BatchedKV(tuple(k for k, _ in fetched), self.caches),
                BatchedKV(tuple(v for _, v in fetched), self.caches))


def attention(sdpa, queries: mx.array, keys: BatchedKV, values: BatchedKV, scale, mask):
    """Each session's attention on its own cache (``sdpa`` is the hook), rows stacked back into the batch."""
    if mask is not None:
        raise ValueError("a batched decode step has no mask")
    rows = [sdpa(queries[i : i + 1], k, v, cache=c, scale=scale, mask=None)
            for i, (k, v, c) in enumerate(zip(keys.parts, values.parts, keys.caches))]
    return mx.concatenate(rows, axis=0)
