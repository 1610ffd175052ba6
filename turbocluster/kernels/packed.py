"""``PackedKV``: one layer's keys or values in the packed format, as the kernels read them.

The kernels layer owns it (``docs/format.md`` defines the bytes): the reference
codec, the CPU native kernel and the GPU kernels read its fields, and the cache
(``runtime/cache``) builds it. Pure data, no behaviour beyond ``shape``.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx


@dataclass(frozen=True, eq=False)
class PackedKV:
    """Keys or values of one layer as stored by ``TurboQuantKVCache``.

    ``packed`` is uint32 [B, H, T, words] and ``scales`` float16 [B, H, T, 1] in
    the format of ``turbocluster.kernels.turboquant``; a vector is
    ``scale * codebook[idx]``, in the rotated space when ``rotated``.
    ``codebook`` None means the format's Lloyd-Max centroids. ``mean``
    (values only, [B, H, 1, dim], unrotated space) was subtracted before
    encoding; attention adds it back to its output (the weights sum to one).
    """

    packed: mx.array
    scales: mx.array
    bits: int
    dim: int
    codebook: Optional[Tuple[float, ...]] = None
    rotated: bool = True
    mean: Optional[mx.array] = None

    @property
    def shape(self):
        return (*self.packed.shape[:-1], self.dim)
