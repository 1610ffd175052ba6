"""Failover: notice a lost node, re-plan over the survivors, rebuild the sessions by replay, retry the step.

Every step the coordinator sends has a deadline. When a step fails with a
status that a lost node or a lossy link explains (UNAVAILABLE,
DEADLINE_EXCEEDED, DATA_LOSS, NOT_FOUND, ...), the coordinator probes every
node it knows (GetInfo with a short deadline, a bounded number of tries, in
parallel). If every node of the plan still answers with its layers loaded the
failure was transient: each node's cache is trimmed back to the offset before
the step (a node may have run the step before the reply was lost) and the step
is sent again. Otherwise the layers are re-planned over the nodes that answer
(a restarted node answers too, after a fresh handshake), loaded, and every
session is rebuilt on the new plan the first time it next steps.

Rebuilding replays the session's journal: the exact sequence of steps it was
fed (prefill chunks, then one-token decode steps) with the same chunking and
the same ``want``, so each cache sees the same shapes in the same order and
holds bit-for-bit the KV it held before (a prefill of many tokens rounds
differently from token-by-token steps). A replayed TOKEN step must give the
token it gave the first time whenever sampling is reproducible (greedy, or
seeded); if not, the session fails with an error instead of going on wrong.

Retries are bounded: a step gets ``Policy.retries`` attempts without progress,
with doubling pauses; a failover that cannot happen (no node answers, or the
survivors cannot hold the model) raises ``ClusterError`` saying why.
"""

import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from ...proto import turbo_pb2 as pb
from ..transport.errors import ClusterError
from .plan import PlanError

# Statuses a lost node, a restarted node or a lossy link can explain; anything else is the caller's problem.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
}


class FailoverWarning(UserWarning):
    """A node was lost or a step had to be retried; generation carried on."""


@dataclass
class Policy:
    step_timeout_s: float = 30.0  # deadline of a one-token step through the whole pipeline
    per_token_s: float = 0.05  # added per token of a prefill step
    probe_timeout_s: float = 2.0  # a node that does not answer GetInfo within this is unreachable
    probes: int = 3  # GetInfo tries before a node counts as lost
    retries: int = 5  # failed attempts in a row (without progress) before a step gives up
    backoff_s: float = 0.1  # first pause between attempts; doubles, at most max_backoff_s
    max_backoff_s: float = 2.0
    load_timeout_s: float = 300.0  # deadline of a LoadLayers during a re-plan
    checkpoint_every: int = 0  # steps between packed-KV checkpoints of a session (0 = rebuild by replay only)

    def step_timeout(self, tokens):
        return self.step_timeout_s + self.per_token_s * tokens


@dataclass
class Step:
    ids: tuple  # token ids fed
    want: int  # pb.Output asked for
    out: object = None  # the token it returned (TOKEN steps)


@dataclass
class Journal:
    """What the coordinator needs to rebuild a session anywhere: how it was made and every step fed."""

    session_id: str
    max_context: int
    cache: dict
    temperature: float = 0.0
    top_p: float = 0.0
    seed: object = None
    steps: list = field(default_factory=list)
    epoch: int = 0  # the plan generation the session's caches live on (-1: must be rebuilt)
    done: int = 0  # steps whose KV the current plan holds
    checkpoint: object = None  # (caches, meta) of the whole session after ``checkpoint_done`` steps
    checkpoint_done: int = 0

    @property
    def reproducible(self):
        return self.temperature == 0 or self.seed is not None

    def offset(self, steps=None):
        return sum(len(s.ids) for s in self.steps[: self.done if steps is None else steps])


class State:
    """Per-cluster failover state: plan generation, journals, the nodes it may use, what happened."""

    def __init__(self, cluster):
        self.policy = Policy()
        self.epoch = 0
        self.lock = threading.RLock()  # one re-plan at a time
        self.journals = {}
        self.members = [c.address for c in cluster.clients]  # every node the cluster may use, in order
        self.spare = {}  # address -> NodeClient of members outside the current plan
        self.events = []  # one dict per recovery: lost nodes, new plan, seconds
        self.rebuilds = []  # one dict per session rebuilt: how (replay or checkpoint), steps replayed, seconds


def state(cluster):
    s = getattr(cluster, "_failover", None)
    if s is None:
        s = cluster._failover = State(cluster)
    return s


def configure(cluster, **policy):
    """Set ``Policy`` fields for this cluster, e.g. ``configure(cluster, step_timeout_s=5)``."""
    p = state(cluster).policy
    for k, v in policy.items():
        if not hasattr(p, k):
            raise TypeError(f"unknown failover policy field {k!r}; expected one of {list(vars(p))}")
        setattr(p, k, v)
    return p


def _error(message, impossible=False):
    return ClusterError(message, impossible=impossible)  # impossible: no plan over the nodes that answer


def _warn(cluster, message):
    cluster.log(f"warning: {message}")
    warnings.warn(message, FailoverWarning, stacklevel=3)


def opened(cluster, session_id, max_context, cache=None, temperature=0.0, top_p=0.0, seed=None):
    """Start a journal for a session just created on every node of the current plan."""
    s = state(cluster)
    j = Journal(session_id, max_context, dict(cache or {}), temperature, top_p, seed, epoch=s.epoch)
    s.journals[session_id] = j
    return j


def closed(cluster, session_id):
    state(cluster).journals.pop(session_id, None)


def route(cluster, session_id=None):
    """The clients a session's steps walk, first node first."""
    live = getattr(cluster, "live", {}).get(session_id)
    if live is not None and live.route:
        return [st.client for st in live.route]
    return list(cluster.clients)


def forward(cluster, session_id, tokens, want):
    """One step of a session, recovering from lost nodes and lost replies; returns the ForwardReply."""
    s = state(cluster)
    j = s.journals.get(session_id)
    tokens = list(tokens)
    if j is None:  # not journalled (a restored session): one attempt, with a deadline
        return route(cluster, session_id)[0].forward(session_id, tokens=tokens, want=want, timeout=s.policy.step_timeout(len(tokens)))
    j.steps.append(Step(tuple(tokens), want))
    try:
        return _run(cluster, j)
    except BaseException:
        if j.done < len(j.steps):
            j.steps.pop()  # never ran to completion: not part of the session
        raise


def _run(cluster, j):
    """Bring the session's caches up to the end of its journal; the reply of the last step."""
    s, p = state(cluster), state(cluster).policy
    failures, rewind, reply, rebuilt = 0, False, None, None
    while True:
        seen, at = s.epoch, j.done
        try:
            if j.epoch != seen:
                t0, j.done = time.perf_counter(), _rebuild(cluster, j)
                j.epoch, rewind = seen, False
                rebuilt = {"session": j.session_id, "from_step": j.done, "t0": t0}
            if rewind:
                if not _rewind(cluster, j):
                    j.epoch = -1  # a node lost the session: rebuild it
                    continue
                rewind = False
            first = route(cluster, j.session_id)[0]
            while j.done < len(j.steps):
                step = j.steps[j.done]
                reply = first.forward(j.session_id, tokens=list(step.ids), want=step.want, timeout=p.step_timeout(len(step.ids)))
                if step.want == pb.TOKEN:
                    if step.out is not None and j.reproducible and reply.token != step.out:
                        raise _error(
                            f"session {j.session_id}: replaying step {j.done} gave token {reply.token}, "
                            f"expected {step.out}; the rebuilt KV differs, so the session cannot go on"
                        )
                    step.out = reply.token
                j.done += 1
                failures = 0
            if rebuilt is not None:
                _rebuilt(cluster, j, rebuilt)
            if p.checkpoint_every and j.done - j.checkpoint_done >= p.checkpoint_every:
                _checkpoint(cluster, j)
            return reply
        except grpc.RpcError as e:
            failures = 1 if j.done > at else failures + 1
            what = f"{e.code().name}: {e.details()}"
            if e.code() not in RETRYABLE:
                raise _error(f"session {j.session_id}: {what}") from None
            if failures > p.retries:
                raise _error(f"session {j.session_id}: step failed {failures} times in a row, giving up; last: {what}") from None
            _warn(cluster, f"session {j.session_id}: step failed ({what}); retrying (attempt {failures}/{p.retries})")
            time.sleep(min(p.backoff_s * 2 ** (failures - 1), p.max_backoff_s))
            recover(cluster, seen)
            rewind = True


def _rebuilt(cluster, j, r):
    r = dict(r, mode="checkpoint" if r["from_step"] else "replay", steps_replayed=j.done - r["from_step"] - 1)
    r["seconds"] = time.perf_counter() - r.pop("t0")
    state(cluster).rebuilds.append(r)


def _rebuild(cluster, j):
    """Put the session on the current plan: its checkpoint if it has one, else empty; the steps it holds."""
    from . import migration
    from ..sessions.container import SessionFormatError

    if j.checkpoint is not None:
        caches, meta = j.checkpoint
        live = getattr(cluster, "live", {}).get(j.session_id)
        for c in cluster.clients:
            _retry(cluster, lambda: _drop(c, j.session_id, state(cluster).policy.probe_timeout_s))
        try:
            installed = migration.install(cluster, caches, meta, migration.current_route(cluster), j.session_id)
        except (migration.MigrationError, SessionFormatError) as e:
            _warn(cluster, f"session {j.session_id}: restoring its checkpoint failed ({e}); replaying every step instead")
            j.checkpoint, j.checkpoint_done = None, 0
        else:
            if live is not None:  # keep the caller's record, on the new route
                live.route = installed.route
                cluster.live[j.session_id] = live
            return j.checkpoint_done
    _create(cluster, j)
    return 0


def _checkpoint(cluster, j):
    """Keep the session's packed KV (all layers, sampler state) here, to rebuild from instead of replaying."""
    from . import migration

    live = getattr(cluster, "live", {}).get(j.session_id)
    if live is None:
        return
    try:
        j.checkpoint, j.checkpoint_done = migration.gather(cluster, live), j.done
    except migration.MigrationError as e:  # the step itself succeeded; a later failover replays more
        _warn(cluster, f"session {j.session_id}: checkpoint skipped ({e})")


def _create(cluster, j):
    """(Re)create the session on every node of the current plan, last node first; nothing of it left over."""
    from . import migration

    clients = list(cluster.clients)
    t = state(cluster).policy.probe_timeout_s
    for i in reversed(range(len(clients))):
        c, nxt = clients[i], clients[i + 1].address if i + 1 < len(clients) else ""

        def fresh():  # idempotent: whatever an earlier, lost attempt left there goes first
            for attempt in range(state(cluster).policy.retries + 1):
                _drop(c, j.session_id, t)
                try:
                    return c.create_session(j.session_id, j.max_context, j.cache, nxt, j.temperature, j.top_p, j.seed)
                except grpc.RpcError as e:
                    # an earlier attempt that timed out ran after the drop: drop that one too
                    if e.code() != grpc.StatusCode.ALREADY_EXISTS or attempt == state(cluster).policy.retries:
                        raise

        _retry(cluster, fresh)
    live = getattr(cluster, "live", {}).get(j.session_id)
    if live is not None:
        live.route = migration.current_route(cluster)


def _rewind(cluster, j):
    """Trim every node's caches back to the journal's offset; False if a node no longer holds the session."""
    target, t = j.offset(), state(cluster).policy.probe_timeout_s
    for c in route(cluster, j.session_id):

        def trim():  # idempotent: re-read the offset each try, a lost Trim reply may have trimmed already
            held = [x for x in c.sessions(timeout=t) if x.session_id == j.session_id]
            if held and held[0].offset > target:
                c.trim(j.session_id, held[0].offset - target, timeout=t)
                return True
            return bool(held) and held[0].offset == target

        if not _retry(cluster, trim):
            return False
    return True


def _drop(client, session_id, timeout):
    try:
        client.drop(session_id, timeout=timeout)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise


def _retry(cluster, fn):
    """``fn()``, tried again on a retryable status up to ``Policy.retries`` times; its result or the last error."""
    p = state(cluster).policy
    for attempt in range(p.retries + 1):
        try:
            return fn()
        except grpc.RpcError as e:
            if e.code() not in RETRYABLE or attempt == p.retries:
                raise
            time.sleep(min(p.backoff_s * 2**attempt, p.max_backoff_s))


# --------------------------------------------------------------------------- detection and re-planning


def probe(cluster):
    """``{address: (client, NodeInfo)}`` of the member nodes that answer, and ``{address: why}`` of the rest."""
    s = state(cluster)
    p = s.policy
    known = {c.address: c for c in [*s.spare.values(), *cluster.clients]}

    def one(address):
        client, why = known.get(address), "no connection"
        for attempt in range(p.probes):
            try:
                if client is None:
                    client = _connect(cluster, address)
                return address, client, client.info(timeout=p.probe_timeout_s), None
            except grpc.RpcError as e:
                why = f"{e.code().name}: {e.details()}"
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    client = None  # the node restarted and forgot our handshake: shake hands again
                elif e.code() == grpc.StatusCode.UNAVAILABLE and attempt == p.probes - 2:
                    client = None  # last try on a fresh connection, which waits up to probe_timeout_s for the node
                elif e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    break
            time.sleep(min(p.backoff_s * 2**attempt, p.max_backoff_s))
        return address, None, None, why

    with ThreadPoolExecutor(max(1, len(s.members))) as pool:
        results = list(pool.map(one, s.members))
    alive = {a: (c, info) for a, c, info, _ in results if c is not None}
    lost = {a: why for a, c, _, why in results if c is None}
    return alive, lost


def _connect(cluster, address):
    return cluster.dial(address, timeout=state(cluster).policy.probe_timeout_s)


def _intact(cluster, alive):
    """Every node of the plan (and of any live session's route) answers, holding its layers."""
    ident = cluster.desc["identity"]
    for a in cluster.plan_.assignments:
        got = alive.get(a.address)
        if got is None:
            return False
        info = got[1]
        if (info.model_identity, info.layer_start, info.layer_end, info.load_state) != (ident, a.start, a.end, pb.READY):
            return False
    for live in list(getattr(cluster, "live", {}).values()):
        if any(st.address not in alive for st in live.route):
            return False
    return True


def recover(cluster, seen_epoch):
    """Make the plan whole again after a failure seen at plan generation ``seen_epoch``.

    Returns at once if another session already re-planned since. If every node
    of the plan answers, nothing changes (the failure was transient). Otherwise
    the layers are re-planned and loaded over the nodes that answer; sessions
    rebuild themselves on their next step. Raises ClusterError when no plan is possible.
    """
    s = state(cluster)
    with s.lock:
        if s.epoch != seen_epoch:
            return False
        t0 = time.monotonic()
        for attempt in range(s.policy.retries + 1):
            alive, lost = probe(cluster)
            if _intact(cluster, alive):
                return False
            try:
                plan = _replan(cluster, alive, lost)
                break
            except grpc.RpcError as e:  # a node went away during the re-plan: probe again
                why = f"{e.code().name}: {e.details()}"
            except ClusterError as e:
                if e.impossible:
                    raise
                why = str(e)  # a LoadLayers failed: probe again
            _warn(cluster, f"re-plan attempt {attempt + 1} failed ({why}); probing again")
            time.sleep(min(s.policy.backoff_s * 2**attempt, s.policy.max_backoff_s))
        else:
            raise _error(f"failover impossible: the re-plan failed {s.policy.retries + 1} times; last: {why}", impossible=True)
        s.epoch += 1
        event = {
            "lost": lost,
            "nodes": [c.address for c in cluster.clients],
            "layers": [(a.start, a.end) for a in plan.assignments],
            "seconds": time.monotonic() - t0,
        }
        s.events.append(event)
        lost_text = ", ".join(f"{a} ({why})" for a, why in lost.items()) or "none lost (a node restarted or changed)"
        _warn(
            cluster,
            f"node(s) {lost_text}; re-planned {plan.num_layers} layers over {len(cluster.clients)} node(s) "
            f"in {event['seconds']:.2f} s; sessions are replayed onto the new plan",
        )
        return True


def _replan(cluster, alive, lost):
    """Plan and load the model over the ``alive`` members (all their sessions dropped first)."""
    s = state(cluster)
    if not alive:
        reasons = "; ".join(f"{a}: {why}" for a, why in lost.items())
        raise _error(f"failover impossible: no node answered ({reasons})", impossible=True)
    old = {c.address: c for c in [*s.spare.values(), *cluster.clients]}
    clients = [alive[a][0] for a in s.members if a in alive]
    for c in clients:  # LoadLayers needs an idle node; every session is rebuilt from its journal
        if not alive[c.address][1].sessions:
            continue
        for x in _retry(cluster, lambda: c.sessions(timeout=s.policy.probe_timeout_s)):
            _retry(cluster, lambda: _drop(c, x.session_id, s.policy.probe_timeout_s))
    context = max([cluster.plan_.context] + [j.max_context for j in s.journals.values()])
    cluster.clients = clients
    s.spare = {a: c for a, c in old.items() if a not in alive}
    try:
        plan = cluster.plan(context=context, cache=cluster.plan_.cache or None)
    except PlanError as e:
        names = ", ".join(lost) or "none"
        raise _error(
            f"failover impossible: the {len(clients)} surviving nodes cannot hold the model (lost: {names}): {e}", impossible=True
        ) from None
    cluster.load(plan)
    return plan


# --------------------------------------------------------------------------- health watching


def watch(cluster, interval_s=2.0, misses=2):
    """Health-check the plan's nodes every ``interval_s`` from a daemon thread; re-plan when one misses ``misses`` in a row.

    Steps notice a lost node by their deadlines anyway; watching also notices it
    while the cluster is idle, so the re-plan is done before the next request.
    Returns a ``threading.Event``: set it to stop watching.
    """
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stop, missed = threading.Event(), {}
    s = state(cluster)

    def check(client):
        stub = health_pb2_grpc.HealthStub(client.channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service="turbocluster.v1.Node"), timeout=s.policy.probe_timeout_s)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def loop():
        while not stop.wait(interval_s):
            seen = s.epoch
            for c in list(cluster.clients):
                missed[c.address] = 0 if check(c) else missed.get(c.address, 0) + 1
            if any(missed.get(c.address, 0) >= misses for c in list(cluster.clients)):
                try:
                    recover(cluster, seen)
                except ClusterError as e:  # nothing to fail over to; the next step reports it too
                    _warn(cluster, f"health watch: {e}")
                missed.clear()

    threading.Thread(target=loop, name="failover-watch", daemon=True).start()
    return stop
