"""Moving a live session's packed KV between nodes: export, import, handoff, snapshot.

A session's caches for a layer range travel as one ``session_io`` container
(packed TurboQuant words and fp16 scales, never re-expanded), streamed in
crc32-checked chunks. The exporter keeps serving the session until the
importer has checked every chunk, the container's sha256, its meta (model
identity, layer range, codec and container versions) and every cache, and has
added the session to its store in one step; only then does the coordinator
reroute the pipeline and drop the old copy. A transfer that fails at any
point leaves the source as it was and the target with nothing.

A move is pre-copied where the caches allow it: the bulk of the KV travels
while the session keeps generating and the target holds it unserved
("staged"); between two tokens only the positions generated since (the
tail) follow, so the pause does not grow with the context.

This module holds the node-side steps as plain functions over a
``sessions.Session`` (the servicer runs them on its model thread and maps
``status_of(error)`` to a gRPC status) and, below them, the coordinator-side
orchestration over ``node.NodeClient`` connections.
"""

import math
import threading
import time
from dataclasses import dataclass, field

import grpc
import mlx.core as mx
import numpy as np

from ...kernels.turboquant import FORMAT_VERSION
from ...proto import turbo_pb2 as pb
from . import container as session_io
from ..model import shard as stage
from ..transport import wire
from .container import SessionFormatError
from .store import Session, SessionError

TURBO_CLASS = session_io.TURBO_CLASS
MAX_SESSION_ID = 256
TRANSFER_TIMEOUT = 300.0  # seconds for one export, import or push: a long context over a slow link

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
    if type(cache).__name__ != TURBO_CLASS or cache.compressed or cache.offset == 0:
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
        name, n = type(c).__name__, c.offset - start
        if name == "KVCache":
            d = KVCache()
            if n:
                d.update_and_fetch(c.keys[..., start : c.offset, :], c.values[..., start : c.offset, :])
        elif name == TURBO_CLASS and (c.compressed or not n):
            d = type(c)(c.k_bits, c.v_bits)
            d.meta_state = c.meta_state
            if n:
                st = list(c.state)  # packed words and scales first, offset second to last
                st[:4] = [a[..., start:, :] for a in st[:4]]
                st[-2] = n
                d.state = tuple(st)
        else:
            raise SessionError("FAILED_PRECONDITION", f"a {name}{'' if name != TURBO_CLASS else ' in its fp16 phase'} cannot be sent as a delta; move it whole")
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
        if type(c).__name__ == "KVCache":
            c.update_and_fetch(d.keys[..., :n, :], d.values[..., :n, :])
        else:
            st, add = list(c.state), list(d.state)
            st[:4] = [mx.concatenate([a, b], axis=2) for a, b in zip(st[:4], add[:4])]
            st[-2] = c.offset + n
            c.state = tuple(st)


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
    try:
        return wire.join_chunks(chunks, total_bytes, max_bytes=total_bytes)
    except wire.WireError as e:
        raise SessionFormatError("stream", str(e)) from e


def _check_extras(meta, max_context_limit):
    """The session fields a node needs besides the caches, checked; returns (max_context, sampling, rng)."""
    n = meta["num_tokens"]
    mc = meta.get("max_context", n)
    if type(mc) is not int or not max(n, 1) <= mc <= max_context_limit:
        raise SessionFormatError("meta.max_context", f"expected an int in {max(n, 1)}..{max_context_limit}, found {mc!r}")
    sampling = meta.get("sampling") or {}
    t = sampling.get("temperature", 0.0) if isinstance(sampling, dict) else None
    p = sampling.get("top_p", 0.0) if isinstance(sampling, dict) else None
    if not (isinstance(t, (int, float)) and isinstance(p, (int, float)) and math.isfinite(t) and t >= 0 and 0 <= p <= 1):
        raise SessionFormatError("meta.sampling", f"expected {{temperature >= 0, 0 <= top_p <= 1}}, found {sampling!r}")
    rng = meta.get("rng_key")
    if rng is not None and not (
        isinstance(rng, list) and len(rng) == 2 and all(type(x) is int and 0 <= x < 1 << 32 for x in rng)
    ):
        raise SessionFormatError("meta.rng_key", f"expected two 32-bit ints, found {rng!r}")
    return mc, {"temperature": float(t), "top_p": float(p)}, rng


def import_session(data, expect, kv_bytes, session_id="", next_address="", max_context_limit=1 << 20):
    """A ``Session`` built from container bytes, or SessionFormatError naming the field.

    ``expect`` pins meta fields (``{"model": identity, "layers": (start, end)}``);
    the container's versions are always checked. ``kv_bytes(max_context,
    cache_config)`` is what the node reserves for it. ``session_id`` overrides
    the container's. Run it on the model thread; nothing is installed here:
    hand the result to ``SessionStore.add``, which adds it whole or not at all.
    """
    caches, meta = session_io.unpack_session(data, expect)
    max_context, sampling, rng = _check_extras(meta, max_context_limit)
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
            meta["sampling"], meta["rng_key"] = m.get("sampling"), m.get("rng_key")
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



# --------------------------------------------------------------------------- node side: RPC bodies
# The servicer's ExportSession / ImportSession / PushSession / RerouteSession
# call these; refusals are SessionError (status name, message).


def _refuse(error):
    """A SessionFormatError as the SessionError the servicer answers with."""
    return SessionError(status_of(error), str(error))


def _held(node):
    model = node._need_model()
    start, end, _ = stage.layer_range(model)
    return model, (start, end)


def _export_on_node(node, session_id, layer_start, layer_end, keep_prefill, from_token=0):
    """``(header, data)`` for an export, packed on the model thread with the session's lock held."""
    _, held = _held(node)
    session = node.sessions.get(session_id)
    layers = (layer_start, layer_end) if layer_end else held
    with session.lock:
        try:
            data = node.run_on_model_thread(
                export_session, session, node.desc["identity"], held, layers, not keep_prefill, from_token
            )
        except SessionFormatError as e:
            raise _refuse(e) from e
        header = pb.SessionHeader(
            total_bytes=len(data),
            session_id=session.session_id,
            model_identity=node.desc["identity"],
            layer_start=layers[0],
            layer_end=layers[1],
            num_tokens=session.offset - from_token,
            format_version=FORMAT_VERSION,
            container_version=session_io.CONTAINER_VERSION,
        )
    return header, data


def serve_export(node, request):
    """ExportSession: a header message, then the container in crc32-checked chunks."""
    header, data = _export_on_node(
        node, request.session_id, request.layer_start, request.layer_end, request.keep_prefill, request.from_token
    )
    header.append = request.from_token > 0
    yield pb.SessionChunk(header=header)
    for index, piece, crc in chunks(data):
        yield pb.SessionChunk(chunk=pb.Chunk(index=index, data=piece, crc32=crc))


def _check_header(node, header, held):
    """Refuse a stream for another model, codec, layer range or size before reading its chunks."""
    want = {
        "model_identity": node.desc["identity"],
        "format_version": FORMAT_VERSION,
        "container_version": session_io.CONTAINER_VERSION,
        "layer_start": held[0],
        "layer_end": held[1],
    }
    for key, value in want.items():
        found = getattr(header, key)
        if found != value:
            raise SessionError("FAILED_PRECONDITION", f"header.{key}: expected {value!r}, found {found!r}")
    if not session_io.HEADER_BYTES <= header.total_bytes <= session_io.MAX_SESSION_BYTES:
        raise SessionError(
            "INVALID_ARGUMENT", f"header.total_bytes: expected {session_io.HEADER_BYTES}..{session_io.MAX_SESSION_BYTES}, found {header.total_bytes}"
        )


def serve_import(node, messages):
    """ImportSession: check the header, receive every chunk, rebuild, then add the session in one step.

    ``header.stage`` holds the rebuilt session aside instead (a pre-copy);
    ``header.append`` appends the container to the staged session of that id and installs it.
    """
    model, held = _held(node)
    first = next(messages, None)
    if first is None or not first.HasField("header"):
        raise SessionError("INVALID_ARGUMENT", "ImportSession must start with a header message")
    header = first.header
    _check_header(node, header, held)
    if header.next_address and stage.is_last(model):
        raise SessionError("INVALID_ARGUMENT", "the last node of the model cannot have a next node")
    if header.stage and header.append:
        raise SessionError("INVALID_ARGUMENT", "a session stream either stages a copy or appends to one, not both")
    if header.stage and header.session_id in {s.session_id for s in node.sessions.list()}:
        raise SessionError("ALREADY_EXISTS", f"session {header.session_id!r} already exists")

    def pieces():
        for m in messages:
            if not m.HasField("chunk"):
                raise SessionFormatError("stream", "every ImportSession message after the header must carry a chunk")
            yield m.chunk.index, m.chunk.data, m.chunk.crc32

    expect = {"model": node.desc["identity"], "layers": held, "num_tokens": header.num_tokens}
    staged = _staged(node)
    try:
        data = receive(pieces(), header.total_bytes)
        if header.append:
            with staged.lock:
                session = staged.sessions.pop(header.session_id, None)
            if session is None:
                raise SessionError("FAILED_PRECONDITION", f"no staged session {header.session_id!r} to append to; stage it first")
            node.run_on_model_thread(_append_delta, session, data, expect)
            session.next_address = header.next_address
        else:
            with staged.lock:
                staged.sessions.pop(header.session_id, None)  # a whole copy replaces a staged one
            session = node.run_on_model_thread(
                import_session, data, expect, node._kv_bytes, header.session_id, header.next_address
            )
    except SessionFormatError as e:
        raise _refuse(e) from e
    if header.stage:  # checked and built, held aside until its delta arrives
        with staged.lock:
            staged.sessions[session.session_id] = session
            while len(staged.sessions) > MAX_STAGED:
                staged.sessions.pop(next(iter(staged.sessions)))  # the oldest, never committed
        return node._session_info(session)
    node.sessions.add(session)  # whole or not at all: a taken id or an over-budget session is refused here
    return node._session_info(session)


MAX_STAGED = 4  # staged (pre-copied, not yet committed) sessions a node keeps


@dataclass
class _Staging:
    sessions: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_staging_lock = threading.Lock()


def _staged(node):
    """The node's staged sessions: built and checked, not serving, waiting for their delta."""
    with _staging_lock:
        if not hasattr(node, "migration_staged"):
            node.migration_staged = _Staging()
        return node.migration_staged


def _append_delta(session, data, expect):
    tail, meta = session_io.unpack_session(data, dict(expect, delta_from=session.offset))
    append(session.caches, tail)


def serve_push(node, request):
    """PushSession: export to another node's ImportSession directly; returns what it installed."""
    t0 = time.perf_counter()
    if request.stage:
        _check_precopy(node, request)
    header, data = _export_on_node(
        node, request.session_id, request.layer_start, request.layer_end, request.keep_prefill, request.from_token
    )
    t1 = time.perf_counter()
    header.session_id = request.target_session_id or request.session_id
    header.next_address = request.next_address
    header.stage, header.append = request.stage, request.from_token > 0
    client = node._next_client(request.target_address)
    try:
        info = send(client, header, data)
    except grpc.RpcError as e:
        raise SessionError(e.code().name, f"target {request.target_address}: {e.details()}") from None
    t2 = time.perf_counter()
    return pb.PushSessionReply(session=info, container_bytes=len(data), export_ms=(t1 - t0) * 1e3, transfer_ms=(t2 - t1) * 1e3)


def _check_precopy(node, request):
    """Refuse to stage a copy whose tail could not follow (FAILED_PRECONDITION, "pre-copied")."""
    _, held = _held(node)
    session = node.sessions.get(request.session_id)
    a, b = (request.layer_start, request.layer_end) if request.layer_end else held
    for c in session.caches[a - held[0] : b - held[0]]:
        name = type(c).__name__
        if not (name == "KVCache" or name == TURBO_CLASS and (c.compressed or c.offset == 0 and not c.quantized_start)):
            raise SessionError("FAILED_PRECONDITION", f"a {name} {'in its fp16 phase ' if name == TURBO_CLASS else ''}cannot be pre-copied; move it whole")


def serve_reroute(node, request):
    """RerouteSession: point the session's hidden states at another next node."""
    model, _ = _held(node)
    session = node.sessions.get(request.session_id)
    if request.next_address and stage.is_last(model):
        raise SessionError("INVALID_ARGUMENT", "the last node of the model cannot have a next node")
    with session.lock:  # not between a step's compute and its forwarding
        session.next_address = request.next_address
    return node._session_info(session)


# --------------------------------------------------------------------------- client calls


def send(client, header, data, chunk_bytes=wire.CHUNK_BYTES, pieces=None):
    """ImportSession on ``client``: ``header`` (a SessionHeader), then ``data`` in chunks. Returns SessionInfo."""
    def messages():
        yield pb.SessionChunk(header=header)
        for index, piece, crc in pieces or chunks(data, chunk_bytes):
            yield pb.SessionChunk(chunk=pb.Chunk(index=index, data=piece, crc32=crc))

    return client.stub.ImportSession(messages(), metadata=client.metadata, timeout=TRANSFER_TIMEOUT)


def fetch(client, session_id, layers=None, keep_prefill=False):
    """ExportSession from ``client``: ``(header, container bytes)``, every chunk checked."""
    a, b = layers or (0, 0)
    request = pb.ExportSessionRequest(session_id=session_id, layer_start=a, layer_end=b, keep_prefill=keep_prefill)
    stream = client.stub.ExportSession(request, metadata=client._md(request), timeout=TRANSFER_TIMEOUT)
    first = next(stream, None)
    if first is None or not first.HasField("header"):
        stream.cancel()
        raise SessionFormatError("stream", f"node {client.address} began its export without a header")
    header = first.header
    data = receive(((m.chunk.index, m.chunk.data, m.chunk.crc32) for m in stream), int(header.total_bytes))
    return header, data


def push(client, session_id, layers, target_address, next_address, target_session_id="", stage=False, from_token=0):
    """PushSession on ``client``: its ``layers`` of the session go straight to ``target_address``.

    ``stage``: the target checks and holds the copy without serving it;
    ``from_token``: send only the positions from there on and commit the staged copy.
    """
    request = pb.PushSessionRequest(
        session_id=session_id, layer_start=layers[0], layer_end=layers[1], target_address=target_address,
        next_address=next_address, target_session_id=target_session_id, stage=stage, from_token=from_token,
    )
    return client._unary(client.stub.PushSession, request, TRANSFER_TIMEOUT)


def reroute(client, session_id, next_address):
    return client._unary(client.stub.RerouteSession, pb.RerouteSessionRequest(session_id=session_id, next_address=next_address))


def header_for(meta, total, session_id="", next_address=""):
    """The SessionHeader announcing a container built here (a restore or a merged relay)."""
    return pb.SessionHeader(
        total_bytes=total, session_id=session_id or meta.get("session_id", ""), next_address=next_address,
        model_identity=meta["model"], layer_start=meta["layers"][0], layer_end=meta["layers"][1],
        num_tokens=meta["num_tokens"], format_version=FORMAT_VERSION, container_version=session_io.CONTAINER_VERSION,
    )


# --------------------------------------------------------------------------- coordinator side


class MigrationError(RuntimeError):
    """A move, handoff, snapshot or restore that did not happen; the session is where it was.

    ``code`` is the grpc.StatusCode a node answered with, when one did.
    """

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


def _failed(what, client, e):
    return MigrationError(f"{what}: node {client.address}: {e.code().name}: {e.details()}", e.code())


@dataclass
class Stage:
    """One hop of a session's route: a node and the global layers it runs for the session."""

    client: object  # node.NodeClient
    start: int
    end: int

    @property
    def address(self):
        return self.client.address


@dataclass
class Live:
    """A session the coordinator drives: its route and where generation stands.

    ``tokens`` are the ids whose KV the route holds; ``pending`` is the last
    sampled token, not yet fed back. Each decode step holds ``lock``, so a
    migration waits for the step in flight and the next one waits for it.
    """

    session_id: str
    route: list
    tokens: list = field(default_factory=list)
    pending: object = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def connect(cluster, address):
    """The cluster's connection to ``address``, opened (and kept in ``cluster.peers``) if new."""
    for c in [*cluster.clients, *cluster.peers.values()]:
        if c.address == address:
            return c
    try:
        client = cluster.dial(address)
    except grpc.RpcError as e:
        raise MigrationError(f"node {address}: {e.code().name}: {e.details()}", e.code()) from None
    cluster.peers[address] = client
    return client


def prepare(cluster, client, layers):
    """Make ``client`` hold ``layers`` of the cluster's model: as it is, or loaded if it is idle."""
    info = client.info()
    held = (info.model_identity, info.layer_start, info.layer_end, info.load_state)
    if held == (cluster.desc["identity"], *layers, pb.READY):
        return
    planned = cluster.plan_ is not None and any(a.address == client.address for a in cluster.plan_.assignments)
    if info.sessions or planned:
        raise MigrationError(
            f"node {client.address} holds layers {info.layer_start}:{info.layer_end} with {info.sessions} live sessions"
            f"{' and is in the current plan' if planned else ''}; expected layers {layers[0]}:{layers[1]} or an idle node",
            grpc.StatusCode.FAILED_PRECONDITION,
        )
    try:
        client.load(cluster.model, *layers)
    except grpc.RpcError as e:
        raise _failed(f"loading layers {layers[0]}:{layers[1]}", client, e) from None


def _clients(cluster):
    seen = {}
    for c in [*cluster.clients, *cluster.peers.values()]:
        seen.setdefault(c.address, c)
    return list(seen.values())


def live_session(cluster, session_id, refresh=False):
    """The coordinator's record of a session, rebuilt from the nodes when it has none (or ``refresh``).

    A node knows its layers and the session's next node, so the route is the
    chain from the node holding layer 0 (another coordinator's sessions, or the
    CLI's). ``refresh`` re-reads it into the existing record, after another
    coordinator moved the session.
    """
    live = cluster.live.get(session_id)
    if live is not None and not refresh:
        return live
    holders = {}
    for c in _clients(cluster):
        try:
            info = c.info()
            found = [s for s in c.sessions() if s.session_id == session_id]
        except grpc.RpcError as e:
            raise _failed(f"looking for session {session_id!r}", c, e) from None
        if found:
            holders[c.address] = (c, info, found[0])
    first = [h for h in holders.values() if h[1].layer_start == 0]
    if not first:
        raise MigrationError(f"no connected node holds layer 0 of session {session_id!r}", grpc.StatusCode.NOT_FOUND)
    route, at = [], first[0]
    while True:
        c, info, s = at
        route.append(Stage(c, info.layer_start, info.layer_end))
        if not s.next_address:
            break
        if s.next_address not in holders:
            raise MigrationError(f"session {session_id!r} continues at {s.next_address}, which is not connected or lacks it")
        at = holders[s.next_address]
    if live is not None:
        live.route = route
        return live
    live = cluster.live[session_id] = Live(session_id, route)
    return live


def _next_of(route, i):
    return route[i + 1].address if i + 1 < len(route) else ""


def _drop_quietly(stages, session_id):
    for st in stages:
        try:
            st.client.drop(session_id)
        except grpc.RpcError:
            pass  # the node is gone or never got it: nothing of the session is left there


def move(cluster, live, route, relay=False):
    """Give ``live`` the new ``route``, moving each new stage's KV from the old route.

    Each new stage fed by one old stage is pre-copied node to node while the
    session keeps generating: the target checks and holds the copy without
    serving it. Then, holding ``live.lock`` (between tokens), only the
    positions generated since are sent and the copies installed, the kept
    stages are pointed at their new next node, and only then are the old
    copies dropped. A stage fed by several old ones, one whose caches cannot
    be sent as a tail (sliding windows, fp16-phase TurboQuant), or any stage
    when ``relay`` is set, moves whole inside the pause (relayed through here
    when ``relay`` or joined from several). Any failure before the drops
    removes what was built and leaves the old route serving. Returns
    ``{"wire_bytes", "seconds", "pause_ms"}``: ``pause_ms`` is how long steps of
    the session could not run: the locked part plus the sources packing the
    pre-copies (they hold the session's lock on the node meanwhile).
    """
    sid, old, t0 = live.session_id, list(live.route), time.perf_counter()
    key = lambda st: (st.address, st.start, st.end)  # noqa: E731
    kept = {key(st) for st in old}
    todo = []
    for i, st in enumerate(route):
        if key(st) not in kept:
            todo.append((st, _next_of(route, i), [o for o in old if o.start < st.end and st.start < o.end]))
    built, staged, sent, packing_ms = [], {}, [0], 0.0

    def whole(st, nxt, sources):
        if len(sources) == 1 and not relay:
            sent[0] += push(sources[0].client, sid, (st.start, st.end), st.address, nxt).container_bytes
            return
        parts = [fetch(o.client, sid, (max(o.start, st.start), min(o.end, st.end)))[1] for o in sources]
        sent[0] += sum(map(len, parts))
        if len(parts) == 1:
            data, meta = parts[0], _peek_meta(parts[0])
        else:  # one new stage from several old ones: join them here
            caches, meta = _plain_meta(*merge([session_io.unpack_session(p) for p in parts]))
            data = session_io.pack_session(caches, meta)
        send(st.client, header_for(meta, len(data), sid, nxt), data)
        sent[0] += len(data)

    def failed(st, e):
        what = f"moving layers {st.start}:{st.end} of session {sid!r} to {st.address}"
        return MigrationError(f"{what}: {e.code().name}: {e.details()}", e.code())

    for st, nxt, sources in todo if not relay else ():
        if len(sources) == 1:
            try:
                reply = push(sources[0].client, sid, (st.start, st.end), st.address, nxt, stage=True)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.FAILED_PRECONDITION or "pre-copied" not in e.details():
                    raise failed(st, e) from None
                continue  # these caches move whole, inside the pause
            staged[key(st)] = reply.session.offset
            sent[0] += reply.container_bytes
            packing_ms += reply.export_ms  # the source held the session's lock this long
    with live.lock:
        t1 = time.perf_counter()
        try:
            for st, nxt, sources in todo:
                try:
                    if key(st) in staged:
                        src = sources[0].client
                        reply = push(src, sid, (st.start, st.end), st.address, nxt, from_token=staged[key(st)])
                        sent[0] += reply.container_bytes
                    else:
                        whole(st, nxt, sources)
                except grpc.RpcError as e:
                    raise failed(st, e) from None
                built.append(st)
            rerouted = []
            for i, st in enumerate(route):
                before = [j for j, o in enumerate(old) if key(o) == key(st)]
                if before and _next_of(old, before[0]) != _next_of(route, i):
                    try:
                        reroute(st.client, sid, _next_of(route, i))
                    except grpc.RpcError as e:
                        for o, j in rerouted:  # point them back at the old route
                            reroute(o.client, sid, _next_of(old, j))
                        raise _failed(f"rerouting session {sid!r}", st.client, e) from None
                    rerouted.append((st, before[0]))
        except BaseException:
            _drop_quietly(built, sid)
            raise
        new = {key(st) for st in route}
        _drop_quietly([o for o in old if key(o) not in new], sid)
        live.route = list(route)
        t2 = time.perf_counter()
    return {"wire_bytes": sent[0], "seconds": t2 - t0, "pause_ms": (t2 - t1) * 1e3 + packing_ms}


def _peek_meta(data):
    """The meta of container bytes without building caches (the importer checks everything)."""
    import msgpack

    body = msgpack.unpackb(memoryview(data)[session_io.HEADER_BYTES:], raw=False)
    return dict(body["meta"], layers=tuple(body["meta"]["layers"]))


def _plain_meta(caches, meta):
    """``(caches, meta)`` ready for pack_session, which writes the versions itself."""
    return caches, {k: v for k, v in meta.items() if k not in ("container_version", "format_version")}


def migrate(cluster, session_id, layers, to_node, relay=False):
    """Move ``layers`` (whole stages of the session's route) of a session to ``to_node``, between tokens.

    ``to_node`` (host:port) must hold exactly those layers of the model, or be
    idle (it is loaded with them first, before generation pauses).
    """
    a, b = layers
    live = live_session(cluster, session_id)
    target = connect(cluster, to_node)
    prepare(cluster, target, (a, b))
    route = live.route
    if any(st.start < a < st.end or st.start < b < st.end for st in route) or not (route[0].start <= a < b <= route[-1].end):
        ranges = ", ".join(f"{st.start}:{st.end}" for st in route)
        raise MigrationError(f"layers {a}:{b} must be whole stages of the route ({ranges})", grpc.StatusCode.INVALID_ARGUMENT)
    new = [st for st in route if st.end <= a] + [Stage(target, a, b)] + [st for st in route if st.start >= b]
    return move(cluster, live, new, relay)


def decode_route(cluster, nodes):
    """Stages over ``nodes`` (host:port, in order): as they are loaded, or planned and loaded if all idle."""
    from ..cluster.plan import NodeSpec, make_plan

    clients = [connect(cluster, a) for a in nodes]
    infos = [c.info() for c in clients]
    ident = cluster.desc["identity"]
    at, stages = 0, []
    for c, info in zip(clients, infos):
        if info.model_identity != ident or info.layer_start != at or info.load_state != pb.READY:
            break
        stages.append(Stage(c, info.layer_start, info.layer_end))
        at = info.layer_end
    if stages and at == cluster.desc["num_layers"] and len(stages) == len(clients):
        return stages
    busy = [i.name for i in infos if i.sessions]
    if busy:
        raise MigrationError(
            f"nodes {nodes} do not hold the model's layers in order and {busy} have live sessions; expected loaded or idle nodes",
            grpc.StatusCode.FAILED_PRECONDITION,
        )
    specs = [NodeSpec(i.name, c.address, i.memory_budget_bytes - i.memory_used_bytes + i.weights_bytes) for c, i in zip(clients, infos)]
    plan = make_plan(specs, cluster.desc, context=1, model=cluster.model or "")
    for c, a in zip(clients, plan.assignments):
        prepare(cluster, c, (a.start, a.end))
    return [Stage(c, a.start, a.end) for c, a in zip(clients, plan.assignments)]


def handoff(cluster, session_id, nodes, relay=False):
    """Hand a session (typically just prefilled) to the route over ``nodes`` for decoding.

    Each new stage takes its layers straight from the old node holding them;
    fp16-phase TurboQuant caches are compressed before they travel.
    """
    live = live_session(cluster, session_id)
    route = decode_route(cluster, nodes)
    return move(cluster, live, route, relay)


def gather(cluster, live):
    """The whole session as ``(caches, meta)`` for layers 0..n, fetched stage by stage. Hold ``live.lock``."""
    parts = []
    for st in live.route:
        try:
            _, data = fetch(st.client, live.session_id)
        except grpc.RpcError as e:
            raise _failed(f"exporting session {live.session_id!r}", st.client, e) from None
        parts.append(session_io.unpack_session(data))
    caches, meta = merge(parts)
    if len(live.tokens) == meta["num_tokens"]:
        meta["token_ids"] = list(live.tokens)
    meta["pending_token"] = live.pending
    return _plain_meta(caches, meta)


def snapshot(cluster, path, session_id=None):
    """Write a session, all its layers, to ``path`` as one container; returns the bytes written."""
    sid = session_id or _only_session(cluster)
    live = live_session(cluster, sid)
    with live.lock:
        caches, meta = gather(cluster, live)
    return session_io.save_snapshot(path, caches, meta)


def _only_session(cluster):
    ids = sorted({s["session_id"] for s in sessions(cluster)})
    if len(ids) != 1:
        raise MigrationError(f"name the session to snapshot: expected exactly one live session, found {ids}")
    return ids[0]


def install(cluster, caches, meta, route, session_id):
    """Import a whole session split over ``route``; all stages or none. Returns the Live record."""
    built = []
    try:
        for i, st in enumerate(route):
            part_caches, part_meta = split(caches, meta, (st.start, st.end))
            data = session_io.pack_session(part_caches, part_meta)
            try:
                send(st.client, header_for(part_meta, len(data), session_id, _next_of(route, i)), data)
            except grpc.RpcError as e:
                raise _failed(f"restoring session {session_id!r}", st.client, e) from None
            built.append(st)
    except BaseException:
        _drop_quietly(built, session_id)
        raise
    pending = meta.get("pending_token")
    live = cluster.live[session_id] = Live(session_id, list(route), list(meta.get("token_ids") or []), pending)
    return live


def current_route(cluster):
    """The stages of the cluster's plan; without one (a fresh CLI process), its nodes as they are loaded."""
    if cluster.plan_ is None:
        return decode_route(cluster, [c.address for c in cluster.clients])
    return [Stage(c, a.start, a.end) for c, a in zip(cluster.clients, cluster.plan_.assignments)]


def restore(cluster, path, session_id=None):
    """Load a snapshot onto the cluster's current plan; returns the session id (resume it with ``cluster.resume``)."""
    caches, meta = session_io.load_snapshot(path, expect={"model": cluster.desc["identity"], "layers": (0, cluster.desc["num_layers"])})
    sid = session_id or meta["session_id"]
    install(cluster, caches, meta, current_route(cluster), sid)
    return sid


def sessions(cluster):
    """Every session on the connected nodes: id, positions, bytes, and which node holds which layers."""
    out = {}
    for c in _clients(cluster):
        try:
            info = c.info()
            held = c.sessions()
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE and c not in cluster.clients:
                continue  # a migration target that has gone away holds nothing of ours
            raise _failed("listing sessions", c, e) from None
        for s in held:
            row = out.setdefault(s.session_id, {"session_id": s.session_id, "offset": s.offset, "kv_bytes": 0, "stages": []})
            row["kv_bytes"] += s.kv_bytes_used
            row["stages"].append(
                {"node": info.name, "address": c.address, "layers": [info.layer_start, info.layer_end],
                 "kv_bytes": s.kv_bytes_used, "offset": s.offset, "next": s.next_address}
            )
    for row in out.values():
        row["stages"].sort(key=lambda st: st["layers"][0])
    return sorted(out.values(), key=lambda r: r["session_id"])


def replan(cluster, nodes, context=None, cache=None):
    """Re-plan over ``nodes`` (a node joined or is drained), moving every live session's KV with its layers.

    Sessions are paused, gathered here whole, the nodes reloaded to the new
    plan, and each session split over the new route. If the new route cannot
    take them, each is written to a snapshot file named in the error.
    """
    import tempfile

    ids = sorted({s["session_id"] for s in sessions(cluster)})
    lives = [live_session(cluster, sid) for sid in ids]
    for live in lives:
        live.lock.acquire()
    try:
        held = [(live, gather(cluster, live)) for live in lives]
        for live in lives:
            _drop_quietly(live.route, live.session_id)
        clients = [connect(cluster, a) for a in nodes]
        for c in _clients(cluster):
            if c not in clients:
                cluster.peers.setdefault(c.address, c)
        cluster.clients = clients
        try:
            plan = cluster.plan(context=context or (cluster.plan_.context if cluster.plan_ else 4096), cache=cache)
            cluster.load(plan)
            for live, (caches, meta) in held:
                installed = install(cluster, caches, meta, current_route(cluster), live.session_id)
                live.route = installed.route
                cluster.live[live.session_id] = live
        except (MigrationError, grpc.RpcError, ValueError, RuntimeError) as e:
            folder = tempfile.mkdtemp(prefix="turbo-replan-")
            saved = []
            for live, (caches, meta) in held:
                path = f"{folder}/{live.session_id}.tcs"
                session_io.save_snapshot(path, caches, meta)
                saved.append(path)
            raise MigrationError(f"re-plan over {nodes} failed ({e}); the sessions are saved as snapshots: {saved}") from e
        return plan
    finally:
        for live in lives:
            live.lock.release()
