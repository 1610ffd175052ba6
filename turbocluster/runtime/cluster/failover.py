"""Failover: notice a lost node and compute the plan over the nodes that answer.

A step that fails with a status a lost node or a lossy link explains
(``RETRYABLE``) makes the session driver (driver.py) call ``recover``. It probes
every member (GetInfo, short deadline, a few tries, in parallel; a restarted
node is re-dialled and handshaken again). If every node of the plan answers
holding its layers, the failure was transient and nothing changes. Otherwise
the layers are re-planned over the members that answer and loaded, and the
new plan is returned; the driver hands it to ``Membership.adopt`` (failover
never writes the cluster's node list) and rebuilds its sessions on it.

Reloading a node needs it idle, so the survivors' sessions are dealt with
first: the driver's own sessions are dropped (it rebuilds them from their
journals); any other session whose whole route survives is gathered as packed
KV and installed again on the new plan, so a re-plan never destroys a session
it does not own. A session with a stage on a lost node is an orphan (nothing
can finish it) and is dropped.
"""

import logging
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import grpc

from ...proto import turbo_pb2 as pb
from ..transport.errors import REASON_HANDSHAKE, ClusterError, reason_of
from . import migration
from .membership import Stage, load_plan, plan_over
from .plan import Plan, PlanError

log = logging.getLogger(__name__)

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
    locked_wait_s: float = 90.0  # how long a step waits out another holder's lock (a migration) before giving up

    def step_timeout(self, tokens: int) -> float:
        return self.step_timeout_s + self.per_token_s * tokens

    def pause(self, attempt: int) -> float:
        return min(self.backoff_s * 2**attempt, self.max_backoff_s)


@dataclass
class State:
    """What failover is told (policy) and what it saw (events, rebuilds): read by tests and benchmarks."""

    policy: Policy = field(default_factory=Policy)
    events: list = field(default_factory=list)  # one dict per re-plan: lost nodes, new plan, seconds
    rebuilds: list = field(default_factory=list)  # one dict per session rebuilt: mode, steps replayed, seconds
    moved: list = field(default_factory=list)  # ids of sessions not ours, moved as packed KV by a re-plan
    orphans: list = field(default_factory=list)  # ids of sessions dropped because a stage of them was lost


@dataclass
class Replan:
    """A re-plan's result, for ``Membership.adopt``: the plan and its clients in order."""

    plan: Plan
    clients: list
    lost: dict
    seconds: float


def state(cluster) -> State:
    return cluster.failover_state


def configure(cluster, **policy) -> Policy:
    """Set ``Policy`` fields for this cluster, e.g. ``configure(cluster, step_timeout_s=5)``."""
    p = state(cluster).policy
    for k, v in policy.items():
        if not hasattr(p, k):
            raise TypeError(f"unknown failover policy field {k!r}; expected one of {list(vars(p))}")
        setattr(p, k, v)
    return p


def warn(message: str) -> None:
    """A diagnostic for people (logging) and for code (a FailoverWarning)."""
    log.warning(message)
    warnings.warn(message, FailoverWarning, stacklevel=3)


def impossible(message: str) -> ClusterError:
    return ClusterError(message, impossible=True)  # no plan over the nodes that answer


# --------------------------------------------------------------------------- detection


def probe(cluster) -> tuple:
    """``{address: (client, NodeInfo)}`` of the members that answer, and ``{address: why}`` of the rest."""
    m, p = cluster.membership, state(cluster).policy

    def one(address):
        client, why = m.known().get(address), "no connection"
        for attempt in range(p.probes):
            try:
                if client is None:
                    client = m.redial(address, timeout=p.probe_timeout_s)
                return address, client, client.info(timeout=p.probe_timeout_s), None
            except grpc.RpcError as e:
                why = f"{e.code().name}: {e.details()}"
                if reason_of(e) == REASON_HANDSHAKE:
                    client = None  # the node restarted and forgot our handshake: shake hands again
                elif e.code() == grpc.StatusCode.UNAVAILABLE and attempt == p.probes - 2:
                    client = None  # last try on a fresh connection, which waits up to probe_timeout_s
                elif e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    break
            time.sleep(p.pause(attempt))
        return address, None, None, why

    members = list(m.members)
    with ThreadPoolExecutor(max(1, len(members))) as pool:
        results = list(pool.map(one, members))
    alive = {a: (c, info) for a, c, info, _ in results if c is not None}
    lost = {a: why for a, c, _, why in results if c is None}
    return alive, lost


def intact(cluster, alive: dict, routes=()) -> bool:
    """Every node of the plan (and of every route in ``routes``) answers, holding its layers."""
    ident = cluster.desc["identity"]
    for a in cluster.membership.plan.assignments:
        got = alive.get(a.address)
        if got is None:
            return False
        info = got[1]
        if (info.model_identity, info.layer_start, info.layer_end, info.load_state) != (ident, a.start, a.end, pb.READY):
            return False
    return all(st.address in alive for route in routes for st in route)


# --------------------------------------------------------------------------- re-planning


def recover(cluster, ours: set, context: int, routes=()) -> Optional[Replan]:
    """The plan over the members that answer, loaded; None when the plan is whole (a transient failure).

    ``ours``: ids of the caller's sessions (dropped: the caller rebuilds them);
    ``context``: positions the new plan must hold. Call it holding
    ``cluster.membership.lock``. Raises ClusterError(impossible=True) when no plan is possible.
    """
    p = state(cluster).policy
    t0 = time.monotonic()
    why = "no attempt"
    for attempt in range(p.retries + 1):
        alive, lost = probe(cluster)
        if intact(cluster, alive, routes):
            return None
        try:
            plan, clients = _replan(cluster, alive, lost, ours, context)
            return Replan(plan, clients, lost, time.monotonic() - t0)
        except grpc.RpcError as e:  # a node went away during the re-plan: probe again
            why = f"{e.code().name}: {e.details()}"
        except ClusterError as e:
            if e.impossible:
                raise
            why = str(e)  # a LoadLayers failed: probe again
        warn(f"re-plan attempt {attempt + 1} failed ({why}); probing again")
        time.sleep(p.pause(attempt))
    raise impossible(f"failover impossible: the re-plan failed {p.retries + 1} times; last: {why}")


def _replan(cluster, alive, lost, ours, context):
    if not alive:
        reasons = "; ".join(f"{a}: {why}" for a, why in lost.items())
        raise impossible(f"failover impossible: no node answered ({reasons})")
    m = cluster.membership
    clients = [alive[a][0] for a in m.members if a in alive]
    try:
        plan = plan_over(clients, cluster.desc, cluster.model, context, m.plan.cache or None, [alive[c.address][1] for c in clients])
    except PlanError as e:
        names = ", ".join(lost) or "none"
        raise impossible(
            f"failover impossible: the {len(clients)} surviving nodes cannot hold the model (lost: {names}): {e}"
        ) from None
    held = _clear(cluster, alive, ours)  # LoadLayers needs an idle node
    ordered = load_plan(clients, plan, cluster.desc, cluster.model)
    route = [Stage(c, a.start, a.end) for c, a in zip(ordered, plan.assignments)]
    s = state(cluster)
    for sid, (caches, meta) in held.items():
        try:
            migration.install_stages(caches, meta, route, sid)
            s.moved.append(sid)
        except migration.MigrationError as e:
            warn(f"session {sid!r} (not ours) could not be moved onto the new plan and is lost: {e}")
    return plan, ordered


def _clear(cluster, alive, ours):
    """Empty the survivors: our sessions dropped, others gathered (packed KV) when their route survives."""
    p = state(cluster).policy
    holders = {}  # session id -> {address: (client, info, SessionInfo)}
    for address, (c, info) in alive.items():
        if not info.sessions:
            continue
        for x in retry(p, lambda: c.sessions(timeout=p.probe_timeout_s)):
            holders.setdefault(x.session_id, {})[address] = (c, info, x)
    held = {}
    for sid, where in holders.items():
        if sid not in ours:
            route = chain(where, cluster.desc["num_layers"])
            if route is None:
                warn(f"session {sid!r} lost a stage with the failed node(s); dropping it on the survivors")
                state(cluster).orphans.append(sid)
            else:
                try:
                    held[sid] = migration.gather_stages(route, sid)
                except migration.MigrationError as e:
                    warn(f"session {sid!r} (not ours) could not be gathered before the re-plan and is lost: {e}")
        for c, _, _ in where.values():
            retry(p, lambda: drop(c, sid, p.probe_timeout_s))
    return held


def chain(where: dict, num_layers: int):
    """The stages of a session from layer 0 to the last layer over its holders
    (``{address: (client, NodeInfo, SessionInfo)}``), or None if the chain is broken or loops."""
    by_address = {a: h for a, h in where.items()}
    at = [h for h in where.values() if h[1].layer_start == 0]
    route, seen = [], set()
    while at:
        c, info, x = at[0]
        if c.address in seen:
            return None
        seen.add(c.address)
        route.append(Stage(c, info.layer_start, info.layer_end))
        if not x.next_address:
            break
        at = [by_address[x.next_address]] if x.next_address in by_address else []
        if not at:
            return None
    return route if route and route[-1].end == num_layers else None


def drop(client, session_id: str, timeout: float) -> None:
    """DropSession; a session already gone is fine."""
    try:
        client.drop(session_id, timeout=timeout)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise


def retry(policy: Policy, fn):
    """``fn()``, tried again on a retryable status up to ``policy.retries`` times; its result or the last error."""
    for attempt in range(policy.retries + 1):
        try:
            return fn()
        except grpc.RpcError as e:
            if e.code() not in RETRYABLE or attempt == policy.retries:
                raise
            time.sleep(policy.pause(attempt))


# --------------------------------------------------------------------------- health watching


def watch(cluster, interval_s: float = 2.0, misses: int = 2) -> threading.Event:
    """Health-check the plan's nodes every ``interval_s`` from a daemon thread; re-plan when one misses ``misses`` in a row.

    Steps notice a lost node by their deadlines anyway; watching also notices it
    while the cluster is idle, so the re-plan is done before the next request.
    Returns a ``threading.Event``: set it to stop watching.
    """
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stop, missed = threading.Event(), {}
    p = state(cluster).policy

    def check(client):
        stub = health_pb2_grpc.HealthStub(client.channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service="turbocluster.v1.Node"), timeout=p.probe_timeout_s)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def loop():
        while not stop.wait(interval_s):
            seen = cluster.membership.epoch
            clients = cluster.membership.clients
            for c in clients:
                missed[c.address] = 0 if check(c) else missed.get(c.address, 0) + 1
            if any(missed.get(c.address, 0) >= misses for c in clients):
                try:
                    cluster.driver.recover(seen)
                except ClusterError as e:  # nothing to fail over to; the next step reports it too
                    warn(f"health watch: {e}")
                missed.clear()

    threading.Thread(target=loop, name="failover-watch", daemon=True).start()
    return stop
