"""The step executor: one Forward over the node's shard, its cache update, the sampled token.

Before anything is applied a step is checked against the session: its lock
holder (LockSession), its expected position (every stage must agree) and its
idempotency key (a retried step already applied answers its recorded reply),
and a hidden state holding NaN or Inf is refused. Refusals carry reason codes
(transport/errors.py) for the caller's control flow.
"""

import logging
import time
from dataclasses import dataclass
from typing import Optional

import grpc
import mlx.core as mx
import numpy as np

from ...proto import turbo_pb2 as pb
from ..cache import kinds
from ..cache.batched import BatchedCache
from ..model import sampling, shard
from ..sessions.store import SessionError
from ..transport import errors, wire
from .gate import Refused

logger = logging.getLogger(__name__)

MAX_STEP_TOKENS = 8192  # positions in one Forward
MAX_LOCK_TTL = 3600.0
MAX_HOLDER = 256
# a later stage refused the step for one of these: it was applied nowhere else, so it is undone here
_UNDO = (errors.REASON_POSITION, errors.REASON_LOCKED, errors.REASON_NON_FINITE)
_OUTPUTS = (pb.OUTPUT_UNSPECIFIED, pb.NONE, pb.HIDDEN, pb.LOGITS, pb.TOKEN)
# per dtype: the unsigned view of an element and its exponent mask (all ones = Inf or NaN)
_EXPONENT = {pb.FLOAT32: (np.uint32, 0x7F800000), pb.FLOAT16: (np.uint16, 0x7C00), pb.BFLOAT16: (np.uint16, 0x7F80)}


@dataclass
class StepRecord:
    """The last step a node applied to a session: its id, offsets, and its reply or its unsent output."""

    step_id: str
    before: int
    after: int
    reply: Optional[bytes] = None  # the serialised ForwardReply once the step completed
    pending: Optional[tuple] = None  # (tensor header, raw) still to be sent on, when forwarding failed


# -- checks -------------------------------------------------------------------------------


def check_lock(session, holder: str) -> None:
    """Refuse (ABORTED, session-locked) a call on a session another holder has locked; drop a lapsed lock."""
    if not session.holder:
        return
    if time.monotonic() >= session.holder_expires:
        logger.info("lock on session %s by %s lapsed", session.session_id, session.holder)
        session.holder, session.holder_expires = "", 0.0
        return
    if holder != session.holder:
        raise SessionError(
            "ABORTED",
            f"session {session.session_id!r} is locked by {session.holder!r} for "
            f"{session.holder_expires - time.monotonic():.1f} s more; retry after it is unlocked",
            errors.REASON_LOCKED,
        )


def lock(session, request) -> pb.LockSessionReply:
    """LockSession's body, with the session's step lock held (so it waits for a step in flight)."""
    if not 0 < len(request.holder) <= MAX_HOLDER:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"holder must be 1..{MAX_HOLDER} characters, got {len(request.holder)}")
    check_lock(session, request.holder)
    if request.unlock:
        session.holder, session.holder_expires = "", 0.0
        return pb.LockSessionReply()
    if not 0 < request.ttl_s <= MAX_LOCK_TTL:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"ttl_s must be in (0, {MAX_LOCK_TTL:g}], got {request.ttl_s}")
    session.holder, session.holder_expires = request.holder, time.monotonic() + request.ttl_s
    return pb.LockSessionReply(holder=session.holder, expires_in_s=request.ttl_s)


def check_finite(dtype: int, raw: bytes) -> None:
    """Refuse (INVALID_ARGUMENT, non-finite) a hidden state with a NaN or Inf element."""
    view, mask = _EXPONENT[dtype]
    bits = np.frombuffer(raw, dtype=view)
    bad = int(np.count_nonzero((bits & mask) == mask))
    if bad:
        raise SessionError("INVALID_ARGUMENT", f"hidden state holds {bad} NaN or Inf values; refused", errors.REASON_NON_FINITE)


def check_input(model, desc: dict, request, data=None):
    """Validate the step's input against this shard: ``(build, positions, bytes_in, ids)``.

    ``build()`` makes the mx.array; it runs on the model thread because MLX
    streams belong to the thread that made them. ``ids`` are the token ids (first node).
    """
    kind = request.WhichOneof("input")
    first = shard.is_first(model)
    if kind == "tokens":
        if not first:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "token ids go to the first node; this node takes hidden states")
        ids = list(request.tokens.ids)
        if not 0 < len(ids) <= MAX_STEP_TOKENS:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"a step takes 1..{MAX_STEP_TOKENS} tokens, got {len(ids)}")
        vocab = desc["vocab_size"]
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"token ids {bad[:5]} out of vocabulary [0, {vocab})")
        return (lambda: mx.array([ids], dtype=mx.int32)), len(ids), 4 * len(ids), ids
    if kind == "hidden":
        if first:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "the first node takes token ids, not hidden states")
        t = request.hidden
        shape = list(t.shape)
        hidden = desc["hidden_size"]
        if len(shape) != 3 or shape[0] != 1 or shape[2] != hidden or not 0 < shape[1] <= MAX_STEP_TOKENS:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"hidden state must have shape [1, L, {hidden}] with 1 <= L <= {MAX_STEP_TOKENS}, got {shape}",
            )
        if t.dtype not in _EXPONENT:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"hidden state must be float32/float16/bfloat16, got dtype {t.dtype}")
        raw = t.data if data is None else data
        wire.check_tensor(int(t.dtype), shape, raw)  # WireError -> INVALID_ARGUMENT, before the model thread
        check_finite(int(t.dtype), raw)
        return (lambda: wire.from_proto(t, raw)), shape[1], len(raw), list(request.context_ids.ids)
    raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "a Forward needs tokens or a hidden tensor")


def check_position(session, request) -> None:
    """Refuse (FAILED_PRECONDITION, position-mismatch) a step expecting another offset than the session's."""
    if request.HasField("expected_position") and session.counts_positions and request.expected_position != session.offset:
        raise SessionError(
            "FAILED_PRECONDITION",
            f"session {session.session_id!r} holds {session.offset} positions here, the step expects "
            f"{request.expected_position}; nothing applied",
            errors.REASON_POSITION,
        )


# -- the step -----------------------------------------------------------------------------


@dataclass
class StepJob:
    """One session's step as the model thread runs it: the shard, the session, its input and what it wants back."""

    model: object
    session: object
    build: object  # () -> mx.array, called on the model thread
    want: int
    onward: bool
    positions: int
    input_key: tuple  # ("tokens",) or ("hidden", dtype): steps with equal keys stack into one input
    batchable: bool  # the node's layers allow batching (full attention only)


def batch_key(job: StepJob):
    """What a decode step shares with those it may be batched with, or None when it runs alone."""
    if job.positions != 1 or not job.batchable or not kinds.batchable(job.session.caches):
        return None
    return (id(job.model), job.input_key)


def run_batch(jobs: list) -> list:
    """Model thread: run the shard on the jobs' inputs (one forward for all) and produce what each asks for.

    Tensors come back as ``(proto header, raw bytes)``, serialised here on the model thread.
    Several jobs are decode steps of distinct sessions (``batch_key``): their rows
    share the layers' matmuls while each attends over its own cache (``cache/batched.py``).
    """
    model = jobs[0].model
    if len(jobs) == 1:
        caches = jobs[0].session.caches
        x = jobs[0].build()
    else:
        caches = [BatchedCache([j.session.caches[i] for j in jobs]) for i in range(len(jobs[0].session.caches))]
        x = mx.concatenate([j.build() for j in jobs], axis=0)
    h = shard.embed(model, x) if shard.is_first(model) else x
    h = shard.run_layers(model, h, caches, overlap=True)
    hidden_out = [j.onward or j.want == pb.HIDDEN for j in jobs]
    heads = [i for i, j in enumerate(jobs) if not hidden_out[i] and j.want != pb.NONE]  # rows that need the head
    logits = None
    if heads:
        rows = h if len(heads) == len(jobs) else h[mx.array(heads)]
        logits = shard.head(model, rows)[:, -1, :]
    mx.eval(h, logits if logits is not None else [], [c.state for j in jobs for c in j.session.caches])
    head_row = {i: r for r, i in enumerate(heads)}
    out = []
    for i, j in enumerate(jobs):
        if hidden_out[i]:
            out.append(wire.to_proto(h[i : i + 1], with_data=False))
        elif j.want == pb.NONE:
            out.append(None)
        else:
            row = logits[head_row[i]][None]
            if j.want == pb.LOGITS:
                out.append(wire.to_proto(row[0], with_data=False))
            else:
                session = j.session
                token, session.rng_state = sampling.sample(row, session.sampling, session.rng_state, session.history)
                out.append(token)
    return out


def remember(session, ids) -> None:
    """Keep the last input token ids the session's logits processors look at (none when it has none)."""
    n = sampling.history_size(session.sampling)
    if n and ids:
        session.history = (session.history + list(ids))[-n:]


def execute(node, request, data, context) -> pb.ForwardReply:
    """One Forward on ``node`` (the servicer): checks, the shard on the model thread, the next node, the reply."""
    t0 = time.perf_counter()
    model = node.host.need_model()
    session = node.sessions.get(request.session_id)
    build, positions, nbytes, ids = check_input(model, node.host.desc, request, data)
    if request.want not in _OUTPUTS:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"want must be one of {list(_OUTPUTS)}, got {request.want}")
    want = request.want or pb.TOKEN
    onward = want != pb.HIDDEN and bool(session.next_address)
    if not onward and not shard.is_last(model) and want in (pb.LOGITS, pb.TOKEN):
        start, end, total = shard.layer_range(model)
        raise Refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"node holds layers {start}:{end} of {total} and the session has no next node; "
            "only the last node returns logits or tokens",
        )
    with session.lock:
        check_lock(session, request.holder)
        record = session.last_step
        if request.step_id and record is not None and record.step_id == request.step_id and session.offset == record.after:
            return _replay(node, session, request, record, want, context, t0, nbytes)
        check_position(session, request)
        if session.offset + positions > session.max_context:
            raise Refused(
                grpc.StatusCode.OUT_OF_RANGE,
                f"session {session.session_id} holds {session.offset} positions; {positions} more "
                f"would pass its max_context {session.max_context}",
            )
        before = session.offset
        remember(session, ids)
        session.last_step = None
        key = ("tokens",) if request.WhichOneof("input") == "tokens" else ("hidden", int(request.hidden.dtype))
        job = StepJob(model, session, build, want, onward, positions, key, node.host.batchable)
        out = node.host.run_step(job)
        record = StepRecord(request.step_id, before, session.offset) if request.step_id else None
        t1 = time.perf_counter()
        node.metrics.step(positions, t1 - t0)
        if onward:
            if record is not None:
                record.pending = out
                session.last_step = record
            try:
                reply = _send_on(node, session, request, out, ids, want, context)
            except SessionError as e:
                if e.reason in _UNDO:  # the step cannot run downstream as sent: undo it here too
                    _undo(node, session, before, ids)
                raise
        else:
            reply = _local_reply(session, want, out)
            session.pending_token = out if want == pb.TOKEN else None
        if record is not None:
            record.pending, record.reply = None, reply.SerializeToString()
            session.last_step = record
    reply.hops.insert(0, pb.Hop(
        node_id=node.node_id, compute_ms=(t1 - t0) * 1e3, total_ms=(time.perf_counter() - t0) * 1e3, bytes_in=nbytes,
    ))
    return reply


def _undo(node, session, before: int, ids) -> None:
    """Trim this node's caches back to ``before`` (a later stage refused the step), where they can be."""
    n = session.offset - before
    if n <= 0:
        return
    if not all(c.is_trimmable() for c in session.caches):
        logger.warning("session %s: a later stage refused the step and these caches cannot be trimmed", session.session_id)
        return
    node.host.run(lambda: [c.trim(n) for c in session.caches])
    session.last_step = None
    if ids and sampling.history_size(session.sampling):
        session.history = session.history[: max(0, len(session.history) - len(ids))]


def _replay(node, session, request, record, want, context, t0, nbytes):
    """A retried step this node already applied: its recorded reply, or its recorded output sent on again."""
    logger.info("step %s of session %s already applied here; not applying it again", record.step_id, session.session_id)
    if record.reply is not None:
        reply = pb.ForwardReply.FromString(record.reply)
    else:
        t, raw = record.pending
        reply = _send_on(node, session, request, (t, raw), list(request.context_ids.ids) or list(request.tokens.ids), want, context)
        record.pending, record.reply = None, reply.SerializeToString()
    # the recorded reply already holds this node's hop from the first time: replace it
    if reply.hops and reply.hops[0].node_id == node.node_id:
        del reply.hops[0]
    reply.hops.insert(0, pb.Hop(node_id=node.node_id, total_ms=(time.perf_counter() - t0) * 1e3, bytes_in=nbytes))
    return reply


def _local_reply(session, want, out) -> pb.ForwardReply:
    reply = pb.ForwardReply(offset=session.offset)
    if want == pb.HIDDEN:
        t, raw = out
        if len(raw) > wire.CHUNK_BYTES:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"hidden reply of {len(raw)} bytes is over {wire.CHUNK_BYTES}; send fewer positions per step",
            )
        t.data = raw
        reply.hidden.CopyFrom(t)
    elif want == pb.LOGITS:
        t, raw = out
        t.data = raw
        reply.logits.CopyFrom(t)
    elif want == pb.TOKEN:
        reply.token = out
    return reply


def _send_on(node, session, request, out, ids, want, context) -> pb.ForwardReply:
    """The step's output to the session's next node, with the step's position, id, holder and context ids."""
    t, raw = out
    remaining = context.time_remaining() if context is not None else None
    timeout = None if remaining is None else max(0.05, remaining - 0.05)
    expected = request.expected_position if request.HasField("expected_position") else None
    context_ids = ids if sampling.history_size(session.sampling) else None
    step = dict(expected_position=expected, step_id=request.step_id, holder=request.holder, context_ids=context_ids)
    header = pb.Tensor()
    header.CopyFrom(t)  # forward_tensor fills in the data: keep the recorded header empty for a retry
    try:
        return node.forward_next(session, header, raw, want, timeout, **step)
    except grpc.RpcError as e:  # the next node's status and reason, passed on (its handshake is its own)
        reason = errors.reason_of(e)
        raise SessionError(
            e.code().name, f"next node: {e.details()}", None if reason == errors.REASON_HANDSHAKE else reason
        ) from None
