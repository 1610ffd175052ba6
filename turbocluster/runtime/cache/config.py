"""The cache setting of a session: one typed value, converted to and from its proto message here only.

Everything that says which cache a session's layers use (the CLI, the plan,
CreateSession, the session container, failover's journal) passes a
``CacheConfig``; ``k_bits == v_bits == 0`` is the plain fp16 mlx-lm cache.
"""

from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

from ...kernels import format as tq


class CacheConfigError(ValueError):
    """A cache setting that cannot be built; the message names the field and the allowed values."""


@dataclass(frozen=True)
class CacheConfig:
    k_bits: int = 0  # TurboQuant bits per key coordinate (2..8); 0 with v_bits 0 = fp16 cache
    v_bits: int = 0  # TurboQuant bits per value coordinate (2..8)
    fp16_layers: int = 0  # the first N layers of the *model* (global index) stay fp16
    quantized_start: int = 0  # positions kept in fp16 before the cache compresses them all
    key_mean: bool = False  # subtract a per-head, per-channel key mean before encoding keys

    @property
    def turbo(self) -> bool:
        return bool(self.k_bits or self.v_bits)

    def check(self) -> "CacheConfig":
        """Self, or CacheConfigError saying which field is wrong and what would do."""
        if self.turbo:
            if not (self.k_bits and self.v_bits):
                raise CacheConfigError(f"give both k_bits and v_bits (or neither, for fp16), got {self.k_bits}/{self.v_bits}")
            for name in ("k_bits", "v_bits"):
                b = getattr(self, name)
                if b not in tq.SUPPORTED_BITS:
                    raise CacheConfigError(
                        f"{name} {b} is not a TurboQuant width; expected one of {', '.join(map(str, tq.SUPPORTED_BITS))} "
                        "(or 0 for both: an fp16 cache)"
                    )
        for name in ("fp16_layers", "quantized_start"):
            v = getattr(self, name)
            if type(v) is not int or v < 0:
                raise CacheConfigError(f"{name} must be a non-negative integer, got {v!r}")
        return self

    def describe(self) -> str:
        if not self.turbo:
            return "fp16"
        text = f"turbo k{self.k_bits}/v{self.v_bits}"
        if self.key_mean:
            text += " key-mean"
        if self.fp16_layers:
            text += f" fp16-layers {self.fp16_layers}"
        if self.quantized_start:
            text += f" quantized-start {self.quantized_start}"
        return text

    # -- conversions: the only place the setting changes form -------------------

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v}

    @classmethod
    def from_dict(cls, d: Optional[dict], check: bool = True) -> "CacheConfig":
        if d is None:
            return cls()
        if isinstance(d, CacheConfig):
            return d
        if not isinstance(d, dict):
            raise CacheConfigError(f"a cache setting must be a map, got {type(d).__name__}")
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise CacheConfigError(f"unknown cache setting(s) {unknown}; known: {sorted(known)}")
        out = {}
        for k, v in d.items():
            if v is None:
                continue
            if k == "key_mean":
                if not isinstance(v, bool):
                    raise CacheConfigError(f"key_mean must be true or false, got {v!r}")
            elif type(v) is not int:
                raise CacheConfigError(f"{k} must be an integer, got {v!r}")
            out[k] = v
        config = cls(**out)
        return config.check() if check else config

    def to_proto(self, pb):
        """The ``turbocluster.v1.CacheConfig`` message (``pb`` is the generated module)."""
        return pb.CacheConfig(**self.to_dict())

    @classmethod
    def from_proto(cls, message) -> "CacheConfig":
        return cls(
            k_bits=message.k_bits, v_bits=message.v_bits, fp16_layers=message.fp16_layers,
            quantized_start=message.quantized_start, key_mean=message.key_mean,
        ).check()

    def with_(self, **changes) -> "CacheConfig":
        return replace(self, **changes).check()


FP16 = CacheConfig()


def kv_bytes(num_layers, num_kv_heads, head_dim, positions, cache=None, itemsize=2, layers=None, total_layers=None):
    """Bytes of K and V that ``positions`` tokens can fill over ``num_layers`` layers.

    A reservation must be what the session can fill, so it counts:
      * float layers (fp16 caches, and the first and last ``fp16_layers`` of
        the model under TurboQuant): 2 * heads * head_dim * ``itemsize`` per
        position (``itemsize`` is the activations': 4 on CPU nodes, which keep
        float32), rounded up to mlx-lm's 256-position allocation step;
      * TurboQuant layers: the format's bytes per packed vector
        (``format.vector_nbytes``) plus, with ``quantized_start``, the float
        buffers of the first ``quantized_start`` positions, held until the
        crossing compresses them (both exist at that moment).

    layers: the global (start, end) of the counted layers; total_layers: the
    model's layer count (both default to the counted layers being the whole
    model), so that ``fp16_layers`` is counted against the full model.
    """
    rounded = lambda n: -(-n // 256) * 256
    cache = CacheConfig.from_dict(cache) if not isinstance(cache, CacheConfig) else cache
    k_bits, v_bits = cache.k_bits, cache.v_bits
    float_per = 2 * head_dim * itemsize * rounded(positions)
    if not (k_bits or v_bits):
        return num_layers * num_kv_heads * float_per
    start, end = layers if layers is not None else (0, num_layers)
    total = total_layers if total_layers is not None else end
    fp16 = cache.fp16_layers
    n_float = sum(1 for i in range(start, end) if i < fp16 or i >= total - fp16)
    packed = (tq.vector_nbytes(head_dim, k_bits) + tq.vector_nbytes(head_dim, v_bits)) * rounded(positions)
    if cache.quantized_start:
        packed += 2 * head_dim * itemsize * rounded(min(positions, cache.quantized_start))
    return num_kv_heads * (n_float * float_per + (num_layers - n_float) * packed)
