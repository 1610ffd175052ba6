"""Coordinator side of moving sessions: migrate, handoff, snapshot, restore, re-plan.

The coordinator only orchestrates: nodes push their packed KV to each other
(``PushSession``), staged copies are committed between two tokens holding the
session's ``Live.lock``, and only then is the pipeline rerouted and the old
copy dropped. Any failure before the drops leaves the old route serving.
"""

import logging
import time
import uuid

import grpc

from ...proto import turbo_pb2 as pb
from ..sessions import container as session_io
from ..sessions.calls import fetch, header_for, push, reroute, send
from ..sessions.transfer import merge, split
from ..transport.errors import REASON_MOVE_WHOLE, MigrationError, reason_of
from .membership import Live, Stage, list_sessions, load_plan, lock_route, plan_over, unlock_route  # noqa: F401

log = logging.getLogger(__name__)


def _failed(what, client, e):
    return MigrationError(f"{what}: node {client.address}: {e.code().name}: {e.details()}", e.code())


def connect(cluster, address):
    """The cluster's connection to ``address`` (kept by its membership), re-dialled if the node restarted."""
    try:
        return cluster.membership.checked(address)
    except grpc.RpcError as e:
        raise MigrationError(f"node {address}: {e.code().name}: {e.details()}", e.code()) from None


def prepare(cluster, client, layers):
    """Make ``client`` hold ``layers`` of the cluster's model: as it is, or loaded if it is idle."""
    info = client.info()
    held = (info.model_identity, info.layer_start, info.layer_end, info.load_state)
    if held == (cluster.desc["identity"], *layers, pb.READY):
        return
    plan = cluster.membership.plan
    planned = plan is not None and any(a.address == client.address for a in plan.assignments)
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
    return list(cluster.membership.known().values())


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
    if live is None:
        live = cluster.live[session_id] = Live(session_id, route)
    live.route = route
    if live.pending is None and s.HasField("pending_token"):  # a kept session: its last node's unfed token
        live.pending = s.pending_token
    return live


def _next_of(route, i):
    return route[i + 1].address if i + 1 < len(route) else ""


def _drop_quietly(stages, session_id, holder="", route=()):
    """Drop the session (and staged copies) on ``stages``; a move names where ``route`` put their layers."""
    for st in stages:
        moved_to = next((n.address for n in route if n.start <= st.start < n.end), "")
        try:
            st.client.drop(session_id, holder=holder, moved_to=moved_to)
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
    holder = f"migrate-{uuid.uuid4().hex[:12]}"

    def whole(st, nxt, sources):
        if len(sources) == 1 and not relay:
            sent[0] += push(sources[0].client, sid, (st.start, st.end), st.address, nxt, holder=holder).container_bytes
            return
        parts = [fetch(o.client, sid, (max(o.start, st.start), min(o.end, st.end)), holder=holder)[1] for o in sources]
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
                if reason_of(e) != REASON_MOVE_WHOLE:
                    _drop_quietly([t for t, _, _ in todo], sid, holder)  # the copies staged so far
                    raise failed(st, e) from None
                continue  # these caches move whole, inside the pause
            staged[key(st)] = reply.session.offset
            sent[0] += reply.container_bytes
            packing_ms += reply.export_ms  # the source held the session's lock this long
    with live.lock:
        t1 = time.perf_counter()
        locked = lock_route(old, sid, holder)  # another process's steps and moves wait for this one
        try:
            for st, nxt, sources in todo:
                try:
                    if key(st) in staged:
                        src = sources[0].client
                        reply = push(src, sid, (st.start, st.end), st.address, nxt, from_token=staged[key(st)], holder=holder)
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
                        reroute(st.client, sid, _next_of(route, i), holder)
                    except grpc.RpcError as e:
                        for o, j in rerouted:  # point them back at the old route
                            reroute(o.client, sid, _next_of(old, j), holder)
                        raise _failed(f"rerouting session {sid!r}", st.client, e) from None
                    rerouted.append((st, before[0]))
        except BaseException:
            _drop_quietly([st for st, _, _ in todo], sid, holder)  # what was built, and staged copies
            unlock_route(locked, sid, holder)
            raise
        new = {key(st) for st in route}
        _drop_quietly([o for o in old if key(o) not in new], sid, holder, route)
        unlock_route([o for o in locked if key(o) in new], sid, holder)
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
    plan = plan_over(clients, cluster.desc, cluster.model, 1, infos=infos)
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


def gather_stages(route, session_id, holder=""):
    """A whole session as ``(caches, meta)`` for layers 0..n, fetched stage by stage (no step may run meanwhile)."""
    parts = []
    for st in route:
        try:
            _, data = fetch(st.client, session_id, holder=holder)
        except grpc.RpcError as e:
            raise _failed(f"exporting session {session_id!r}", st.client, e) from None
        parts.append(session_io.unpack_session(data))
    return _plain_meta(*merge(parts))


def gather(cluster, live, holder=""):
    """The whole session with its token ids and pending token, as ``(caches, meta)``. Hold ``live.lock``."""
    caches, meta = gather_stages(live.route, live.session_id, holder)
    if len(live.tokens) == meta["num_tokens"]:
        meta["token_ids"] = list(live.tokens)
    if live.pending is not None or "pending_token" not in meta:  # else: the last node's, for a kept session
        meta["pending_token"] = live.pending
    return caches, meta


def snapshot(cluster, path, session_id=None):
    """Write a session, all its layers, to ``path`` as one container; returns the bytes written."""
    sid = session_id or _only_session(cluster)
    live = live_session(cluster, sid)
    holder = f"snapshot-{uuid.uuid4().hex[:12]}"
    with live.lock:
        locked = lock_route(live.route, sid, holder)  # no stage steps between two stages' exports
        try:
            caches, meta = gather(cluster, live, holder)
        finally:
            unlock_route(locked, sid, holder)
    return session_io.save_snapshot(path, caches, meta)


def _only_session(cluster):
    ids = sorted({s["session_id"] for s in sessions(cluster)})
    if len(ids) != 1:
        raise MigrationError(f"name the session to snapshot: expected exactly one live session, found {ids}")
    return ids[0]


def install_stages(caches, meta, route, session_id):
    """Import a whole session split over ``route``; all stages or none."""
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


def install(cluster, caches, meta, route, session_id):
    """Import a whole session split over ``route``; all stages or none. Returns the Live record."""
    install_stages(caches, meta, route, session_id)
    live = cluster.live[session_id] = Live(session_id, list(route), list(meta.get("token_ids") or []), meta.get("pending_token"))
    return live


def current_route(cluster):
    """The stages of the cluster's plan; without one (a fresh CLI process), its nodes as they are loaded."""
    m = cluster.membership
    if m.plan is None:
        return decode_route(cluster, [c.address for c in m.clients])
    return [Stage(c, a.start, a.end) for c, a in zip(m.clients, m.plan.assignments)]


def restore(cluster, path, session_id=None):
    """Load a snapshot onto the cluster's current plan; returns ``(session id, Live, caches, meta)``."""
    caches, meta = session_io.load_snapshot(path, expect={"model": cluster.desc["identity"], "layers": (0, cluster.desc["num_layers"])})
    sid = session_id or meta["session_id"]
    live = install(cluster, caches, meta, current_route(cluster), sid)
    return sid, live, caches, meta


def sessions(cluster):
    """Every session on the connected nodes: id, positions, bytes, and which node holds which layers."""
    return list_sessions(cluster.membership)


def replan(cluster, nodes, context=None, cache=None):
    """Re-plan over ``nodes`` (a node joined or is drained), moving every live session's KV with its layers.

    Sessions are paused, gathered here whole, the nodes reloaded to the new
    plan, and each session split over the new route. If the new route cannot
    take them, each is written to a snapshot file named in the error.
    """
    import tempfile

    ids = sorted({s["session_id"] for s in sessions(cluster)})
    lives = [live_session(cluster, sid) for sid in ids]
    holder = f"replan-{uuid.uuid4().hex[:12]}"
    for live in lives:
        live.lock.acquire()
    try:
        locked = []  # another process's steps and moves wait while the sessions are gathered
        try:
            for live in lives:
                locked.append((live, lock_route(live.route, live.session_id, holder)))
            held = [(live, gather(cluster, live, holder)) for live in lives]
        except BaseException:
            for live, stages in locked:
                unlock_route(stages, live.session_id, holder)
            raise
        for live in lives:
            _drop_quietly(live.route, live.session_id, holder)
        clients = [connect(cluster, a) for a in nodes]
        m = cluster.membership
        try:
            prior = m.plan
            plan = plan_over(clients, cluster.desc, cluster.model, context or (prior.context if prior else 4096), cache)
            m.adopt(load_plan(clients, plan, cluster.desc, cluster.model), plan)
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
