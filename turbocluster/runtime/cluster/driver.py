"""The session driver: the one owner of a session's steps (step, journal, retry, replay, route, lock).

``Cluster.generate_tokens`` and ``Cluster.resume`` both decode through
``Driver.decode``; migration takes the same ``Live.lock`` between two steps.

Every step is journalled: the exact sequence fed (prefill chunks, then one-token
decode steps) with the same ``want``, so a rebuild on another plan replays the
same shapes in the same order and holds bit for bit the KV it held before. A
replayed TOKEN step must give the token it gave the first time whenever
sampling is reproducible (greedy or seeded); if not, the session fails rather
than going on wrong. A session restored from a snapshot gets a journal too:
its first "step" is the restored prefix, whose packed KV is kept as the
journal's checkpoint, so a failover rebuilds it from there.

Retries are bounded: ``Policy.retries`` failed attempts in a row without
progress, with doubling pauses. A step that failed transiently is rewound
(every stage trimmed back to the journal's offset) and sent again.
"""

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import grpc

from ...proto import turbo_pb2 as pb
from ..sessions.container import SessionFormatError
from ..transport.errors import REASON_LOCKED, ClusterError, from_rpc, moved_to, reason_of
from . import failover, migration
from .failover import RETRYABLE, drop, retry, warn
from .membership import Live

log = logging.getLogger(__name__)

PREFILL_STEP = 2048  # mlx_lm.generate_step's prefill_step_size: same chunks, same numbers


@dataclass
class Step:
    ids: tuple  # token ids fed
    want: int  # pb.Output asked for
    out: object = None  # the token it returned (TOKEN steps)


@dataclass
class Journal:
    """What the driver needs to rebuild a session anywhere: how it was made and every step fed."""

    session_id: str
    max_context: int
    cache: dict
    temperature: float = 0.0
    top_p: float = 0.0
    seed: object = None
    sampling: dict = field(default_factory=dict)  # the other pb.Sampling fields (top_k, min_p, penalties)
    steps: list = field(default_factory=list)
    epoch: int = 0  # the plan generation the session's caches live on (-1: must be rebuilt)
    done: int = 0  # steps whose KV the current plan holds
    checkpoint: object = None  # (caches, meta) of the whole session after ``checkpoint_done`` steps
    checkpoint_done: int = 0
    replayable: bool = True  # False for a restored session: its first step is KV only, never re-fed

    @property
    def reproducible(self) -> bool:
        return self.temperature == 0 or self.seed is not None

    def offset(self, steps: Optional[int] = None) -> int:
        return sum(len(s.ids) for s in self.steps[: self.done if steps is None else steps])


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    hops: list = field(default_factory=list)  # per decode step: [(node_id, compute_ms, total_ms, bytes_in)]

    @property
    def tokens_per_s(self) -> float:
        steps = self.generated_tokens - 1  # the first token comes out of the prefill
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


class Driver:
    """The sessions one coordinator drives: their journals and ``Live`` records (route, tokens, lock)."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.live = {}  # session id -> Live
        self.journals = {}  # session id -> Journal

    @property
    def policy(self) -> failover.Policy:
        return failover.state(self.cluster).policy

    # -- opening and closing --

    def open(self, sid, max_context, cache=None, temperature=0.0, top_p=0.0, seed=None, prompt=(), **sampling) -> Live:
        """Create the session on every node of the plan (last node first) and start its journal.

        ``sampling``: the other ``pb.Sampling`` fields (top_k, min_p, repetition_penalty, ...): the last node
        samples with mlx-lm's own sampler and logits processors."""
        m = self.cluster.membership
        j = self.journals[sid] = Journal(
            sid, max_context, dict(cache or {}), temperature, top_p, seed, dict(sampling), epoch=m.epoch
        )
        live = self.live[sid] = Live(sid, migration.current_route(self.cluster), list(prompt))
        clients = [st.client for st in live.route]
        try:
            for i in reversed(range(len(clients))):
                nxt = clients[i + 1].address if i + 1 < len(clients) else ""
                try:
                    clients[i].create_session(sid, max_context, cache, nxt, temperature, top_p, seed, **sampling)
                except grpc.RpcError as e:
                    if e.code() not in RETRYABLE:
                        raise from_rpc("", clients[i].address, e) from None
                    j.epoch = -1  # a node is down: the first step recovers, then creates the session
                    break
        except BaseException:
            self.close(sid)
            raise
        return live

    def adopt(self, live: Live, caches, meta) -> None:
        """Drive a session installed from packed KV (a restored snapshot): its KV is the journal's checkpoint."""
        n = meta["num_tokens"]
        ids = tuple(meta.get("token_ids") or ()) if len(meta.get("token_ids") or ()) == n else (0,) * n
        sampling = meta.get("sampling") or {}
        j = Journal(
            live.session_id, int(meta.get("max_context") or n + 1), dict(meta.get("cache_config") or {}),
            float(sampling.get("temperature", 0.0)), float(sampling.get("top_p", 0.0)),
            seed=meta.get("rng_key"),  # the sampler's key travels in the KV: replays after it are reproducible
            sampling={k: v for k, v in sampling.items() if k not in ("temperature", "top_p", "seed")},
            epoch=self.cluster.membership.epoch, steps=[Step(ids, pb.NONE)], done=1,
            checkpoint=(caches, meta), checkpoint_done=1, replayable=False,
        )
        self.journals[live.session_id] = j
        self.live[live.session_id] = live

    def close(self, sid: str) -> None:
        """Forget the session and drop it from its route now, and from every other known node in the background.

        A node that hung and came back after a re-plan still holds its old copy:
        that orphan goes too.
        """
        live, self.journals = self.live.pop(sid, None), {k: v for k, v in self.journals.items() if k != sid}
        t = self.policy.probe_timeout_s
        with live.lock if live else threading.Lock():  # a migration in flight finishes first, then its route goes
            dropped = self._drop_chain(sid, [st.address for st in live.route] if live else [])
        others = [c for a, c in self.cluster.membership.known().items() if a not in dropped]

        def sweep():
            for c in others:
                try:
                    drop(c, sid, t)
                except (grpc.RpcError, ValueError):
                    pass  # unreachable, or the cluster closed meanwhile: the node's session TTL frees it

        if others:
            threading.Thread(target=sweep, name=f"drop-{sid[:8]}", daemon=True).start()

    def _drop_chain(self, sid: str, addresses: list) -> set:
        """Drop the session along the chain its nodes hold, from ``addresses`` (its route as known here) on,
        following each stage's next node and a migration's moved-to pointer: another coordinator may have
        moved stages. Waits out another holder's lock a while. Returns the addresses tried."""
        m, todo, tried = self.cluster.membership, list(addresses), set()
        deadline = time.monotonic() + min(self.policy.locked_wait_s, 30.0)
        while todo and len(tried) < 64:
            address = todo.pop(0)
            if address in tried or not address:
                continue
            tried.add(address)
            try:
                reply = m.client(address).drop(sid, timeout=5.0)
                todo.insert(0, reply.next_address)
            except grpc.RpcError as e:
                if reason_of(e) == REASON_LOCKED and time.monotonic() < deadline:
                    tried.discard(address)  # a migration or snapshot by another process: after it
                    todo.insert(0, address)
                    time.sleep(0.2)
                else:
                    todo.insert(0, moved_to(e) or "")  # gone, or moved on: follow it
            except ClusterError:
                pass  # unreachable: the node's session TTL frees what it holds
        return tried

    # -- stepping --

    def step(self, sid: str, tokens, want) -> pb.ForwardReply:
        """One step of a session, recovering from lost nodes and lost replies; the ForwardReply."""
        j, live = self.journals[sid], self.live[sid]
        with live.lock:
            j.steps.append(Step(tuple(tokens), want))
            try:
                return self._run(j)
            except BaseException:
                if j.done < len(j.steps):
                    j.steps.pop()  # never ran to completion: not part of the session
                raise

    def prefill(self, sid: str, prompt: list) -> pb.ForwardReply:
        """Feed the prompt in PREFILL_STEP chunks (as mlx_lm.generate_step), the last one sampling a token.

        ``cluster.prefill_progress(done, total)``, when set, hears of each chunk (a long prompt's progress)."""
        rest, report = list(prompt), getattr(self.cluster, "prefill_progress", None)
        while len(rest) > 1:
            n = min(PREFILL_STEP, len(rest) - 1)
            self.step(sid, rest[:n], pb.NONE)
            rest = rest[n:]
            if report is not None:
                report(len(prompt) - len(rest), len(prompt))
        return self.step(sid, rest, pb.TOKEN)

    def release(self, sid: str) -> None:
        """Stop driving the session but leave it on its nodes (kept: ``turbo-cluster resume`` continues it)."""
        self.live.pop(sid, None)
        self.journals.pop(sid, None)

    def decode(self, sid: str, max_tokens: int, eos: set, stats: Optional[Stats] = None, keep: bool = False) -> Iterator[int]:
        """Yield tokens from the session's pending one on; each is fed back as the next step. Closes the
        session at the end, or with ``keep`` leaves it on its nodes with its last token pending there."""
        live = self.live[sid]
        stats = stats or Stats()
        t1 = time.perf_counter()
        try:
            for n in range(max_tokens):
                token = live.pending
                stats.generated_tokens += 1
                yield token
                if token in eos or n + 1 == max_tokens:
                    break
                reply = self.step(sid, [token], pb.TOKEN)
                with live.lock:
                    live.tokens.append(token)
                    live.pending = reply.token
                stats.hops.append([(h.node_id, h.compute_ms, h.total_ms, h.bytes_in) for h in reply.hops])
                stats.decode_s = time.perf_counter() - t1
        finally:
            (self.release if keep else self.close)(sid)

    def _run(self, j: Journal) -> pb.ForwardReply:
        """Bring the session's caches up to the end of its journal; the reply of the last step."""
        m, p = self.cluster.membership, self.policy
        failures, rewind, reply, rebuilt, attempts = 0, False, None, None, 0
        locked_since, follow = None, None  # another holder's lock seen first; where a migration moved stage 0
        while True:
            attempts += 1
            seen, at = m.epoch, j.done
            try:
                if j.epoch != seen:
                    t0, j.done = time.perf_counter(), self._rebuild(j)
                    j.epoch, rewind = seen, False
                    rebuilt = {"session": j.session_id, "from_step": j.done, "t0": t0}
                if rewind:
                    if not self._rewind(j, follow):
                        j.epoch = -1  # a node lost the session: rebuild it
                        continue
                    rewind = False
                first = self.live[j.session_id].route[0].client
                while j.done < len(j.steps):
                    step = j.steps[j.done]
                    reply = first.forward(
                        j.session_id, tokens=list(step.ids), want=step.want, timeout=p.step_timeout(len(step.ids)),
                        # every stage must hold exactly this many positions (a late or doubled step is refused,
                        # never applied twice); the key is new per attempt because a failed attempt is trimmed away
                        expected_position=j.offset(), step_id=f"{j.session_id}/{j.epoch}/{j.done}/{attempts}",
                    )
                    if step.want == pb.TOKEN:
                        if step.out is not None and j.reproducible and reply.token != step.out:
                            raise ClusterError(
                                f"session {j.session_id}: replaying step {j.done} gave token {reply.token}, "
                                f"expected {step.out}; the rebuilt KV differs, so the session cannot go on"
                            )
                        step.out = reply.token
                    j.done += 1
                    failures, locked_since = 0, None
                if rebuilt is not None:
                    self._rebuilt(j, rebuilt)
                if p.checkpoint_every and j.done - j.checkpoint_done >= p.checkpoint_every:
                    self._checkpoint(j)
                return reply
            except grpc.RpcError as e:
                what = f"{e.code().name}: {e.details()}"
                if e.code() not in RETRYABLE:
                    raise ClusterError(f"session {j.session_id}: {what}", e.code()) from None
                moved = moved_to(e)
                follow = moved or follow
                if reason_of(e) == REASON_LOCKED:  # another process is moving or snapshotting it: wait, nothing failed
                    locked_since = locked_since or time.monotonic()
                    if time.monotonic() - locked_since < p.locked_wait_s:
                        log.info("session %s: locked by another holder; waiting", j.session_id)
                        time.sleep(p.max_backoff_s / 4)
                        rewind = True
                        continue
                failures = 1 if j.done > at else failures + 1
                if failures > p.retries:
                    raise ClusterError(f"session {j.session_id}: step failed {failures} times in a row, giving up; last: {what}", e.code()) from None
                if moved:  # another coordinator moved its first stage: follow it, no node was lost
                    log.info("session %s: %s; following it", j.session_id, what)
                    rewind = True
                    continue
                warn(f"session {j.session_id}: step failed ({what}); retrying (attempt {failures}/{p.retries})")
                time.sleep(p.pause(failures - 1))
                self.recover(seen)
                rewind = True

    def _rebuilt(self, j, r):
        r = dict(r, mode="checkpoint" if r["from_step"] else "replay", steps_replayed=j.done - r["from_step"] - 1)
        r["seconds"] = time.perf_counter() - r.pop("t0")
        failover.state(self.cluster).rebuilds.append(r)

    def _rebuild(self, j: Journal) -> int:
        """Put the session on the current plan: its checkpoint if it has one, else empty; the steps it holds."""
        live = self.live[j.session_id]
        route = migration.current_route(self.cluster)
        if j.checkpoint is not None:
            caches, meta = j.checkpoint
            for st in route:
                retry(self.policy, lambda: drop(st.client, j.session_id, self.policy.probe_timeout_s))
            try:
                migration.install_stages(caches, meta, route, j.session_id)
            except (migration.MigrationError, SessionFormatError) as e:
                if not j.replayable:
                    raise ClusterError(f"session {j.session_id}: restoring its KV on the new plan failed: {e}") from None
                warn(f"session {j.session_id}: restoring its checkpoint failed ({e}); replaying every step instead")
                j.checkpoint, j.checkpoint_done = None, 0
            else:
                live.route = route
                return j.checkpoint_done
        self._create(j, route)
        live.route = route
        return 0

    def _checkpoint(self, j: Journal) -> None:
        """Keep the session's packed KV (all layers, sampler state) here, to rebuild from instead of replaying."""
        try:
            j.checkpoint, j.checkpoint_done = migration.gather(self.cluster, self.live[j.session_id]), j.done
        except migration.MigrationError as e:  # the step itself succeeded; a later failover replays more
            warn(f"session {j.session_id}: checkpoint skipped ({e})")

    def _create(self, j: Journal, route) -> None:
        """(Re)create the session on every stage of ``route``, last first; nothing of it left over."""
        p = self.policy
        clients = [st.client for st in route]
        for i in reversed(range(len(clients))):
            c, nxt = clients[i], clients[i + 1].address if i + 1 < len(clients) else ""

            def fresh():  # idempotent: whatever an earlier, lost attempt left there goes first
                for attempt in range(p.retries + 1):
                    drop(c, j.session_id, p.probe_timeout_s)
                    try:
                        return c.create_session(
                            j.session_id, j.max_context, j.cache, nxt, j.temperature, j.top_p, j.seed, **j.sampling
                        )
                    except grpc.RpcError as e:
                        # an earlier attempt that timed out ran after the drop: drop that one too
                        if e.code() != grpc.StatusCode.ALREADY_EXISTS or attempt == p.retries:
                            raise

            retry(p, fresh)

    def _follow(self, sid: str, start: Optional[str] = None) -> Optional[list]:
        """The session's route as its nodes chain it, from ``start`` (where a migration moved stage 0) or the
        route's first node; None when the chain is broken. Another coordinator may have moved stages."""
        m, where = self.cluster.membership, {}
        address = start or self.live[sid].route[0].address
        while address and address not in where:
            try:
                c = m.client(address)  # never re-dialled here: stages of the route hold these connections
                info, held = c.info(), [s for s in c.sessions() if s.session_id == sid]
            except (grpc.RpcError, ClusterError, ValueError):  # unreachable (or closed): failover decides about it
                return None
            if not held:
                return None
            where[address] = (c, info, held[0])
            address = held[0].next_address
        return failover.chain(where, self.cluster.desc["num_layers"])

    def _rewind(self, j: Journal, start: Optional[str] = None) -> bool:
        """Trim every stage back to the journal's offset; False if a stage no longer holds the session.

        The chain the nodes hold is read only when there is a sign another coordinator moved the session
        (``start``: where a moved first stage went; or a stage of the route lacks it), so a plain retry
        costs no more calls than it did."""
        if start is not None:
            self._adopt_route(j.session_id, start)
        if self._trim_route(j):
            return True
        return self._adopt_route(j.session_id) and self._trim_route(j)

    def _adopt_route(self, sid: str, start: Optional[str] = None) -> bool:
        """Take the route the nodes chain (``_follow``) if it is whole and differs from ours; True if taken."""
        route, live = self._follow(sid, start), self.live[sid]
        if route is None or [st.address for st in route] == [st.address for st in live.route]:
            return False
        log.info("session %s: its route changed to %s (moved by another coordinator)", sid, [st.address for st in route])
        live.route = route
        return True

    def _trim_route(self, j: Journal) -> bool:
        target, p = j.offset(), self.policy
        for st in self.live[j.session_id].route:
            c = st.client

            def trim():  # idempotent: re-read the offset each try, a lost Trim reply may have trimmed already
                held = [x for x in c.sessions(timeout=p.probe_timeout_s) if x.session_id == j.session_id]
                if held and held[0].offset > target:
                    try:
                        c.trim(j.session_id, held[0].offset - target, timeout=p.probe_timeout_s)
                    except grpc.RpcError as e:  # the session changed between the listing and the trim: rebuild it
                        if e.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
                            raise
                        log.info("session %s: trim on %s refused (%s); rebuilding it", j.session_id, c.address, e.code().name)
                        return False
                    return True
                return bool(held) and held[0].offset == target

            if not retry(p, trim):
                return False
        return True

    # -- failover --

    def recover(self, seen_epoch: int) -> bool:
        """Make the plan whole after a failure seen at plan generation ``seen_epoch``; True if it re-planned.

        Returns at once if another session re-planned since. The new plan comes
        from failover.recover and is adopted by the membership; sessions rebuild on their next step.
        """
        m = self.cluster.membership
        with m.lock:
            if m.epoch != seen_epoch:
                return False
            context = max([m.plan.context] + [j.max_context for j in self.journals.values()])
            routes = [live.route for live in list(self.live.values())]
            result = failover.recover(self.cluster, set(self.journals), context, routes)
            if result is None:
                return False
            m.adopt(result.clients, result.plan, replanned=True)
            event = {
                "lost": result.lost,
                "nodes": [c.address for c in result.clients],
                "layers": [(a.start, a.end) for a in result.plan.assignments],
                "seconds": result.seconds,
            }
            failover.state(self.cluster).events.append(event)
            lost = ", ".join(f"{a} ({why})" for a, why in result.lost.items()) or "none lost (a node restarted or changed)"
            warn(
                f"node(s) {lost}; re-planned {result.plan.num_layers} layers over {len(result.clients)} node(s) "
                f"in {result.seconds:.2f} s; sessions are rebuilt on the new plan"
            )
            return True
