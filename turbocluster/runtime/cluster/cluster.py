"""The coordinator: find nodes, plan the layers, load them, and generate through the pipeline.

    cluster = Cluster.connect(local=2)          # or nodes=["mac-a:7070", ...], or zeroconf
    cluster.load(cluster.plan(context=4096))
    for piece in cluster.generate("Hello", max_tokens=64):
        print(piece, end="", flush=True)
    cluster.close()

A decode step is one Forward to the first node: each node runs its layers and
forwards the hidden state to the next node itself; the last node samples and
the token comes back up the chain. The coordinator only tokenises, detokenises
and decides when to stop.
"""

import logging
import os
import re
import secrets
import select
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Iterator, Optional

import grpc

from ..transport import auth
from ..transport import discovery
from ..transport.client import NodeClient, NodeNotAuthenticated
from ..transport.errors import ClusterError, from_rpc
from . import failover
from . import migration
from .driver import PREFILL_STEP, Driver, Stats  # noqa: F401  (PREFILL_STEP, Stats: re-exported)
from .membership import Membership, load_plan, plan_over
from .plan import Plan

_log = logging.getLogger(__name__)
_SERVING = re.compile(r"serving on (\S+:\d+)")


# --------------------------------------------------------------------------- local nodes


@dataclass
class LocalNode:
    proc: subprocess.Popen
    address: str
    log_path: str
    secret: str = None  # what clients must authenticate with, if anything


def start_local_nodes(n, memory_budget=None, timeout=120.0, advertise=False, names=None, secret=None, args=()):
    """Start ``n`` node processes on loopback with ephemeral ports; returns them once all are serving.

    ``secret`` (handed over in the environment, never on the command line) makes them require auth;
    ``args`` are added to each ``turbo-node serve`` command line.
    """
    names = names or [f"local-{i}" for i in range(n)]
    env = dict(os.environ)
    env.pop(auth.ENV_SECRET, None)
    if secret:
        env[auth.ENV_SECRET] = secret
    started = []
    try:
        for i in range(n):
            log = tempfile.NamedTemporaryFile(prefix=f"turbo-node-{i}-", suffix=".log", delete=False)
            cmd = [sys.executable, "-m", "turbocluster.runtime.cli.node", "serve", "--host", "127.0.0.1", "--port", "0"]
            cmd += ["--name", names[i]] + ([] if advertise else ["--no-advertise"])
            if memory_budget:
                cmd += ["--memory-budget", str(memory_budget)]
            cmd += list(args)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True, env=env)
            started.append(LocalNode(proc, "", log.name, secret))
        deadline = time.monotonic() + timeout
        for node in started:
            while not node.address:
                ready, _, _ = select.select([node.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise ClusterError(f"local node did not start within {timeout:g} s; log: {_tail(node.log_path)}")
                line = node.proc.stdout.readline()
                if not line:
                    raise ClusterError(f"local node exited with {node.proc.wait()} before serving; log: {_tail(node.log_path)}")
                m = _SERVING.search(line)
                if m:
                    node.address = m.group(1)
        return started
    except BaseException:
        stop_local_nodes(started)
        raise


def _tail(path, n=2000):
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def stop_local_nodes(nodes, timeout=10.0):
    """SIGTERM each node (it withdraws and stops cleanly), SIGKILL any that hang."""
    for node in nodes:
        if node.proc.poll() is None:
            node.proc.terminate()
    for node in nodes:
        try:
            node.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()
        if node.proc.stdout:
            node.proc.stdout.close()
        if os.path.exists(node.log_path):
            os.unlink(node.log_path)


# --------------------------------------------------------------------------- the cluster


def tokenizer_for(model):
    """The model's tokenizer, without its weights."""
    from ..model import loader

    if hasattr(loader, "load_tokenizer"):
        return loader.load_tokenizer(model)
    return loader.load(model, layers=(0, 1))[1]


def encode(tokenizer, prompt: str, chat: bool = True) -> list:
    """Token ids of a user message: through the chat template when the tokenizer has one and ``chat``."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tokenizer.encode(prompt)


def parse_nodes(text) -> list:
    """``"host:port,host:port"`` -> list of addresses."""
    out = [a.strip() for a in text.split(",") if a.strip()] if isinstance(text, str) else list(text)
    for a in out:
        host, _, port = a.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"node address {a!r} must be host:port")
    return out


class _Callback(logging.Handler):
    """Hands the cluster's diagnostics (logging records) to a ``log(message)`` callable."""

    def __init__(self, fn):
        super().__init__(logging.INFO)
        self.fn = fn

    def emit(self, record):
        self.fn(("warning: " if record.levelno >= logging.WARNING else "") + record.getMessage())


class Cluster:
    """Handshaken connections to the nodes of one pipeline: membership (nodes, plan), driver (sessions)."""

    def __init__(self, clients, desc, model=None, local_nodes=(), log=None, secret=None, tls=None):
        self.desc = desc
        self.model = model
        self.secret, self.tls = secret, tls  # for nodes dialled later (failover, migration targets)
        self.local_nodes = list(local_nodes)
        self.membership = Membership(clients, self.dial)
        self.failover_state = failover.State()
        self.driver = Driver(self)
        self._tokenizer = None
        self.stats = Stats()
        self.prefill_progress = None  # (done, total) -> None: told of each prefill chunk (driver.prefill)
        self._handler = None
        if log is not None:  # diagnostics are logging records; a callback just receives them
            self._handler = _Callback(log)
            logging.getLogger("turbocluster.runtime.cluster").addHandler(self._handler)
            logging.getLogger("turbocluster.runtime.cluster").setLevel(logging.INFO)

    # what the membership and the driver own, read here
    clients = property(lambda self: self.membership.clients, doc="NodeClient per node, in pipeline order")
    plan_ = property(lambda self: self.membership.plan, doc="the plan loaded, or None")
    peers = property(lambda self: self.membership.peers, doc="address -> NodeClient of nodes outside the plan")
    live = property(lambda self: self.driver.live, doc="session id -> Live: route and pending token of each session driven here")

    @classmethod
    def connect(cls, model=None, nodes=None, local=None, discover_timeout=2.0, interfaces=None, log=None, secret=None, tls=None):
        """Connect to ``nodes`` (host:port list), or ``local`` N fresh loopback processes, or zeroconf.

        With neither given, browse for ``discover_timeout`` seconds; when no node
        answers, start 2 local nodes. ``secret`` authenticates every call
        (auth.py); local nodes get a fresh random one unless it is given. ``tls``
        (``{"ca", "cert", "key"}`` PEM paths) dials the nodes with TLS.
        """
        from ..model import loader

        desc = loader.describe(model)
        handler = _Callback(log) if log is not None else None
        if handler is not None:  # diagnostics are logging records; the callback just receives them
            logging.getLogger("turbocluster.runtime.cluster").addHandler(handler)
            logging.getLogger("turbocluster.runtime.cluster").setLevel(logging.INFO)
        say = _log.info
        started = []
        if nodes:
            addresses = parse_nodes(nodes)
        elif local:
            secret = secret or secrets.token_hex(32)
            started = start_local_nodes(local, secret=secret)
            addresses = [n.address for n in started]
            say(f"started {local} local nodes: {', '.join(addresses)}")
        else:
            kw = {} if interfaces is None else {"interfaces": interfaces}
            found = discovery.browse(discover_timeout, **kw)
            if found:
                addresses = [f.address for f in found]
                say(f"discovered {len(found)} nodes: " + ", ".join(f"{f.name} ({f.address})" for f in found))
            else:
                say(f"no node answered within {discover_timeout:g} s; starting 2 local nodes")
                secret = secret or secrets.token_hex(32)
                started = start_local_nodes(2, secret=secret)
                addresses = [n.address for n in started]
        clients = []
        try:
            for a in addresses:
                try:
                    clients.append(NodeClient(a, desc["identity"], will_load=True, secret=secret, tls=tls))
                except grpc.RpcError as e:
                    if nodes is None and not local and e.code() == grpc.StatusCode.UNAUTHENTICATED:
                        log(f"skipped discovered node {a}: it does not share this cluster's secret")
                        continue
                    raise from_rpc("", a, e) from None
                except NodeNotAuthenticated as e:  # a rogue advertiser: never used, never sent anything
                    if nodes is not None or local:
                        raise
                    log(f"refused discovered {e}")
            if not clients:
                raise ClusterError("no discovered node proved it holds the cluster secret", grpc.StatusCode.UNAUTHENTICATED)
        except BaseException:
            for c in clients:
                c.close()
            stop_local_nodes(started)
            if handler is not None:
                logging.getLogger("turbocluster.runtime.cluster").removeHandler(handler)
            raise
        cluster = cls(clients, desc, model, started, None, secret, tls)
        cluster._handler = handler
        return cluster

    def dial(self, address: str, **kw) -> NodeClient:
        """A handshaken ``NodeClient`` to ``address`` with this cluster's secret and TLS (for nodes dialled later)."""
        return NodeClient(address, self.desc["identity"], will_load=True, secret=self.secret, tls=self.tls, **kw)

    def infos(self) -> list:
        return [c.info() for c in self.clients]

    def plan(self, context: int = 4096, cache=None) -> Plan:
        """A plan over the connected nodes in the order given, by their free memory."""
        from ..model import shard

        try:  # refuse an architecture the shard runner cannot split before any node loads
            shard.check_splittable(self.desc)
        except shard.UnsplittableModel as e:
            raise ClusterError(str(e), grpc.StatusCode.UNIMPLEMENTED, impossible=True) from None
        return plan_over(self.clients, self.desc, self.model, context, cache)

    def load(self, plan: Plan, progress=None) -> Plan:
        """Apply ``plan``: LoadLayers on every node at once; ``progress(address, LoadProgress)``.

        A node that already holds exactly its assigned layers of this model is left as it is.
        """
        self.membership.adopt(load_plan(self.clients, plan, self.desc, self.model, progress), plan)
        return plan

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = tokenizer_for(self.model)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok):  # one loaded before connecting (the CLI checks the prompt first)
        self._tokenizer = tok

    def encode(self, prompt: str, chat: bool = True) -> list:
        return encode(self.tokenizer, prompt, chat)

    def generate_tokens(
        self, prompt_ids, max_tokens=256, temperature=0.0, top_p=0.0, seed=None, cache=None, max_context=None, stop_at_eos=True,
        session_id=None, keep=False, sampling=None,
    ) -> Iterator[int]:
        """Yield generated token ids (stops at EOS or ``max_tokens``); as mlx_lm.generate_step does it.

        Between tokens the session can be moved (``migrate``, ``handoff``, ``replan``) or
        snapshotted: each step goes to the first node of the session's current route.
        """
        if self.plan_ is None:
            raise ClusterError("no plan loaded; call cluster.load(cluster.plan(...)) first")
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ValueError("the prompt must hold at least one token")
        eos = set(self.tokenizer.eos_token_ids) if stop_at_eos else set()
        sid = session_id or uuid.uuid4().hex
        stats = self.stats = Stats(prompt_tokens=len(prompt_ids))
        live = self.driver.open(
            sid, max_context or len(prompt_ids) + max_tokens, cache, temperature, top_p, seed, prompt_ids, **(sampling or {})
        )
        try:
            t0 = time.perf_counter()
            live.pending = self.driver.prefill(sid, prompt_ids).token
            stats.prefill_s = time.perf_counter() - t0
        except BaseException:
            self.driver.close(sid)
            raise
        yield from self.driver.decode(sid, max_tokens, eos, stats, keep)

    def resume(self, session_id: str, max_tokens: int = 256, stop_at_eos: bool = True, keep: bool = False) -> Iterator[int]:
        """Yield the tokens after a restored, kept or adopted session's pending one; drops it at the end unless ``keep``."""
        live = migration.live_session(self, session_id)
        if live.pending is None:
            raise ClusterError(f"session {session_id!r} has no pending token to continue from (restore it from a snapshot)")
        if session_id not in self.driver.journals:  # adopted from the nodes: keep its KV to rebuild from
            with live.lock:
                self.driver.adopt(live, *migration.gather(self, live))
        eos = set(self.tokenizer.eos_token_ids) if stop_at_eos else set()
        j = self.driver.journals[session_id]
        room = j.max_context - j.offset()  # each token after the pending one takes a position
        if max_tokens > room:
            _log.warning("session %s has room for %d more positions of its %d; generating %d tokens, not %d",
                        session_id, room, j.max_context, room, max_tokens)
            max_tokens = max(room, 0)
        self.stats = Stats()
        gen = self.driver.decode(session_id, max_tokens + 1, eos, self.stats, keep)
        next(gen)  # the pending token, which the snapshot's caller already has
        yield from gen

    # -- moving sessions (migration.py does the work; see docs/migration.md) --

    def migrate(self, session_id: str, layers, to_node: str, relay: bool = False) -> dict:
        """Move ``layers`` (whole stages) of a live session to node ``to_node`` (host:port), between tokens."""
        return migration.migrate(self, session_id, layers, to_node, relay)

    def handoff(self, session_id: str, nodes, relay: bool = False) -> dict:
        """Move a (prefilled) session to the route over ``nodes`` (host:port, in order) for decoding."""
        return migration.handoff(self, session_id, nodes, relay)

    def snapshot(self, path, session_id: Optional[str] = None) -> int:
        """Write a session (all its layers, token ids, pending token) to ``path``; returns bytes written."""
        return migration.snapshot(self, path, session_id)

    def restore(self, path, session_id: Optional[str] = None) -> str:
        """Load a snapshot onto this cluster's layers; returns the session id (continue with ``resume``).

        The snapshot's KV is kept as the session's checkpoint, so a failover during ``resume`` rebuilds it.
        """
        sid, live, caches, meta = migration.restore(self, path, session_id)
        self.driver.adopt(live, caches, meta)
        return sid

    def sessions(self) -> list:
        """Live sessions on the connected nodes: size, and which node holds which layers."""
        return migration.sessions(self)

    def replan(self, nodes, context=None, cache=None) -> Plan:
        """Re-plan over ``nodes`` (a node joined or is drained), moving every live session's KV with its layers."""
        return migration.replan(self, nodes, context, cache)

    def generate(
        self, prompt, max_tokens=256, temperature=0.0, top_p=0.0, seed=None, stop=(), cache=None, chat=True,
        session_id=None, keep=False, max_context=None, sampling=None,
    ) -> Iterator[str]:
        """Yield text pieces as they are generated; stops at EOS, ``max_tokens`` or a ``stop`` string."""
        ids = self.encode(prompt, chat) if isinstance(prompt, str) else list(prompt)
        detok = self.tokenizer.detokenizer
        detok.reset()
        stop = [s for s in stop if s]
        hold = max((len(s) for s in stop), default=1) - 1
        pending = ""
        eos = set(self.tokenizer.eos_token_ids)
        tokens = self.generate_tokens(
            ids, max_tokens, temperature, top_p, seed, cache, max_context, session_id=session_id, keep=keep, sampling=sampling
        )
        try:
            for token in tokens:
                if token in eos:
                    break
                detok.add_token(token)
                pending += detok.last_segment
                hit = [pending.find(s) for s in stop if s in pending]
                if hit:
                    yield pending[: min(hit)]
                    return
                if len(pending) > hold:
                    cut = len(pending) - hold
                    yield pending[:cut]
                    pending = pending[cut:]
        finally:
            tokens.close()  # drops the session on every node now, not at garbage collection
        detok.finalize()
        pending += detok.last_segment
        hit = [pending.find(s) for s in stop if s in pending]
        yield pending[: min(hit)] if hit else pending

    def close(self) -> None:
        self.membership.close()
        stop_local_nodes(self.local_nodes)
        self.local_nodes = []
        if self._handler is not None:
            logging.getLogger("turbocluster.runtime.cluster").removeHandler(self._handler)
            self._handler = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
