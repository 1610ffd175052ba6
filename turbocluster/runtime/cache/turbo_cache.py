"""A KV cache that stores keys and values TurboQuant-packed, speaking mlx-lm's cache protocol.

Use it as mlx-lm's ``prompt_cache``::

    from turbocluster.runtime import make_turbo_cache
    cache = make_turbo_cache(model, k_bits=4, v_bits=3)
    for r in mlx_lm.stream_generate(model, tokenizer, prompt, prompt_cache=cache): ...

Two phases (``quantized_start``): while the context holds at most
``quantized_start`` tokens the cache is a plain KVCache (keys and values in the
activations' dtype, attention by ``mx.fast.scaled_dot_product_attention``, so
the output is exactly that of ``KVCache``). The update that takes the context
past the threshold compresses everything so far at once; from then on every
new token is compressed as it arrives and attention reads the packed form
(``attention.turbo_scaled_dot_product_attention``). ``quantized_start=0``
compresses from the first token.

Both keys and values are stored rotated (``turboquant.encode``): rotating only
keys costs far more quality. Key and value bit widths are separate because keys
carry most of the error.

Importing this module installs the attention hook (``attention.install``) and
registers ``TurboQuantKVCache`` in ``mlx_lm.models.cache`` so that
``mlx_lm.models.cache.load_prompt_cache``, which looks classes up by name in
that module, can rebuild it.
"""

import functools
import statistics
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache, _BaseCache, create_attention_mask

from ...kernels import fused
from ...kernels import turboquant as tq
from . import attention, presets, recent
from .state_schema import (  # noqa: F401  (re-exported: the schema's names as callers know them)
    PACKED_FIELDS, FLOAT_FIELDS, RECENT_FIELDS, SETTINGS, SETTINGS_V1, STATE_FIELDS, STATE_FIELDS_V1, STATE_VERSION, STATE_VERSIONS,
    CacheStateError, check_state_version, named_state, state_position, upgrade_state,
)
from ...kernels.packed import PackedKV

# --- codebooks (the format's own is turboquant.centroids; others are for experiments) --


@functools.lru_cache(maxsize=None)
def _seed_codebook(bits):
    """The codebooks of the seed PR, reconstructed.

    3 bits: the seed's table held the Lloyd-Max *decision boundaries* where the
    centroids belong. The three positive boundaries (0.50, 1.05, 1.75) are
    extended by one more step of the last spacing to four, mirrored to eight.
    4 bits: an equal-probability quantizer of N(0, 1), represented by cell medians.
    """
    if bits == 3:
        pos = [b for b in tq.boundaries(3) if b > 0]
        pos.append(2 * pos[-1] - pos[-2])
        return tuple(-v for v in reversed(pos)) + tuple(pos)
    if bits == 4:
        nd = statistics.NormalDist()
        return tuple(nd.inv_cdf((i + 0.5) / 16) for i in range(16))
    raise ValueError(f"the seed codebook exists for 3 and 4 bits, got {bits}")


CODEBOOKS = ("lloyd-max", "seed")


def _codebook(name, bits):
    if name == "lloyd-max":
        return None
    if name == "seed":
        return _seed_codebook(bits)
    raise ValueError(f"codebook must be one of {CODEBOOKS}, got {name!r}")


def _encode(x, bits, codebook=None, rotate=True):
    """``turboquant.encode``, or the same recipe with another codebook / no rotation."""
    if codebook is None and rotate:
        return tq.encode(x, bits)
    dim = x.shape[-1]
    tq.check_dim(dim)
    y = tq.rotate(x) if rotate else x.astype(mx.float32)
    values = codebook if codebook is not None else tq.centroids(bits)
    norm = mx.sqrt((y * y).sum(axis=-1, keepdims=True))
    u = y * (dim**0.5 / mx.maximum(norm, 1e-30))
    bounds = mx.array([(a + b) / 2 for a, b in zip(values[:-1], values[1:])], dtype=mx.float32)
    idx = mx.zeros(u.shape, dtype=mx.uint32)
    for step in reversed(range(bits)):  # binary search over the sorted boundaries
        cand = idx + (1 << step)
        idx = mx.where(mx.take(bounds, cand - 1) < u, cand, idx)
    c = mx.take(mx.array(values, dtype=mx.float32), idx)
    scale = (y * c).sum(axis=-1, keepdims=True) / mx.maximum((c * c).sum(axis=-1, keepdims=True), 1e-30)
    return tq.pack(idx, bits), scale.astype(mx.float16)


# --- the cache -------------------------------------------------------------------------


class TurboQuantKVCache(_BaseCache):
    """mlx-lm KV cache holding keys and values as TurboQuant-packed vectors.

    k_bits, v_bits: bits per coordinate (2..8) for keys and values.
    quantized_start: tokens kept uncompressed before compression begins.
    key_mean: subtract a per-head, per-channel key mean before encoding. The
        mean is taken over the first tokens compressed, stored in float16 and
        then fixed; attention ignores it (q . mean is the same for every key of
        a query, so softmax cancels it).
    value_mean: the same for values; attention adds it back to its output
        (the attention weights sum to one). An experiment: not in ``state``
        yet, so such a cache cannot be saved or migrated.
    sinks, window: the first ``sinks`` and the last ``window`` positions are
        also kept in float16 and attention reads them from there (``recent``).
    codebook, rotate_values: experiment knobs ("seed" codebooks, values stored
        unrotated as the seed PR did); the defaults are the format's.

    ``nbytes`` counts the allocated buffers, which grow ``step`` tokens at a
    time like KVCache's, so it equals ``stored_nbytes`` (the bytes of the
    ``offset`` stored tokens) whenever the context is a multiple of ``step``.
    """

    step = 256

    def __init__(self, k_bits=4, v_bits=4, quantized_start=0, *, key_mean=False, value_mean=False, codebook="lloyd-max", rotate_values=True,
                 sinks=0, window=0):
        for name, b in (("k_bits", k_bits), ("v_bits", v_bits)):
            if b not in tq.SUPPORTED_BITS:
                raise ValueError(f"{name} must be one of {tq.SUPPORTED_BITS}, got {b!r}")
        if not isinstance(quantized_start, int) or quantized_start < 0:
            raise ValueError(f"quantized_start must be a non-negative int, got {quantized_start!r}")
        _codebook(codebook, k_bits), _codebook(codebook, v_bits)
        recent.check(sinks, window)
        self.sinks, self.window = sinks, window
        recent.reset(self)
        self.k_bits, self.v_bits = k_bits, v_bits
        self.quantized_start = quantized_start
        self.key_mean_enabled = bool(key_mean)
        self.value_mean_enabled = bool(value_mean)
        self.codebook = codebook
        self.rotate_values = bool(rotate_values)
        self.offset = 0
        self.keys = self.values = None  # uncompressed phase
        self.k_packed = self.k_scales = self.v_packed = self.v_scales = None
        self.key_mean = self.value_mean = None

    # -- phases --

    @property
    def compressed(self):
        return self.k_packed is not None

    def _encode_keys(self, keys):
        if self.key_mean_enabled:
            if self.key_mean is None:
                self.key_mean = keys.astype(mx.float32).mean(axis=2, keepdims=True).astype(mx.float16)
            keys = keys.astype(mx.float32) - self.key_mean.astype(mx.float32)
        return _encode(keys, self.k_bits, _codebook(self.codebook, self.k_bits))

    def _fused_encode(self, keys, values):
        """Keys and values encoded by one GPU launch (``fused.encode_kv``), or None where it does not apply."""
        kind = fused.encode_backend()
        if kind is None or self.codebook != "lloyd-max" or not self.rotate_values or keys.shape[2] == 0:
            return None
        dk, dv = keys.shape[-1], values.shape[-1]
        if max(dk, dv) > fused.DECODE_MAX_DIM or not fused.encode_verdict(kind, self.k_bits, self.v_bits, dk, dv):
            return None
        if self.key_mean_enabled and self.key_mean is None:
            self.key_mean = keys.astype(mx.float32).mean(axis=2, keepdims=True).astype(mx.float16)
        if self.value_mean_enabled and self.value_mean is None:
            self.value_mean = values.astype(mx.float32).mean(axis=2, keepdims=True).astype(mx.float16)
        return fused.encode_kv(keys, values, self.k_bits, self.v_bits,
                               self.key_mean if self.key_mean_enabled else None,
                               self.value_mean if self.value_mean_enabled else None, kind=kind)

    def _encode_values(self, values):
        if self.value_mean_enabled:
            if self.value_mean is None:
                self.value_mean = values.astype(mx.float32).mean(axis=2, keepdims=True).astype(mx.float16)
            values = values.astype(mx.float32) - self.value_mean.astype(mx.float32)
        return _encode(values, self.v_bits, _codebook(self.codebook, self.v_bits), self.rotate_values)

    def _append(self, names, arrays):
        """Write arrays [B, H, n, W] after ``offset``, growing the buffers ``step`` tokens at a time."""
        prev, n = self.offset, arrays[0].shape[2]
        first = getattr(self, names[0])
        if first is None or prev + n > first.shape[2]:
            capacity = -(-(prev + n) // self.step) * self.step
            for k, a in zip(names, arrays):
                buf = getattr(self, k)
                new = mx.zeros((*a.shape[:2], capacity - prev, a.shape[3]), a.dtype)
                setattr(self, k, new if buf is None else mx.concatenate([buf[..., :prev, :], new], axis=2))
        for k, a in zip(names, arrays):
            getattr(self, k)[..., prev : prev + n, :] = a
        self.offset = prev + n

    PACKED_FIELDS = _PACKED = PACKED_FIELDS
    FLOAT_FIELDS = _FLOAT = FLOAT_FIELDS
    RECENT_FIELDS = RECENT_FIELDS

    def update_and_fetch(self, keys, values):
        if not self.compressed:
            if self.offset + keys.shape[2] <= self.quantized_start:
                self._append(self._FLOAT, [keys, values])
                return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
            if self.offset:  # crossing the threshold: compress everything so far at once
                keys = mx.concatenate([self.keys[..., : self.offset, :], keys], axis=2)
                values = mx.concatenate([self.values[..., : self.offset, :], values], axis=2)
                self.offset = 0
            self.keys = self.values = None
        encoded = self._fused_encode(keys, values)
        if encoded is None:
            encoded = self._encode_keys(keys) + self._encode_values(values)
        kp, ks, vp, vs = encoded
        first = self.offset
        self._append(self._PACKED, [kp, ks, vp, vs])
        if self.sinks or self.window:
            recent.remember(self, keys, values, first)
            return recent.fetch(self)
        return self.fetch()

    def fetch(self):
        """The stored keys and values as ``PackedKV`` (compressed phase only)."""
        t = self.offset
        k = PackedKV(self.k_packed[..., :t, :], self.k_scales[..., :t, :], self.k_bits, self.k_dim, _codebook(self.codebook, self.k_bits), True)
        v = PackedKV(self.v_packed[..., :t, :], self.v_scales[..., :t, :], self.v_bits, self.v_dim, _codebook(self.codebook, self.v_bits), self.rotate_values, self.value_mean)
        return k, v

    @property
    def k_dim(self):
        return tq.dim_from_words(self.k_packed.shape[-1], self.k_bits)

    @property
    def v_dim(self):
        return tq.dim_from_words(self.v_packed.shape[-1], self.v_bits)

    # -- protocol --

    def size(self):
        return self.offset

    def empty(self):
        return self.keys is None and self.k_packed is None

    def is_trimmable(self):
        return True

    def trim(self, n):
        """Forget the last n tokens; a compressed cache stays compressed."""
        n = min(self.offset, n)
        self.offset -= n
        recent.trim(self, n)
        return n

    def make_mask(self, *args, **kwargs):
        return create_attention_mask(*args, offset=self.offset, **kwargs)

    @property
    def meta_state(self):
        """(k_bits, v_bits, quantized_start, codebook, rotate_values, key_mean, sinks, window) as strings.

        This and ``state`` are a contract (session_io checks them field by field):
        change them only together with it.
        """
        flags = (self.rotate_values, self.key_mean_enabled)
        ints = (str(self.sinks), str(self.window))
        return (str(self.k_bits), str(self.v_bits), str(self.quantized_start), self.codebook, *(str(int(f)) for f in flags), *ints)

    @meta_state.setter
    def meta_state(self, v):
        k_bits, v_bits, qs, codebook, rot_v, km, *ends = v
        self.sinks, self.window = (int(x) for x in (ends or (0, 0)))
        self.k_bits, self.v_bits, self.quantized_start = int(k_bits), int(v_bits), int(qs)
        self.codebook = codebook
        self.rotate_values, self.key_mean_enabled = (bool(int(f)) for f in (rot_v, km))
        self.value_mean_enabled = getattr(self, "value_mean_enabled", False)
        self.value_mean = getattr(self, "value_mean", None)

    @property
    def state(self):
        """``state_fields`` in ``STATE_FIELDS`` order, for mlx-lm (save/load_prompt_cache)."""
        fields = self.state_fields()
        return tuple(fields[k] for k in STATE_FIELDS)

    @state.setter
    def state(self, v):
        self.set_fields(named_state(v))

    def state_fields(self) -> dict:
        """The state by name: packed/float arrays cut to ``offset``, ``offset``, ``meta_state``.

        Arrays hold the ``offset`` stored tokens only; the phase not in use is None.
        The schema is ``STATE_VERSION``; ``from_fields`` reads it back.
        """
        if self.value_mean_enabled:
            raise ValueError("a TurboQuantKVCache with value_mean (an experiment) cannot be serialized yet")
        t = self.offset
        out = {k: None if getattr(self, k) is None else getattr(self, k)[..., :t, :] for k in self._PACKED + self._FLOAT}
        out.update({k: getattr(self, k) for k in RECENT_FIELDS})
        out.update(key_mean=self.key_mean, offset=self.offset, meta_state=self.meta_state)
        return out

    def set_fields(self, fields: dict) -> None:
        """Restore from ``state_fields`` output (names, not positions)."""
        missing = set(STATE_FIELDS) - set(fields)
        if missing:
            raise CacheStateError("STATE_FIELDS", f"TurboQuantKVCache state lacks {sorted(missing)}")
        for k in self._PACKED + self._FLOAT + RECENT_FIELDS:
            setattr(self, k, fields[k])
        self.key_mean, self.offset = fields["key_mean"], fields["offset"]
        self.meta_state = tuple(fields["meta_state"])

    @classmethod
    def from_fields(cls, fields: dict, version: int = STATE_VERSION) -> "TurboQuantKVCache":
        """A cache from named fields of schema ``version`` (CacheStateError if unknown)."""
        check_state_version(version)
        obj = cls.__new__(cls)
        obj.set_fields(fields)
        return obj

    def settings(self) -> dict:
        """``meta_state`` by name (``SETTINGS``), as strings."""
        return dict(zip(SETTINGS, self.meta_state))

    @property
    def nbytes(self):
        """Bytes of the allocated buffers (see the class docstring)."""
        names = self._PACKED + self._FLOAT + ("key_mean", "value_mean")
        return sum(getattr(self, k).nbytes for k in names if getattr(self, k) is not None) + recent.nbytes(self)

    @property
    def stored_nbytes(self):
        """Bytes of the ``offset`` stored tokens (plus the means, if any)."""
        total = sum(m.nbytes for m in (self.key_mean, self.value_mean) if m is not None) + recent.nbytes(self)
        for k in self._PACKED + self._FLOAT:
            a = getattr(self, k)
            if a is not None:
                total += a.nbytes // a.shape[2] * self.offset
        return total

    def __repr__(self):
        phase = "packed" if self.compressed else "float"
        return f"TurboQuantKVCache(k_bits={self.k_bits}, v_bits={self.v_bits}, quantized_start={self.quantized_start}, offset={self.offset}, {phase})"


# --- building caches for a model -------------------------------------------------------


def _global_layer_range(model, layers):
    total = getattr(model, "num_layers_total", None)
    kept = len(model.layers)
    if layers is None:
        layers = getattr(model, "layer_range", None)
    if layers is None:
        return 0, kept, kept
    start, end = (layers.start, layers.stop) if isinstance(layers, range) else tuple(layers)
    total = total if total is not None else max(end, kept)
    if not 0 <= start < end <= total or end - start != kept:
        raise ValueError(f"layers {start}..{end} must lie in 0..{total} and match the model's {kept} loaded layers")
    return start, end, total


def make_turbo_cache(model: nn.Module, k_bits=4, v_bits=4, fp16_layers=0, quantized_start=0, layers=None, layer_bits=None, preset=None,
                     **options) -> List:
    """One cache per loaded layer, usable as mlx-lm's ``prompt_cache``.

    Plain ``KVCache`` layers become ``TurboQuantKVCache(k_bits, v_bits,
    quantized_start, **options)``, except the first and last ``fp16_layers``
    attention layers of the full model, which stay ``KVCache``. Other cache types
    (sliding-window ``RotatingKVCache``, SSM ``ArraysCache``...) are kept.

    layers: the global (start, end) of the layers this model holds; defaults
    to ``model.layer_range`` for a pipeline shard (with ``model.num_layers_total``),
    else all layers. ``fp16_layers`` counts against the full model.
    layer_bits: {global layer: (k_bits, v_bits)} overriding the widths per layer.
    options: ``TurboQuantKVCache`` keywords (key_mean, sinks, window, codebook, rotate_values).
    preset: a name from ``presets.PRESETS`` ("best", "small"): its settings,
        which explicit keywords then override.
    """
    if preset is not None:  # the preset's widths, fp16 layers and layer bits; options add to its own
        p = presets.resolve(preset)
        k_bits, v_bits, fp16_layers, quantized_start = p.k_bits, p.v_bits, p.fp16_layers, p.quantized_start
        layer_bits, options = p.layer_bits_map(), {**p.cache_options(), **options}
    if fp16_layers < 0:
        raise ValueError(f"fp16_layers must be >= 0, got {fp16_layers}")
    layer_bits = dict(layer_bits or {})
    for kb, vb in [(k_bits, v_bits), *layer_bits.values()]:
        TurboQuantKVCache(kb, vb, quantized_start, **options)  # validate once
    start, end, total = _global_layer_range(model, layers)
    base = model.make_cache() if hasattr(model, "make_cache") else [KVCache() for _ in model.layers]
    if len(base) == total and total != end - start:
        full = base  # the model built caches for every global layer
        base = base[start:end]
    elif len(base) == end - start:
        # Layers outside the shard are taken to be attention layers.
        full = [KVCache() for _ in range(start)] + base + [KVCache() for _ in range(total - end)]
    else:
        raise ValueError(f"model.make_cache() gave {len(base)} caches for {end - start} layers")
    attn = [i for i, c in enumerate(full) if type(c) is KVCache]
    keep = set(attn[:fp16_layers]) | set(attn[len(attn) - fp16_layers :] if fp16_layers else [])
    out = []
    for i, c in zip(range(start, end), base):
        if type(c) is KVCache and i not in keep:
            c = TurboQuantKVCache(*layer_bits.get(i, (k_bits, v_bits)), quantized_start, **options)
        out.append(c)
    return out


def make_cache(model: nn.Module, kv_bits=None, k_bits=None, v_bits=None, **kwargs) -> List:
    """mlx-lm's default caches when no bits are given, else ``make_turbo_cache``.

    kv_bits sets both widths; k_bits / v_bits override it per side.
    """
    k_bits = k_bits if k_bits is not None else kv_bits
    v_bits = v_bits if v_bits is not None else kv_bits
    if k_bits is None and v_bits is None:
        if kwargs:
            raise ValueError(f"options {sorted(kwargs)} need kv_bits, k_bits or v_bits")
        start, end, total = _global_layer_range(model, None)
        caches = model.make_cache() if hasattr(model, "make_cache") else [KVCache() for _ in model.layers]
        return caches[start:end] if len(caches) == total != end - start else caches
    if k_bits is None or v_bits is None:
        raise ValueError(f"give both key and value bits, got k_bits={k_bits} v_bits={v_bits}")
    return make_turbo_cache(model, k_bits=k_bits, v_bits=v_bits, **kwargs)


# The one place TurboQuant touches mlx-lm's modules: the attention hook and the
# name load_prompt_cache looks cache classes up by.
attention.install()
mlx_cache.TurboQuantKVCache = TurboQuantKVCache
