"""The session container: a node's KV caches plus what they belong to, as one blob.

The same bytes are the payload of a live migration and the on-disk snapshot,
so a session can move between nodes or survive a restart. A container is::

    b"TCSESS01" | sha256(body) (32 bytes) | body (msgpack)

and the body is ``{"meta": {...}, "caches": [{"class", "meta_state", "state"}]}``
(``docs/session-format.md`` spells out every field). Caches are described by
mlx-lm's cache protocol, so any allow-listed cache class travels unchanged;
packed TurboQuant KV travels as its uint32 words and fp16 scales, never
re-expanded. Arrays are encoded by ``wire.tensor_to_bytes``.

Unpacking checks the checksum, versions, the caller's expectations and the
shape of every cache before building anything, and builds only classes from
the allow-list: the name of a class from the network is looked up, never
imported or evaluated.
"""

import hashlib
import inspect
import math
import os
import stat
import tempfile

import mlx.core as mx
import msgpack
from ...kernels import turboquant as tq
from ..cache import kinds
from ..cache import turbo_cache as turbo
from ..transport import wire

CONTAINER_VERSION = 1
MAGIC = b"TCSESS01"
HEADER_BYTES = len(MAGIC) + 32
MAX_SESSION_BYTES = 1 << 34  # 16 GiB: a long context over many layers, not more
MAX_DEPTH = 3  # state -> (keys, scales, biases) -> array: no cache nests deeper
MAX_TOKEN_ID = 1 << 32

TURBO_CLASS = kinds.TURBO  # kept for callers that name the kind
TURBO_MODULE = turbo.__name__  # kept for callers that import it
ALLOWED_CLASSES = kinds.KINDS  # the registry's kind codes (``cache.kinds``)

# Field kinds of each mlx-lm cache's ``state``, in order. ``kv`` is a float
# (B, H, S, D) array, ``qkv`` the (words, scales, biases) of mx.quantize.
_LAYOUTS = {
    "KVCache": ("kv", "kv", "offset"),
    "ChunkedKVCache": ("kv", "kv", "offset", "chunk_size", "start_position"),
    "RotatingKVCache": ("kv", "kv", "offset", "keep", "max_size", "idx"),
    "QuantizedKVCache": ("qkv", "qkv", "offset", "group_size", "bits"),
}
_FLOATS = (mx.float16, mx.bfloat16, mx.float32)
_QUANT_BITS = (1, 2, 3, 4, 5, 6, 8)  # what mx.quantize supports
_QUANT_GROUPS = (32, 64, 128)
_UNPACK_LIMITS = dict(
    max_bin_len=wire.MAX_TENSOR_BYTES,
    max_str_len=1 << 20,
    max_array_len=1 << 24,
    max_map_len=1 << 10,
    max_ext_len=0,  # no extension types, timestamps included
)


class SessionFormatError(ValueError):
    """A session container is corrupt, from elsewhere, or not what was expected.

    ``field`` names the offending part, e.g. ``meta.model`` or ``caches[3].state[0]``.
    """

    def __init__(self, field, detail, code=None):
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.code = code  # e.g. turbo_cache's STATE_VERSION, or TOO_LARGE: for control flow, never the text


def cache_class(name, field="class"):
    """The registered cache class of kind ``name`` (``cache.kinds``); no other is ever built."""
    cls = kinds.class_of(name)
    if cls is None:
        raise SessionFormatError(field, f"expected one of {list(kinds.KINDS)}, found {name!r}")
    return cls


# -- meta -----------------------------------------------------------------


def _is_int(x):
    return type(x) is int


def _check_meta(meta):
    """Check the fields every container carries; returns a normalised copy."""
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise SessionFormatError("meta", f"expected a map with string keys, found {type(meta).__name__}")
    meta = dict(meta)
    for key, want in (("container_version", CONTAINER_VERSION), ("format_version", tq.FORMAT_VERSION)):
        if not _is_int(meta.get(key)) or meta[key] != want:
            raise SessionFormatError(f"meta.{key}", f"expected {want}, found {meta.get(key)!r}")
    model = meta.get("model")
    if not isinstance(model, str) or not model:
        raise SessionFormatError("meta.model", f"expected a non-empty string, found {model!r}")
    layers = meta.get("layers")
    if (
        not isinstance(layers, (list, tuple))
        or len(layers) != 2
        or not all(_is_int(x) for x in layers)
        or not 0 <= layers[0] < layers[1]
    ):
        raise SessionFormatError("meta.layers", f"expected [start, end] with 0 <= start < end, found {layers!r}")
    meta["layers"] = tuple(layers)
    n = meta.get("num_tokens")
    if not _is_int(n) or n < 0:
        raise SessionFormatError("meta.num_tokens", f"expected a non-negative int, found {n!r}")
    ids = meta.get("token_ids", [])
    if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and 0 <= t < MAX_TOKEN_ID for t in ids):
        raise SessionFormatError("meta.token_ids", "expected a list of non-negative 32-bit ints")
    if len(ids) not in (0, n):
        # Empty when this stage never sees token ids (a middle pipeline stage).
        raise SessionFormatError("meta.token_ids", f"expected 0 or num_tokens={n} ids, found {len(ids)}")
    meta["token_ids"] = list(ids)
    config = meta.get("cache_config", {})
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise SessionFormatError("meta.cache_config", f"expected a map with string keys, found {type(config).__name__}")
    meta["cache_config"] = config
    return meta


def _plain(x):
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def check_expected(meta, expect):
    """Raise unless every field in ``expect`` equals the one in ``meta``."""
    for key, want in (expect or {}).items():
        found = meta.get(key)
        if _plain(found) != _plain(want):
            raise SessionFormatError(f"meta.{key}", f"expected {want!r}, found {found!r}")


# -- cache state ------------------------------------------------------------


def _arrays(x):
    """The arrays of a ``kv`` or ``qkv`` field, or None when the cache is empty."""
    if x is None or isinstance(x, mx.array):
        return x if x is None else (x,)
    if isinstance(x, (tuple, list)) and all(isinstance(a, mx.array) for a in x):
        return tuple(x)
    return False


def _check_kv(state, kinds, where):
    """Keys and values agree with each other and with the scalar fields."""
    fields = dict(zip(kinds, state))
    keys, values = _arrays(state[0]), _arrays(state[1])
    for i, (kind, arrs) in enumerate(zip(kinds, (keys, values))):
        if arrs is False:
            raise SessionFormatError(f"{where}[{i}]", "expected arrays or None")
        want = 3 if kind == "qkv" else 1
        if arrs is not None and (len(arrs) != want or any(a.ndim != 4 for a in arrs)):
            found = [a.shape for a in arrs]
            raise SessionFormatError(f"{where}[{i}]", f"expected {want} (B, H, S, D) arrays, found shapes {found}")
    for i, kind in enumerate(kinds[2:], 2):
        if not _is_int(state[i]) or state[i] < 0:
            raise SessionFormatError(f"{where}[{i}]", f"expected {kind} as a non-negative int, found {state[i]!r}")
    offset = fields["offset"]
    if keys is None or values is None:
        if keys is not values or offset != 0:
            raise SessionFormatError(where, f"an empty cache needs no keys, no values and offset 0, found offset {offset}")
        return
    lead = {a.shape[:3] for a in keys + values}
    if len(lead) != 1:
        raise SessionFormatError(where, f"keys and values must agree on (B, H, S), found {sorted(lead)}")
    size = lead.pop()[2]
    if kinds[0] == "kv":
        dtypes = {a.dtype for a in keys + values}
        if len(dtypes) != 1 or not dtypes <= set(_FLOATS):
            raise SessionFormatError(where, f"expected keys and values of one float dtype, found {sorted(map(str, dtypes))}")
    else:
        bits, group = fields["bits"], fields["group_size"]
        if bits not in _QUANT_BITS or group not in _QUANT_GROUPS:
            raise SessionFormatError(where, f"expected bits in {_QUANT_BITS} and group_size in {_QUANT_GROUPS}, found {bits} and {group}")
        for i, (w, s, b) in enumerate((keys, values)):
            if w.dtype != mx.uint32 or s.shape != b.shape or s.dtype != b.dtype or s.dtype not in _FLOATS:
                raise SessionFormatError(f"{where}[{i}]", "expected uint32 words and float scales and biases of one shape")
            if w.shape[-1] * 32 != s.shape[-1] * group * bits:
                raise SessionFormatError(
                    f"{where}[{i}]", f"{w.shape[-1]} words do not hold {s.shape[-1]} groups of {group} {bits}-bit values"
                )
    if "max_size" in fields:
        keep, max_size, idx = fields["keep"], fields["max_size"], fields["idx"]
        if not keep <= max_size > 0 or idx > size:
            raise SessionFormatError(
                where, f"expected keep <= max_size > 0 and idx <= {size}, found keep={keep} max_size={max_size} idx={idx}"
            )
    elif not 0 <= offset - fields.get("start_position", 0) <= size:
        raise SessionFormatError(where, f"offset {offset} is outside the {size} cached positions")


def _head(x, n):
    if isinstance(x, (tuple, list)):
        return tuple(a[..., :n, :] for a in x)
    return x[..., :n, :]


def _compact(name, state):
    """Drop the unused tail that mlx-lm preallocates, so it does not travel."""
    if name in (kinds.KV, kinds.QUANTIZED) and state[0] is not None:
        n = state[2]
        return (_head(state[0], n), _head(state[1], n), *state[2:])
    return state


def _check_turbo(cls, state, where, version=turbo.STATE_VERSION):
    """TurboQuantKVCache: its named state (``turbo_cache.STATE_FIELDS``), checked field by field."""
    try:
        f = turbo.named_state(state, version)
    except turbo.CacheStateError as e:
        raise SessionFormatError(where, str(e), code=e.code) from e
    at = lambda name: f"{where}[{turbo.state_position(name)}]"
    meta, mean, offset = f["meta_state"], f["key_mean"], f["offset"]
    if not isinstance(meta, tuple) or len(meta) != len(turbo.SETTINGS) or not all(isinstance(m, str) for m in meta):
        raise SessionFormatError(at("meta_state"), f"expected {len(turbo.SETTINGS)} strings {turbo.SETTINGS}, found {meta!r}")
    st = dict(zip(turbo.SETTINGS, meta))
    flags_ok = st["rotate_values"] in ("0", "1") and st["key_mean"] in ("0", "1")
    if not flags_ok or not all(st[k].isdigit() and len(st[k]) < 8 for k in ("k_bits", "v_bits", "quantized_start", "sinks", "window")):
        raise SessionFormatError(at("meta_state"), f"expected decimal bits and start and 0/1 flags, found {meta!r}")
    k_bits, v_bits = int(st["k_bits"]), int(st["v_bits"])
    try:  # the constructor is what knows the valid settings
        cls(k_bits, v_bits, int(st["quantized_start"]), key_mean=st["key_mean"] == "1", codebook=st["codebook"], rotate_values=st["rotate_values"] == "1",
            sinks=int(st["sinks"]), window=int(st["window"]))
    except ValueError as e:
        raise SessionFormatError(at("meta_state"), str(e)) from e
    if not _is_int(offset) or offset < 0:
        raise SessionFormatError(at("offset"), f"expected offset as a non-negative int, found {offset!r}")
    packed = [f[k] for k in turbo.PACKED_FIELDS]
    floats = [f[k] for k in turbo.FLOAT_FIELDS]
    arrays = packed + floats
    ends = [f[k] for k in turbo.RECENT_FIELDS]  # the float16 sinks and window: packed phase only
    if any(a is not None for a in ends) and not all(isinstance(a, mx.array) for a in packed):
        raise SessionFormatError(at("sink_keys"), "float16 sinks or window need the packed arrays")
    if all(a is None for a in arrays):
        if offset != 0 or mean is not None:
            raise SessionFormatError(where, f"an empty cache needs offset 0 and no key mean, found offset {offset}")
        return
    if all(a is None for a in floats) and all(isinstance(a, mx.array) for a in packed):
        kp, ks, vp, vs = packed
        lead = {a.shape[:3] if a.ndim == 4 else a.shape for a in packed}
        if len(lead) != 1 or next(iter(lead)) != (*kp.shape[:2], offset) or ks.shape[3:] != (1,) or vs.shape[3:] != (1,):
            found = [a.shape for a in packed]
            raise SessionFormatError(where, f"expected packed words and (B, H, {offset}, 1) scales agreeing on (B, H, S), found {found}")
        if kp.dtype != mx.uint32 or vp.dtype != mx.uint32 or ks.dtype != mx.float16 or vs.dtype != mx.float16:
            raise SessionFormatError(where, "expected uint32 packed words and float16 scales")
        try:
            k_dim = tq.dim_from_words(kp.shape[3], k_bits)
            tq.dim_from_words(vp.shape[3], v_bits)
        except ValueError as e:
            raise SessionFormatError(where, str(e)) from e
        if mean is not None and (
            not isinstance(mean, mx.array) or mean.dtype != mx.float16 or mean.shape != (*kp.shape[:2], 1, k_dim)
        ):
            raise SessionFormatError(at("key_mean"), f"expected a float16 key mean of shape {(*kp.shape[:2], 1, k_dim)}")
        try:
            turbo.recent.check_fields(f, int(st["sinks"]), int(st["window"]), kp.shape[:2], k_dim, tq.dim_from_words(vp.shape[3], v_bits))
        except ValueError as e:
            raise SessionFormatError(at("sink_keys"), str(e)) from e
        return
    if all(a is None for a in packed) and mean is None:
        _check_kv((*floats, offset), ("kv", "kv", "offset"), where)
        if floats[0].shape[2] != offset:
            raise SessionFormatError(where, f"expected {offset} cached positions, found {floats[0].shape[2]}")
        return
    raise SessionFormatError(where, "expected either the packed arrays or the float keys and values, not both or a mix")


def _check_cache(cls, state, meta_state, where, version=turbo.STATE_VERSION):
    if not isinstance(meta_state, (list, tuple)) or not all(isinstance(s, str) for s in meta_state):
        raise SessionFormatError(f"{where}.meta_state", "expected a list of strings")
    name = kinds.kind_of_class(cls)
    if name == kinds.TURBO:
        return _check_turbo(cls, state, f"{where}.state", version)
    layout = _LAYOUTS[name]
    if len(state) != len(layout):
        raise SessionFormatError(f"{where}.state", f"{name} expects {len(layout)} fields {layout}, found {len(state)}")
    _check_kv(state, layout, f"{where}.state")


def _check_offset(cache, num_tokens, where):
    offset = getattr(cache, "offset", num_tokens)
    if offset != num_tokens:
        raise SessionFormatError(f"{where}.offset", f"expected meta.num_tokens={num_tokens}, found {offset!r}")


def _build(cls, state, meta_state, where):
    """``cls.from_state``, passing ``meta_state`` the way the class takes it."""
    try:
        if len(inspect.signature(cls.from_state).parameters) >= 2:  # mlx-lm before meta_state moved into state
            return cls.from_state(state, meta_state)
        obj = cls.from_state(state)
    except (ValueError, TypeError, IndexError) as e:
        raise SessionFormatError(where, f"{cls.__name__}.from_state refused the state: {e}") from e
    # The state restores everything; meta_state, where the class has one, only cross-checks it.
    if tuple(getattr(obj, "meta_state", None) or ()) != tuple(meta_state):
        raise SessionFormatError(f"{where}.meta_state", f"does not agree with the state: {list(meta_state)}")
    return obj


# -- encoding -----------------------------------------------------------------


def _encode(x, where):
    if isinstance(x, mx.array):
        code, shape, data = wire.tensor_to_bytes(x)
        return {"dtype": code, "shape": list(shape), "data": data}
    if isinstance(x, (tuple, list)):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise SessionFormatError(where, f"expected arrays, numbers, strings or None, found {type(x).__name__}")


def _decode(x, where, depth=0):
    if isinstance(x, dict):
        if set(x) != {"dtype", "shape", "data"}:
            raise SessionFormatError(where, f"expected a tensor map with dtype, shape and data, found keys {sorted(map(str, x))}")
        code, shape, data = x["dtype"], x["shape"], x["data"]
        if (
            not _is_int(code)
            or not isinstance(shape, list)
            or not all(_is_int(d) for d in shape)
            or not isinstance(data, bytes)
        ):
            raise SessionFormatError(where, "expected an int dtype, a list-of-ints shape and bytes data")
        if math.prod(max(d, 1) for d in shape) > wire.MAX_TENSOR_BYTES:
            # Even with a zero dim: numpy and mlx refuse such shapes with errors of their own.
            raise SessionFormatError(where, f"shape {shape} is beyond any tensor a cache holds")
        try:
            return wire.tensor_from_bytes(code, shape, data)
        except wire.WireError as e:
            raise SessionFormatError(where, str(e)) from e
    if isinstance(x, list):
        if depth >= MAX_DEPTH:
            raise SessionFormatError(where, f"nested deeper than {MAX_DEPTH} levels")
        return tuple(_decode(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(x))
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise SessionFormatError(where, f"expected a tensor, list, number, string or nil, found {type(x).__name__}")


# -- the container ----------------------------------------------------------------


def pack_session(caches, meta):
    """The container bytes for ``caches`` (one per layer in ``meta["layers"]``).

    ``meta`` needs ``model``, ``layers`` (start, end) and ``num_tokens``, and may
    carry ``token_ids``, ``cache_config`` and extra plain fields; the versions
    are added here. The caches are checked as the receiver will check them.
    """
    meta = _check_meta({"container_version": CONTAINER_VERSION, "format_version": tq.FORMAT_VERSION, **meta})
    meta["cache_state_version"] = turbo.STATE_VERSION
    start, end = meta["layers"]
    if len(caches) != end - start:
        raise SessionFormatError("caches", f"expected {end - start} caches for layers {start}..{end}, found {len(caches)}")
    entries = []
    for i, c in enumerate(caches):
        where, name = f"caches[{i}]", kinds.kind_of(c)
        if name is None:
            raise SessionFormatError(f"{where}.class", f"expected one of {list(ALLOWED_CLASSES)}, found {type(c)}")
        state = _compact(name, tuple(c.state))
        meta_state = list(getattr(c, "meta_state", None) or ())
        _check_cache(type(c), state, meta_state, where)
        _check_offset(c, meta["num_tokens"], where)
        entries.append({"class": name, "meta_state": meta_state, "state": _encode(state, f"{where}.state")})
    meta["layers"] = list(meta["layers"])
    try:
        body = msgpack.packb({"meta": meta, "caches": entries}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise SessionFormatError("meta", f"expected plain msgpack values: {e}") from e
    return MAGIC + hashlib.sha256(body).digest() + body


def _parse(data):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SessionFormatError("container", f"expected bytes, found {type(data).__name__}")
    data = memoryview(data)
    if len(data) < HEADER_BYTES or bytes(data[: len(MAGIC)]) != MAGIC:
        raise SessionFormatError("magic", f"expected a container starting {MAGIC!r}, found {bytes(data[:len(MAGIC)])!r}")
    body = data[HEADER_BYTES:]
    if hashlib.sha256(body).digest() != bytes(data[len(MAGIC) : HEADER_BYTES]):
        raise SessionFormatError("sha256", f"the {len(body)}-byte body does not match its checksum (corrupt or truncated)")
    try:
        doc = msgpack.unpackb(body, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except (ValueError, msgpack.UnpackException) as e:
        raise SessionFormatError("body", f"not valid msgpack within limits: {e}") from e
    if not isinstance(doc, dict) or set(doc) != {"meta", "caches"}:
        found = sorted(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
        raise SessionFormatError("body", f"expected a map with keys caches and meta, found {found}")
    return doc


def unpack_session(data, expect=None):
    """``(caches, meta)`` from container bytes, or SessionFormatError naming the field.

    ``expect`` maps meta fields to the values they must have, e.g.
    ``{"model": ident, "layers": (0, 16)}``. Nothing is returned half-built.
    """
    doc = _parse(data)
    meta = _check_meta(doc["meta"])
    check_expected(meta, expect)
    entries = doc["caches"]
    version = meta.get("cache_state_version", turbo.STATE_VERSION)  # containers before the field held version 1
    start, end = meta["layers"]
    if not isinstance(entries, list) or len(entries) != end - start:
        found = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise SessionFormatError("caches", f"expected {end - start} caches for layers {start}..{end}, found {found}")
    caches = []
    for i, entry in enumerate(entries):
        where = f"caches[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"class", "meta_state", "state"}:
            raise SessionFormatError(where, "expected a map with keys class, meta_state and state")
        name, meta_state, state = entry["class"], entry["meta_state"], entry["state"]
        if not isinstance(name, str):
            raise SessionFormatError(f"{where}.class", f"expected a string, found {type(name).__name__}")
        cls = cache_class(name, f"{where}.class")
        if not isinstance(state, list):
            raise SessionFormatError(f"{where}.state", f"expected a list, found {type(state).__name__}")
        state = list(_decode(state, f"{where}.state"))
        if kinds.kind_of_class(cls) == kinds.TURBO and version != turbo.STATE_VERSION:  # an older schema, in today's positions
            state, meta_state, version = turbo.upgrade_state(state, version, meta_state)
        _check_cache(cls, state, meta_state, where, version)
        cache = _build(cls, state, tuple(meta_state), where)
        _check_offset(cache, meta["num_tokens"], where)
        caches.append(cache)
    return caches, meta


# -- streaming and snapshots ------------------------------------------------------


def session_chunks(data, size=wire.CHUNK_BYTES):
    """``(index, piece, crc32)`` chunks of a container, for a migration stream."""
    return wire.split_chunks(data, size)


def session_from_chunks(chunks, total_bytes, expect=None, max_bytes=MAX_SESSION_BYTES):
    """A complete session from a chunk stream, or an error: never a partial one."""
    if not _is_int(total_bytes) or not HEADER_BYTES <= total_bytes <= max_bytes:
        raise SessionFormatError("total_bytes", f"expected {HEADER_BYTES}..{max_bytes}, found {total_bytes!r}")
    try:
        data = wire.join_chunks(chunks, total_bytes, max_bytes=total_bytes)
    except wire.WireError as e:
        raise SessionFormatError("stream", str(e)) from e
    return unpack_session(data, expect)


def save_snapshot(path, caches, meta):
    """Write a container to ``path`` atomically: the old file or the new, never half."""
    data = pack_session(caches, meta)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return len(data)


def load_snapshot(path, expect=None, max_bytes=MAX_SESSION_BYTES):
    """``(caches, meta)`` from a snapshot written by ``save_snapshot``.

    The size is checked before anything is read, and the read itself is capped:
    a device or pipe (``/dev/zero``) is refused, never read until memory runs out.
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SessionFormatError("container", f"snapshot {path} is not a regular file", code="TOO_LARGE")
        if st.st_size > max_bytes:
            raise SessionFormatError("container", f"snapshot {path} is {st.st_size} bytes, over the {max_bytes}-byte cap", code="TOO_LARGE")
        data = f.read(st.st_size + 1)
    if len(data) > st.st_size:
        raise SessionFormatError("container", f"snapshot {path} grew while it was read", code="TOO_LARGE")
    return unpack_session(data, expect)
