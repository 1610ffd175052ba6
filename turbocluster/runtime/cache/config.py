"""The cache setting of a session: one typed value, converted to and from its proto message here only.

Everything that says which cache a session's layers use (the CLI, the plan,
CreateSession, the session container, failover's journal) passes a
``CacheConfig``; ``k_bits == v_bits == 0`` is the plain fp16 mlx-lm cache.
"""

from dataclasses import asdict, dataclass, fields, replace
from typing import Optional, Tuple

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
    sinks: int = 0  # the first N positions are also kept (and read) in float16
    window: int = 0  # the last N positions are also kept (and read) in float16
    layer_bits: Tuple[Tuple[int, int, int], ...] = ()  # (global layer, k_bits, v_bits) overriding the widths per layer

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
        for name in ("fp16_layers", "quantized_start", "sinks", "window"):
            v = getattr(self, name)
            if type(v) is not int or v < 0:
                raise CacheConfigError(f"{name} must be a non-negative integer, got {v!r}")
        if (self.sinks or self.window or self.layer_bits) and not self.turbo:
            raise CacheConfigError("sinks, window and layer_bits need a TurboQuant cache (k_bits and v_bits)")
        layers = [t[0] if isinstance(t, tuple) and len(t) == 3 else None for t in self.layer_bits]
        if not isinstance(self.layer_bits, tuple) or None in layers or len(set(layers)) != len(layers):
            raise CacheConfigError(f"layer_bits must be distinct (layer, k_bits, v_bits) triples, got {self.layer_bits!r}")
        for layer, k, v in self.layer_bits:
            if type(layer) is not int or layer < 0 or k not in tq.SUPPORTED_BITS or v not in tq.SUPPORTED_BITS:
                raise CacheConfigError(f"layer_bits entry {(layer, k, v)} needs a layer >= 0 and widths in {tq.SUPPORTED_BITS}")
        return self

    def layer_bits_map(self) -> dict:
        """``{global layer: (k_bits, v_bits)}``, as ``make_turbo_cache`` takes it."""
        return {layer: (k, v) for layer, k, v in self.layer_bits}

    def bits_of(self, layer: int) -> Tuple[int, int]:
        return self.layer_bits_map().get(layer, (self.k_bits, self.v_bits))

    def cache_options(self) -> dict:
        """``TurboQuantKVCache`` keywords beyond the widths and ``quantized_start``."""
        return dict(key_mean=self.key_mean, sinks=self.sinks, window=self.window)

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
        if self.sinks or self.window:
            text += f" sinks {self.sinks} window {self.window}"
        if self.layer_bits:
            text += " layers " + ",".join(f"{layer}:k{k}v{v}" for layer, k, v in self.layer_bits)
        return text

    # -- conversions: the only place the setting changes form -------------------

    def to_dict(self) -> dict:
        """Non-default fields; ``layer_bits`` as a list of [layer, k_bits, v_bits] (JSON has no tuples)."""
        out = {k: v for k, v in asdict(self).items() if v}
        if self.layer_bits:
            out["layer_bits"] = [list(t) for t in self.layer_bits]
        return out

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
            elif k == "layer_bits":
                if isinstance(v, dict):
                    v = [(layer, *kv) for layer, kv in v.items()]
                if not isinstance(v, (list, tuple)) or not all(isinstance(t, (list, tuple)) and len(t) == 3 for t in v):
                    raise CacheConfigError(f"layer_bits must be a list of [layer, k_bits, v_bits], got {v!r}")
                v = tuple(sorted(tuple(t) for t in v))
            elif type(v) is not int:
                raise CacheConfigError(f"{k} must be an integer, got {v!r}")
            out[k] = v
        config = cls(**out)
        return config.check() if check else config

    def to_proto(self, pb):
        """The ``turbocluster.v1.CacheConfig`` message (``pb`` is the generated module)."""
        d = self.to_dict()
        d["layer_bits"] = [pb.LayerBits(layer=layer, k_bits=k, v_bits=v) for layer, k, v in self.layer_bits]
        return pb.CacheConfig(**d)

    @classmethod
    def from_proto(cls, message) -> "CacheConfig":
        return cls(
            k_bits=message.k_bits, v_bits=message.v_bits, fp16_layers=message.fp16_layers,
            quantized_start=message.quantized_start, key_mean=message.key_mean, sinks=message.sinks, window=message.window,
            layer_bits=tuple(sorted((m.layer, m.k_bits, m.v_bits) for m in message.layer_bits)),
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
        (``format.vector_nbytes``, per layer with ``layer_bits``), the float16
        sinks and window (2 bytes a number), plus, with ``quantized_start``, the float
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
    extra = 2 * head_dim * 2 * min(positions, cache.sinks + cache.window)  # float16 sinks and window
    if cache.quantized_start:
        extra += 2 * head_dim * itemsize * rounded(min(positions, cache.quantized_start))
    total_bytes = 0
    for i in range(start, end):
        if i < fp16 or i >= total - fp16:
            total_bytes += float_per
        else:
            kb, vb = cache.bits_of(i)
            total_bytes += (tq.vector_nbytes(head_dim, kb) + tq.vector_nbytes(head_dim, vb)) * rounded(positions) + extra
    return num_kv_heads * total_bytes
