"""The node side of session moves: the bodies of ExportSession, ImportSession, PushSession, RerouteSession.

The exporter keeps serving the session until the importer has checked every
chunk, the container's sha256, its meta (model identity, layer range, codec
and container versions) and every cache, and has added the session to its
store in one step. A transfer that fails at any point leaves the source as it
was and the target with nothing. Refusals are ``SessionError`` (status name, message).
"""

import threading
import time
from dataclasses import dataclass, field

import grpc

from ...kernels.format import FORMAT_VERSION
from ...proto import turbo_pb2 as pb
from ..cache import kinds
from ..model import shard as stage
from ..sessions import container as session_io
from ..sessions.calls import send
from ..sessions.container import SessionFormatError
from ..sessions.store import INBOUND_FACTOR, SessionError
from ..transport.errors import REASON_HANDSHAKE, REASON_MOVE_WHOLE, REASON_TOO_LARGE, reason_of
from ..sessions.transfer import append, chunks, export_session, import_session, receive, restore_extras, status_of
from . import steps


def _refuse(error):
    """A SessionFormatError as the SessionError the servicer answers with."""
    return SessionError(status_of(error), str(error), REASON_TOO_LARGE if error.code == "TOO_LARGE" else None)


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
    free = node.sessions.inbound_free(_staged_bytes(node))
    if INBOUND_FACTOR * header.total_bytes > free:  # by the declared size, before a byte is buffered
        raise SessionError(
            "RESOURCE_EXHAUSTED",
            f"header.total_bytes: a {header.total_bytes}-byte container does not fit the {max(free, 0)} free bytes "
            f"of node {node.name}'s KV budget",
            REASON_TOO_LARGE,
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
    _expire_staged(staged)
    try:
        with node.sessions.inbound(header.total_bytes, _staged_bytes(node)):
            data = receive(pieces(), header.total_bytes)
            session = _rebuild(node, header, staged, data, expect)
    except SessionFormatError as e:
        raise _refuse(e) from e
    if header.stage:  # checked and built, held aside until its delta arrives
        with staged.lock:
            session.staged_at = time.monotonic()
            staged.sessions[session.session_id] = session
            while len(staged.sessions) > MAX_STAGED:
                staged.sessions.pop(next(iter(staged.sessions)))  # the oldest, never committed
        return node._session_info(session)
    node.sessions.add(session)  # whole or not at all: a taken id or an over-budget session is refused here
    return node._session_info(session)


def _rebuild(node, header, staged, data, expect):
    """The session a received container makes (appended to its staged copy when ``header.append``)."""
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
    return session


MAX_STAGED = 4  # staged (pre-copied, not yet committed) sessions a node keeps
STAGED_TTL = 600.0  # seconds a staged copy waits for its delta before it is dropped


def _staged_bytes(node):
    """Bytes held by staged copies: they count against the KV budget like live sessions."""
    staged = _staged(node)
    with staged.lock:
        return sum(s.kv_bytes_used() for s in staged.sessions.values())


def drop_staged(node, session_id: str):
    """Discard the staged (uncommitted) copy of ``session_id``; its bytes, or None if there was none."""
    staged = _staged(node)
    with staged.lock:
        session = staged.sessions.pop(session_id, None)
    return None if session is None else session.kv_bytes_used()


def _expire_staged(staged, now=None):
    now = time.monotonic() if now is None else now
    with staged.lock:
        for sid in [k for k, s in staged.sessions.items() if now - getattr(s, "staged_at", now) > STAGED_TTL]:
            del staged.sessions[sid]


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
    restore_extras(session, meta)  # the sampler key and penalty history as of the tail, not the staged copy
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
    for attempt in (0, 1):  # a target that restarted since our last push forgot our handshake: dial it again once
        client = node._next_client(request.target_address, fresh=attempt == 1)
        try:
            info = send(client, header, data)
            break
        except grpc.RpcError as e:
            if attempt == 0 and reason_of(e) == REASON_HANDSHAKE:
                continue  # refused at its gate, so nothing was installed
            raise SessionError(e.code().name, f"target {request.target_address}: {e.details()}") from None
    t2 = time.perf_counter()
    return pb.PushSessionReply(session=info, container_bytes=len(data), export_ms=(t1 - t0) * 1e3, transfer_ms=(t2 - t1) * 1e3)


def _check_precopy(node, request):
    """Refuse to stage a copy whose tail could not follow (FAILED_PRECONDITION, reason REASON_MOVE_WHOLE)."""
    _, held = _held(node)
    session = node.sessions.get(request.session_id)
    a, b = (request.layer_start, request.layer_end) if request.layer_end else held
    for c in session.caches[a - held[0] : b - held[0]]:
        kind = kinds.kind_of(c)
        if not (kind == kinds.KV or kind == kinds.TURBO and (c.compressed or c.offset == 0 and not c.quantized_start)):
            raise SessionError(
                "FAILED_PRECONDITION",
                f"a {kind or type(c).__name__} {'in its fp16 phase ' if kind == kinds.TURBO else ''}cannot be pre-copied; move it whole",
                REASON_MOVE_WHOLE,
            )


def serve_drop(node, request):
    """DropSession: free the session and any staged copy of it; honours the session's lock.

    A migration's drop names ``moved_to``, which later NOT_FOUNDs here pass on.
    """
    staged = drop_staged(node, request.session_id)
    try:
        session = node.sessions.get(request.session_id)
    except SessionError:
        if staged is None:
            raise
        return pb.DropSessionReply(bytes_freed=staged)
    with session.lock:  # after the step in flight; refused while another holder has it locked
        steps.check_lock(session, request.holder)
        node.sessions.drop(request.session_id, request.moved_to)
    return pb.DropSessionReply(bytes_freed=session.kv_bytes_reserved + (staged or 0), next_address=session.next_address)


def serve_reroute(node, request):
    """RerouteSession: point the session's hidden states at another next node."""
    model, _ = _held(node)
    session = node.sessions.get(request.session_id)
    if request.next_address and stage.is_last(model):
        raise SessionError("INVALID_ARGUMENT", "the last node of the model cannot have a next node")
    with session.lock:  # not between a step's compute and its forwarding
        steps.check_lock(session, request.holder)
        session.next_address = request.next_address
    return node._session_info(session)
