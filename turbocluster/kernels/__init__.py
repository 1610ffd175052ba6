"""TurboQuant codec: the packed format and its compute paths."""

from .turboquant import (
    FORMAT_VERSION,
    SUPPORTED_BITS,
    boundaries,
    centroids,
    decode,
    dequantize_rotated,
    encode,
    pack,
    packed_words,
    rotate,
    unpack,
    unrotate,
    vector_nbytes,
)
