"""KV transfer: a session's caches for a layer range as container bytes, and back.

A session's caches travel as one ``container`` (packed TurboQuant words and
fp16 scales, never re-expanded), streamed in crc32-checked chunks. A move is
pre-copied where the caches allow it: the bulk travels while the session keeps
generating (``export_session``), then only the positions generated since
(``delta``) follow and are appended (``append``) to the staged copy.
``merge``/``split`` join per-stage pieces into a whole session and back.

Plain functions over ``store.Session`` objects: the node runs them on its model
thread (``node/migration_rpc.py``), the cluster uses merge/split for snapshots
(``cluster/migration.py``).
"""


import mlx.core as mx
import numpy as np

from ..cache import kinds
from ..model.sampling import SamplingError, check as check_sampling, history_size
from ..transport import wire
from . import container as session_io
from .container import SessionFormatError
from .store import Session, SessionError

TURBO_CLASS = session_io.TURBO_CLASS
MAX_SESSION_ID = 256

# SessionFormatError fields that mean the bytes were damaged or cut short on the way.
_DAMAGED = ("stream", "sha256", "magic", "total_bytes", "container")
# ... and those that mean intact bytes this node cannot take (another model, codec, range).
_MISMATCH = ("meta.model", "meta.layers", "meta.format_version", "meta.container_version", "meta.delta_from")


def status_of(error):
    """The gRPC status name for an export or import failure.

    DATA_LOSS: the stream was corrupted or truncated; FAILED_PRECONDITION: an
    intact container for another model, codec version or layer range;
    INVALID_ARGUMENT: anything else malformed; a SessionError keeps its own code.
    """
    if isinstance(error, SessionError):
        return error.code
    if isinstance(error, SessionFormatError):
        if error.code == "TOO_LARGE":
            return "RESOURCE_EXHAUSTED"
        if error.code == "STATE_VERSION":
            return "FAILED_PRECONDITION"
        if error.field in _DAMAGED:
            return "DATA_LOSS"
        if error.field in _MISMATCH:
            return "FAILED_PRECONDITION"
    return "INVALID_ARGUMENT"


# --------------------------------------------------------------------------- node side: export


def compress(cache):
    """A TurboQuant cache still in its fp16 prefill phase, compressed; any other cache as it is.

    The copy holds the same positions as packed words, exactly as the cache
    itself would have encoded them on crossing ``quantized_start``; the source
    is not touched, so a failed transfer leaves it serving as before.
    """
    if not kinds.is_turbo(cache) or cache.compressed or cache.offset == 0:
        return cache
    out = type(cache)(cache.k_bits, cache.v_bits)
    out.meta_state = cache.meta_state  # every setting, whatever the class grows
    out.quantized_start = 0
    t = cache.offset
    out.update_and_fetch(cache.keys[..., :t, :], cache.values[..., :t, :])
    out.quantized_start = cache.quantized_start  # only read before compression: now just carried
    return out


def session_meta(session, model_identity, layers, token_ids=()):
    """The container meta for ``layers`` of ``session``: what the importer checks and rebuilds from."""
    rng = None if session.rng_state is None else [int(x) for x in np.array(session.rng_state).tolist()]
    return {
        "model": model_identity,
        "layers": tuple(layers),
        "num_tokens": session.offset,
        "token_ids": list(token_ids),
        "cache_config": dict(session.cache_config),
        "session_id": session.session_id,
        "max_context": session.max_context,
        "sampling": dict(session.sampling),
        "rng_key": rng,
        "history": [int(t) for t in session.history],  # the logits processors' recent ids (repetition penalty)
        "pending_token": session.pending_token,  # last stage: the sampled token not fed yet (a kept session's next input)
    }


def export_session(session, model_identity, held, layers=None, compress_prefill=True, from_token=0):
    """Container bytes for ``layers`` (global, within ``held``, the node's range) of ``session``.

    Run it on the model thread with ``session.lock`` held, so no step changes
    the caches mid-pack. Fp16-phase TurboQuant caches are compressed first
    (``compress``) unless ``compress_prefill`` is False. ``from_token > 0``
    sends only the positions from there on (``delta``), for a pre-copied move.
    """
    start, end = held
    layers = tuple(layers or held)
    if not (len(layers) == 2 and start <= layers[0] < layers[1] <= end):
        raise SessionError("INVALID_ARGUMENT", f"layers {layers[0]}:{layers[1]} must lie within this node's layers {start}:{end}")
    caches = session.caches[layers[0] - start : layers[1] - start]
    if compress_prefill:
        caches = [compress(c) for c in caches]
    meta = session_meta(session, model_identity, layers)
    if from_token:
        if not 0 < from_token <= session.offset:
            raise SessionError("OUT_OF_RANGE", f"from_token {from_token} is past the session's {session.offset} positions")
        caches = delta(caches, from_token)
        meta.update(num_tokens=session.offset - from_token, delta_from=from_token)
    return session_io.pack_session(caches, meta)


def delta(caches, start):
    """Caches holding only positions ``start..`` of ``caches``: what a pre-copied move sends last.

    Positions before ``start`` never change once written (caches only append),
    so they can travel first while the session keeps generating. Only KVCache
    and packed TurboQuant caches have such a tail; others must move whole.
    """
    from mlx_lm.models.cache import KVCache

    out = []
    for c in caches:
        kind, n = kinds.kind_of(c), c.offset - start
        if kind == kinds.KV:
            d = KVCache()
            if n:
                d.update_and_fetch(c.keys[..., start : c.offset, :], c.values[..., start : c.offset, :])
        elif kind == kinds.TURBO and (c.compressed or not n):
            d = type(c)(c.k_bits, c.v_bits)
            d.meta_state = c.meta_state
            if n:
                f = c.state_fields()
                f.update({k: f[k][..., start:, :] for k in c.PACKED_FIELDS}, offset=n)
                d.set_fields(f)
        else:
            phase = " in its fp16 phase" if kind == kinds.TURBO else ""
            raise SessionError("FAILED_PRECONDITION", f"a {kind or type(c).__name__}{phase} cannot be sent as a delta; move it whole")
        out.append(d)
    return out


def append(caches, tail):
    """Append ``tail`` (caches made by ``delta``) to ``caches`` (a staged session), in place. Model thread."""
    for c, d in zip(caches, tail):
        if type(c) is not type(d) or getattr(c, "meta_state", ()) != getattr(d, "meta_state", ()):
            raise SessionFormatError("caches", f"expected a delta of {type(c).__name__} {getattr(c, 'meta_state', '')}, found {type(d).__name__}")
        n = d.offset
        if not n:
            continue
        if kinds.kind_of(c) == kinds.KV:
            c.update_and_fetch(d.keys[..., :n, :], d.values[..., :n, :])
        else:
            f, add = c.state_fields(), d.state_fields()
            f.update({k: mx.concatenate([f[k], add[k]], axis=2) for k in c.PACKED_FIELDS}, offset=c.offset + n)
            f.update({k: add[k] for k in c.RECENT_FIELDS})  # the float16 sinks and window as the source holds them now
            c.set_fields(f)


def chunks(data, size=wire.CHUNK_BYTES):
    """``(index, piece, crc32)`` over a container, for a migration stream."""
    return session_io.session_chunks(data, size)


# --------------------------------------------------------------------------- node side: import


def receive(chunks, total_bytes, max_bytes=session_io.MAX_SESSION_BYTES):
    """The container bytes from a chunk stream, checking order, crc32 and size as chunks arrive.

    The network half of ``session_io.session_from_chunks``: it stops at the
    first bad chunk, before the rest is read. ``import_session`` does the other half.
    """
    if type(total_bytes) is not int or not session_io.HEADER_BYTES <= total_bytes <= max_bytes:
        raise SessionFormatError("total_bytes", f"expected {session_io.HEADER_BYTES}..{max_bytes}, found {total_bytes!r}")
    buf = bytearray(total_bytes)  # the declared size, already checked against the node's budget by the caller
    view, size = memoryview(buf), 0
    for expected_index, (index, piece, crc) in enumerate(chunks):
        if index != expected_index:
            raise SessionFormatError("stream", f"chunk {index} arrived where chunk {expected_index} was expected")
        if size + len(piece) > total_bytes:  # counted as it arrives: a body larger than announced stops here
            raise SessionFormatError("stream", f"the stream passes its announced {total_bytes} bytes at chunk {index}", code="TOO_LARGE")
        if wire.checksum(piece) != crc:
            raise SessionFormatError("stream", f"chunk {index} failed its checksum")
        view[size : size + len(piece)] = piece
        size += len(piece)
    if size != total_bytes:
        raise SessionFormatError("stream", f"stream announced {total_bytes} bytes, got {size}")
    return buf


def _check_extras(meta, max_context_limit):
    """The session fields a node needs besides the caches, checked; returns (max_context, sampling, rng, history)."""
    n = meta["num_tokens"]
    mc = meta.get("max_context", n)
    if type(mc) is not int or not max(n, 1) <= mc <= max_context_limit:
        raise SessionFormatError("meta.max_context", f"expected an int in {max(n, 1)}..{max_context_limit}, found {mc!r}")
    sampling = meta.get("sampling") or {}
    try:  # every mlx-lm sampler setting travels with the session (model/sampling.py checks them)
        sampling = check_sampling(sampling if isinstance(sampling, dict) else {"": sampling})
    except SamplingError as e:
        raise SessionFormatError("meta.sampling", f"{e}; found {meta.get('sampling')!r}") from None
    rng = meta.get("rng_key")
    if rng is not None and not (
        isinstance(rng, list) and len(rng) == 2 and all(type(x) is int and 0 <= x < 1 << 32 for x in rng)
    ):
        raise SessionFormatError("meta.rng_key", f"expected two 32-bit ints, found {rng!r}")
    history = meta.get("history") or []  # absent in containers from before it travelled
    n = history_size(sampling)
    if not (isinstance(history, list) and len(history) <= n and all(type(t) is int and 0 <= t < 1 << 32 for t in history)):
        raise SessionFormatError("meta.history", f"expected at most {n} 32-bit token ids (the sampling's look-back), found {history!r:.80}")
    pending = meta.get("pending_token")
    if pending is not None and not (type(pending) is int and 0 <= pending < 1 << 32):
        raise SessionFormatError("meta.pending_token", f"expected a 32-bit token id or nil, found {pending!r:.40}")
    return mc, sampling, rng, history


def restore_extras(session, meta) -> None:
    """Set ``session``'s sampler key and penalty history from a delta's meta (a staged copy's were older)."""
    _, _, rng, history = _check_extras(dict(meta, max_context=session.max_context), session.max_context)
    session.rng_state = session.rng_state if rng is None else mx.array(rng, dtype=mx.uint32)
    session.history = list(history)
    session.pending_token = meta.get("pending_token")


def import_session(data, expect, kv_bytes, session_id="", next_address="", max_context_limit=1 << 20):
    """A ``Session`` built from container bytes, or SessionFormatError naming the field.

    ``expect`` pins meta fields (``{"model": identity, "layers": (start, end)}``);
    the container's versions are always checked. ``kv_bytes(max_context,
    cache_config)`` is what the node reserves for it. ``session_id`` overrides
    the container's. Run it on the model thread; nothing is installed here:
    hand the result to ``SessionStore.add``, which adds it whole or not at all.
    """
    caches, meta = session_io.unpack_session(data, expect)
    max_context, sampling, rng, history = _check_extras(meta, max_context_limit)
    sid = session_id or meta.get("session_id") or ""
    if not isinstance(sid, str) or not 0 < len(sid) <= MAX_SESSION_ID:
        raise SessionFormatError("meta.session_id", f"expected a string of 1..{MAX_SESSION_ID} characters, found {sid!r}")
    return Session(
        session_id=sid,
        max_context=max_context,
        caches=caches,
        cache_config=dict(meta["cache_config"]),
        kv_bytes_reserved=kv_bytes(max_context, meta["cache_config"]),
        next_address=next_address,
        sampling=sampling,
        rng_state=None if rng is None else mx.array(rng, dtype=mx.uint32),
        history=history,
        pending_token=meta.get("pending_token"),
    )


# --------------------------------------------------------------------------- whole sessions


def merge(parts):
    """One container for a whole route from per-stage ``(caches, meta)`` pieces, in layer order.

    The pieces must agree on model, token count, session and settings, and
    their layer ranges must follow each other. Returns ``(caches, meta)``.
    """
    if not parts:
        raise ValueError("expected at least one piece to merge, found none")
    caches, meta = list(parts[0][0]), dict(parts[0][1])
    for i, (c, m) in enumerate(parts[1:], 1):
        if m["layers"][0] != meta["layers"][1]:
            raise SessionFormatError(f"parts[{i}].layers", f"expected a range starting at {meta['layers'][1]}, found {m['layers']}")
        for key in ("model", "num_tokens", "session_id", "max_context"):
            if m.get(key) != meta.get(key):
                raise SessionFormatError(f"parts[{i}].{key}", f"expected {meta.get(key)!r} as in parts[0], found {m.get(key)!r}")
        caches += c
        meta["layers"] = (meta["layers"][0], m["layers"][1])
        meta["token_ids"] = meta["token_ids"] or m["token_ids"]
        if m["layers"][1] == meta["layers"][1]:  # the last stage samples: its settings win
            meta["sampling"], meta["rng_key"], meta["history"] = m.get("sampling"), m.get("rng_key"), m.get("history", [])
            meta["pending_token"] = m.get("pending_token")
    return caches, meta


def split(caches, meta, layers):
    """``(caches, meta)`` for the sub-range ``layers`` of a merged session."""
    start, end = meta["layers"]
    a, b = layers
    if not start <= a < b <= end:
        raise SessionFormatError("layers", f"expected a range within {start}:{end}, found {a}:{b}")
    part = dict(meta, layers=(a, b))
    if a != 0:
        part["token_ids"] = []  # only the first stage sees ids
    for key in ("container_version", "format_version"):
        part.pop(key, None)  # pack_session writes its own
    return caches[a - start : b - start], part
