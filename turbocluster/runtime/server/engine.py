"""Sessions for the server: keep each conversation's KV on the nodes and feed only its new tokens.

A request's prompt ids are matched against the kept sessions; when a kept
session's fed tokens are a prefix of the prompt (a chat's earlier turns, as the
chat template renders them), only the rest is sent, so the second turn of a
chat prefills only its own tokens. Sessions are created as
``Cluster.generate_tokens`` creates them (last node first, journalled for
failover) but are not dropped at the end of a request; the least recently used
idle ones are dropped past ``max_kept``.

No MLX runs here: the last node samples every request with mlx-lm's own
sampler (temperature, top_p, top_k, min_p, seed), as ``generate`` does.
"""

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Optional

import grpc

from ...proto import turbo_pb2 as pb
from ..cluster.cluster import PREFILL_STEP
from ..transport.errors import ClusterError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None

    @property
    def node_fields(self) -> dict:
        """The ``pb.Sampling`` fields beyond temperature, top_p and seed, for the last node's sampler."""
        return {"top_k": self.top_k, "min_p": self.min_p}


@dataclass
class Kept:
    """A session held on the nodes between requests."""

    session_id: str
    fed: list  # ids whose KV the nodes hold
    max_context: int
    sampling: Sampling
    pending: Optional[int] = None  # last sampled token, not fed
    busy: bool = True
    last_used: float = field(default_factory=time.monotonic)
    generated: int = 0  # tokens generated over its lifetime


class Engine:
    """The sessions this server drives on a loaded ``Cluster``."""

    def __init__(self, cluster, cache: Optional[dict] = None, context: int = 4096, max_kept: int = 8, metrics=None):
        self.cluster = cluster
        self.metrics = metrics
        self.cache = cache
        self.context = context
        self.max_kept = max_kept
        self.kept: "OrderedDict[str, Kept]" = OrderedDict()
        self._lock = threading.Lock()
        self.eos = set(cluster.tokenizer.eos_token_ids)

    # -- choosing a session ------------------------------------------------

    def acquire(self, ids: list, sampling: Sampling, max_tokens: int) -> tuple:
        """``(Kept, reused)``: the kept session whose KV is the longest prefix of ``ids``, or a new one."""
        with self._lock:
            best = None
            if sampling.seed is None:  # a seeded request must start from a fresh sampler
                for k in self.kept.values():
                    n = len(k.fed)
                    if (not k.busy and k.sampling == sampling and 0 < n < len(ids) and ids[:n] == k.fed
                            and len(ids) + max_tokens <= k.max_context and (best is None or n > len(best.fed))):
                        best = k
            if best is not None:
                best.busy = True
                self.kept.move_to_end(best.session_id)
                return best, len(best.fed)
        return self._create(ids, sampling, max_tokens), 0

    def _create(self, ids, sampling, max_tokens):
        c = self.cluster
        sid = uuid.uuid4().hex
        max_context = max(self.context, len(ids) + max_tokens)
        for attempt in (0, 1):
            try:  # the driver creates it on every node of the route and journals its steps for failover
                c.driver.open(
                    sid, max_context, self.cache, sampling.temperature, sampling.top_p, sampling.seed, [], **sampling.node_fields
                )
                break
            except ClusterError as e:
                if attempt == 0 and e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and self._evict_idle():
                    continue  # idle kept sessions held the KV budget
                raise
        k = Kept(sid, [], max_context, sampling)
        with self._lock:
            self.kept[sid] = k
        return k

    def release(self, k: Kept, keep: bool = True) -> None:
        """The request is done with ``k``: keep it for a later turn, or drop it; drop idle ones past ``max_kept``."""
        with self._lock:
            k.busy, k.last_used = False, time.monotonic()
            victims = [] if keep else [self.kept.pop(k.session_id, None)]
            idle = [x for x in self.kept.values() if not x.busy]
            while len(self.kept) > self.max_kept and idle:
                victims.append(self.kept.pop(idle.pop(0).session_id))
        for v in victims:
            if v is not None:
                self._drop_nodes(v.session_id)

    def _evict_idle(self) -> bool:
        with self._lock:
            idle = [x for x in self.kept.values() if not x.busy]
            for x in idle:
                self.kept.pop(x.session_id)
        for x in idle:
            self._drop_nodes(x.session_id)
        return bool(idle)

    def drop(self, session_id: str) -> bool:
        """Forget a kept session and free it on the nodes; False if this server does not hold it."""
        with self._lock:
            k = self.kept.get(session_id)
            if k is None or k.busy:
                return False
            del self.kept[session_id]
        self._drop_nodes(session_id)
        return True

    def _drop_nodes(self, sid):
        if sid in self.cluster.driver.live:
            self.cluster.driver.close(sid)  # its route now, every other known node in the background
            return
        for cl in self.cluster.clients:
            _drop_quietly(cl, sid)

    def close(self) -> None:
        with self._lock:
            ids = list(self.kept)
            self.kept.clear()
        for sid in ids:
            self._drop_nodes(sid)

    # -- running ---------------------------------------------------------------

    def run(self, k: Kept, ids: list, reused: int, max_tokens: int, stop_at_eos: bool = True) -> Iterator[int]:
        """Feed ``ids[reused:]`` and yield up to ``max_tokens`` sampled ids (the EOS one too)."""
        c, sid = self.cluster, k.session_id
        live = c.live.get(sid)
        if live is None:
            raise ClusterError(f"session {sid} is no longer live", grpc.StatusCode.NOT_FOUND)
        want = pb.TOKEN
        rest = list(ids[reused:])
        if len(ids) + max_tokens > k.max_context:
            raise ClusterError(f"prompt of {len(ids)} tokens + max_tokens {max_tokens} is over the context of "
                               f"{k.max_context}", grpc.StatusCode.OUT_OF_RANGE)
        with live.lock:
            while len(rest) > 1:
                n = min(PREFILL_STEP, len(rest) - 1)
                c.driver.step(sid, rest[:n], pb.NONE)
                k.fed += rest[:n]
                rest = rest[n:]
            reply = c.driver.step(sid, rest, want)
            k.fed += rest
            live.tokens = k.fed
        self._observe(reply)
        k.pending = None
        for n in range(max_tokens):
            token = reply.token
            k.pending = token
            k.generated += 1
            yield token
            if (stop_at_eos and token in self.eos) or n + 1 == max_tokens:
                break
            with live.lock:
                reply = c.driver.step(sid, [token], want)
                k.fed.append(token)
                k.pending = None
                live.tokens = k.fed
            self._observe(reply)

    def _observe(self, reply):
        if self.metrics is not None:
            for h in reply.hops:
                self.metrics.hop_ms.labels(h.node_id).observe(h.total_ms)

    def resume(self, session_id: str, max_tokens: int) -> tuple:
        """``(Kept, ids)`` to continue a kept session from its pending token."""
        with self._lock:
            k = self.kept.get(session_id)
            if k is None:
                raise ClusterError(f"this server holds no session {session_id!r}", grpc.StatusCode.NOT_FOUND)
            if k.busy:
                raise ClusterError(f"session {session_id!r} is busy with another request", grpc.StatusCode.ABORTED)
            if k.pending is None:
                raise ClusterError(f"session {session_id!r} has no pending token to continue from",
                                   grpc.StatusCode.FAILED_PRECONDITION)
            k.busy = True
        return k, k.fed + [k.pending]

    def rows(self) -> list:
        """Kept sessions as plain dicts (for /v1/sessions and the dashboard)."""
        now = time.monotonic()
        with self._lock:
            return [{"session_id": k.session_id, "kept": True, "tokens": len(k.fed), "generated": k.generated, "busy": k.busy,
                     "idle_s": round(now - k.last_used, 1), "max_context": k.max_context}
                    for k in self.kept.values()]


def _drop_quietly(client, sid):
    try:
        client.drop(sid, timeout=5.0)
    except grpc.RpcError:
        pass  # the node is gone or never held it: nothing left to free
