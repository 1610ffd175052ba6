"""Membership: the one writer of which nodes a cluster uses, in which order, and the plan they hold.

Failover and migration never assign the node list: they compute a new plan
(and the clients it runs on) and hand it here (``adopt``). Everything else
reads ``clients``, ``plan`` and ``epoch``. Connections are kept here too, so a
node that restarted is re-dialled (and handshaken again) in one place.
"""

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import grpc

from ...proto import turbo_pb2 as pb
from ..transport.errors import REASON_HANDSHAKE, ClusterError, MigrationError, from_rpc, reason_of
from .plan import NodeSpec, Plan, make_plan

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """One hop of a session's route: a node and the global layers it runs for the session."""

    client: object  # NodeClient
    start: int
    end: int

    @property
    def address(self) -> str:
        return self.client.address


@dataclass
class Live:
    """A session the coordinator drives: its route and where generation stands.

    ``tokens`` are the ids whose KV the route holds; ``pending`` is the last
    sampled token, not yet fed back. Each step holds ``lock``, so a migration
    waits for the step in flight and the next step waits for the migration.
    """

    session_id: str
    route: list
    tokens: list = field(default_factory=list)
    pending: object = None
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)


class Membership:
    """The nodes of one cluster: members (may be used), the pipeline (used now, in order), the plan, peers."""

    def __init__(self, clients: list, dial: Callable):
        self._clients = list(clients)  # in pipeline order once a plan is loaded
        self._plan: Optional[Plan] = None
        self.members = [c.address for c in clients]  # every node the cluster may use, in order
        self.peers = {}  # address -> NodeClient of nodes outside the pipeline (spares, migration targets)
        self.epoch = 0  # plan generation; goes up by one per failover re-plan
        self.lock = threading.RLock()  # one change of membership (a re-plan) at a time; held across RPCs
        self._conns = threading.Lock()  # the lists themselves; never held across an RPC (probes dial from worker threads)
        self._dial = dial

    @property
    def clients(self) -> list:
        return list(self._clients)

    @property
    def plan(self) -> Optional[Plan]:
        return self._plan

    def known(self) -> dict:
        """``{address: NodeClient}`` of every node connected, pipeline first."""
        out = {}
        for c in [*self._clients, *self.peers.values()]:
            out.setdefault(c.address, c)
        return out

    def adopt(self, clients: list, plan: Optional[Plan], replanned: bool = False) -> None:
        """Make ``clients`` (in order) the pipeline and ``plan`` its plan; the old pipeline's others become peers."""
        with self._conns:
            keep = {c.address for c in clients}
            for c in self._clients:
                if c.address not in keep:
                    self.peers.setdefault(c.address, c)
            for c in clients:
                if self.peers.get(c.address) is c:
                    del self.peers[c.address]
                if c.address not in self.members:
                    self.members.append(c.address)
            self._clients, self._plan = list(clients), plan
            if replanned:
                self.epoch += 1

    def client(self, address: str) -> object:
        """The connection to ``address``, dialled (and kept as a peer) if there is none."""
        with self._conns:
            c = self.known().get(address)
        if c is None:
            c = self._dial(address)
            with self._conns:
                c = self.peers.setdefault(address, c)
        return c

    def redial(self, address: str, **kw) -> object:
        """A fresh, handshaken connection to ``address`` (a restarted node forgot the old one); replaces it."""
        fresh = self._dial(address, **kw)
        with self._conns:
            old = self.known().get(address)
            self._clients = [fresh if c.address == address else c for c in self._clients]
            if address in self.peers or old is None:
                self.peers[address] = fresh
            if old is not None and old is not fresh:
                old.close()
        return fresh

    def checked(self, address: str) -> object:
        """The connection to ``address`` after a GetInfo; re-dialled when the node restarted since."""
        c = self.client(address)
        try:
            c.info()
            return c
        except grpc.RpcError as e:
            if reason_of(e) != REASON_HANDSHAKE and e.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            log.info("node %s forgot our handshake (restarted?); dialling again", address)
            return self.redial(address)

    def close(self) -> None:
        for c in self.known().values():
            c.close()
        self._clients, self.peers = [], {}


def free_bytes(info) -> int:
    """What a node can give a plan: its budget less what it holds, weights excepted (a reload frees them)."""
    return info.memory_budget_bytes - info.memory_used_bytes + info.weights_bytes


def plan_over(clients: list, desc: dict, model: str, context: int, cache=None, infos=None) -> Plan:
    """A plan over ``clients`` in the order given, by their free memory (one GetInfo each unless ``infos``)."""
    infos = infos if infos is not None else [c.info() for c in clients]
    specs = [NodeSpec(i.name, c.address, free_bytes(i)) for c, i in zip(clients, infos)]
    return make_plan(specs, desc, context=context, cache=cache, model=model or "")


def load_plan(clients: list, plan: Plan, desc: dict, model: str, progress=None, timeout=None) -> list:
    """LoadLayers on every node of ``plan`` at once; returns the clients in the plan's order.

    A node already holding exactly its layers of this model is left as it is.
    Writes nothing: the caller hands the result to ``Membership.adopt``.
    """
    plan.check()
    by_address = {c.address: c for c in clients}
    ordered = []
    for a in plan.assignments:
        if a.address not in by_address:
            raise ClusterError(f"plan names node {a.address}, which this cluster is not connected to")
        ordered.append(by_address[a.address])

    def one(client, a):
        info = client.info()
        if (info.model_identity, info.layer_start, info.layer_end, info.load_state) == (desc["identity"], a.start, a.end, pb.READY):
            if progress:
                progress(client.address, pb.LoadProgress(fraction=1.0, stage="ready", message="already loaded", done=True))
            return
        report = (lambda p: progress(client.address, p)) if progress else None
        try:
            client.load(model, a.start, a.end, progress=report)
        except grpc.RpcError as e:
            raise from_rpc("", client.address, e) from None

    with ThreadPoolExecutor(len(ordered)) as pool:
        for job in [pool.submit(one, c, a) for c, a in zip(ordered, plan.assignments)]:
            job.result()
    return ordered


# --------------------------------------------------------------------------- who holds which session


def list_sessions(membership) -> list:
    """Every session on the connected nodes: id, positions, bytes, and which node holds which layers."""
    out = {}
    for c in membership.known().values():
        try:
            info = c.info()
            held = c.sessions()
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE and c.address not in {x.address for x in membership.clients}:
                continue  # a migration target that has gone away holds nothing of ours
            raise MigrationError(f"listing sessions: node {c.address}: {e.code().name}: {e.details()}", e.code()) from None
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


LOCK_TTL_S = 60.0  # a migration's node-side lock expires by itself if this process dies holding it


def lock_route(stages, session_id, holder):
    """LockSession on every stage: steps and moves by anyone else are refused until ``unlock_route``.

    Returns the stages locked. A node that does not know the RPC yet (UNIMPLEMENTED) is skipped:
    this process's ``Live.lock`` still serialises its own steps and moves.
    """
    locked = []
    try:
        for st in stages:
            try:
                st.client.lock_session(session_id, holder, LOCK_TTL_S)
                locked.append(st)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise MigrationError(f"locking session {session_id!r}: node {st.address}: {e.code().name}: {e.details()}", e.code()) from None
                log.info("node %s has no LockSession; relying on this process's lock", st.address)
    except BaseException:
        unlock_route(locked, session_id, holder)
        raise
    return locked


def unlock_route(stages, session_id, holder):
    for st in stages:
        try:
            st.client.unlock_session(session_id, holder)
        except grpc.RpcError as e:  # gone, or already expired: the lock's TTL frees it
            log.info("unlocking session %r on %s: %s", session_id, st.address, e.code().name)
