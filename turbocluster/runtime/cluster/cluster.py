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

import os
import re
import secrets
import select
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from ...proto import turbo_pb2 as pb
from ..transport import auth
from ..transport import discovery
from . import failover
from ..transport.errors import ClusterError
from . import migration
from ..transport.client import NodeClient, NodeNotAuthenticated
from .plan import NodeSpec, make_plan

PREFILL_STEP = 2048  # mlx_lm.generate_step's prefill_step_size: same chunks, same numbers
_SERVING = re.compile(r"serving on (\S+:\d+)")


def _node_error(client, e):
    return ClusterError(f"node {client.address}: {e.code().name}: {e.details()}", e.code())


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


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    hops: list = field(default_factory=list)  # per decode step: [(node_id, compute_ms, total_ms, bytes_in)]

    @property
    def tokens_per_s(self):
        # the first token comes out of the prefill; the rest are decode steps
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


def _tokenizer(model):
    from ..model import loader

    if hasattr(loader, "load_tokenizer"):
        return loader.load_tokenizer(model)
    return loader.load(model, layers=(0, 1))[1]


def parse_nodes(text):
    """``"host:port,host:port"`` -> list of addresses."""
    out = [a.strip() for a in text.split(",") if a.strip()] if isinstance(text, str) else list(text)
    for a in out:
        host, _, port = a.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"node address {a!r} must be host:port")
    return out


class Cluster:
    """Handshaken connections to the nodes of one pipeline, in pipeline order."""

    def __init__(self, clients, desc, model=None, local_nodes=(), log=None):
        self.clients = clients  # NodeClient per node, in pipeline order once a plan is loaded
        self.desc = desc
        self.model = model
        self.local_nodes = list(local_nodes)
        self.log = log or (lambda *a: None)
        self.plan_ = None
        self._tokenizer = None
        self.stats = Stats()
        self.live = {}  # session id -> migration.Live: route and pending token of each session driven here
        self.peers = {}  # address -> NodeClient of nodes outside the plan (migration targets)

    @classmethod
    def connect(cls, model=None, nodes=None, local=None, discover_timeout=2.0, interfaces=None, log=None, secret=None, tls=None):
        """Connect to ``nodes`` (host:port list), or ``local`` N fresh loopback processes, or zeroconf.

        With neither given, browse for ``discover_timeout`` seconds; when no node
        answers, start 2 local nodes. ``secret`` authenticates every call
        (auth.py); local nodes get a fresh random one unless it is given. ``tls``
        (``{"ca", "cert", "key"}`` PEM paths) dials the nodes with TLS.
        """
        from ..model import loader

        log = log or (lambda *a: None)
        desc = loader.describe(model)
        started = []
        if nodes:
            addresses = parse_nodes(nodes)
        elif local:
            secret = secret or secrets.token_hex(32)
            started = start_local_nodes(local, secret=secret)
            addresses = [n.address for n in started]
            log(f"started {local} local nodes: {', '.join(addresses)}")
        else:
            kw = {} if interfaces is None else {"interfaces": interfaces}
            found = discovery.browse(discover_timeout, **kw)
            if found:
                addresses = [f.address for f in found]
                log(f"discovered {len(found)} nodes: " + ", ".join(f"{f.name} ({f.address})" for f in found))
            else:
                log(f"no node answered within {discover_timeout:g} s; starting 2 local nodes")
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
                    raise ClusterError(f"node {a}: {e.code().name}: {e.details()}") from None
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
            raise
        cluster = cls(clients, desc, model, started, log)
        cluster.secret, cluster.tls = secret, tls  # for nodes dialled later (failover, migration targets)
        return cluster

    def dial(self, address, **kw):
        """A handshaken ``NodeClient`` to ``address`` with this cluster's secret and TLS (for nodes dialled later)."""
        return NodeClient(
            address, self.desc["identity"], will_load=True,
            secret=getattr(self, "secret", None), tls=getattr(self, "tls", None), **kw,
        )

    def infos(self):
        return [c.info() for c in self.clients]

    def plan(self, context=4096, cache=None):
        """A plan over the connected nodes in the order given, by their free memory."""
        from ..model import shard

        try:  # refuse an architecture the shard runner cannot split before any node loads
            shard.check_splittable(self.desc)
        except shard.UnsplittableModel as e:
            raise ClusterError(str(e), grpc.StatusCode.UNIMPLEMENTED, impossible=True) from None
        specs = []
        for c, info in zip(self.clients, self.infos()):
            free = info.memory_budget_bytes - info.memory_used_bytes + info.weights_bytes  # reloading frees weights
            specs.append(NodeSpec(info.name, c.address, free))
        return make_plan(specs, self.desc, context=context, cache=cache, model=self.model or "")

    def load(self, plan, progress=None):
        """Apply ``plan``: LoadLayers on every node at once; ``progress(address, LoadProgress)``.

        A node that already holds exactly its assigned layers of this model is left as it is.
        """
        plan.check()
        by_address = {c.address: c for c in self.clients}
        ordered = []
        for a in plan.assignments:
            if a.address not in by_address:
                raise ClusterError(f"plan names node {a.address}, which this cluster is not connected to")
            ordered.append(by_address[a.address])

        def load_one(client, a):
            info = client.info()
            held = (info.model_identity, info.layer_start, info.layer_end, info.load_state)
            if held == (self.desc["identity"], a.start, a.end, pb.READY):
                if progress:
                    progress(client.address, pb.LoadProgress(fraction=1.0, stage="ready", message="already loaded", done=True))
                return
            report = (lambda p: progress(client.address, p)) if progress else None
            try:
                client.load(self.model, a.start, a.end, progress=report)
            except grpc.RpcError as e:
                raise _node_error(client, e) from None

        with ThreadPoolExecutor(len(ordered)) as pool:
            for job in [pool.submit(load_one, c, a) for c, a in zip(ordered, plan.assignments)]:
                job.result()
        self.clients = ordered
        self.plan_ = plan
        return plan

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = _tokenizer(self.model)
        return self._tokenizer

    def encode(self, prompt, chat=True):
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return tok.encode(prompt)

    def generate_tokens(
        self, prompt_ids, max_tokens=256, temperature=0.0, top_p=0.0, seed=None, cache=None, max_context=None, stop_at_eos=True,
        session_id=None,
    ):
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
        max_context = max_context or len(prompt_ids) + max_tokens
        sid = session_id or uuid.uuid4().hex
        stats = self.stats = Stats(prompt_tokens=len(prompt_ids))
        created = []
        live = None
        try:
            # the journal lets failover.py rebuild the session on other nodes (docs/failover.md)
            journal = failover.opened(self, sid, max_context, cache, temperature, top_p, seed)
            for i in reversed(range(len(self.clients))):
                c = self.clients[i]
                nxt = self.clients[i + 1].address if i + 1 < len(self.clients) else ""
                try:
                    c.create_session(sid, max_context, cache, nxt, temperature, top_p, seed)
                except grpc.RpcError as e:
                    if e.code() not in failover.RETRYABLE:
                        raise _node_error(c, e) from None
                    journal.epoch = -1  # a node is down: the first step recovers, then creates the session
                    break
                created.append(c)
            live = self.live[sid] = migration.Live(sid, migration.current_route(self), list(prompt_ids))
            first = self.clients[0]
            t0 = time.perf_counter()
            try:
                with live.lock:
                    rest = prompt_ids
                    while len(rest) > 1:
                        n = min(PREFILL_STEP, len(rest) - 1)
                        failover.forward(self, sid, rest[:n], pb.NONE)
                        rest = rest[n:]
                    reply = failover.forward(self, sid, rest, pb.TOKEN)
                stats.prefill_s = time.perf_counter() - t0
                t1 = time.perf_counter()
                for n in range(max_tokens):
                    token = live.pending = reply.token
                    stats.generated_tokens += 1
                    yield token
                    if token in eos or n + 1 == max_tokens:
                        break
                    with live.lock:  # a migration waits for this step, and the next step for it
                        first = live.route[0].client
                        reply = failover.forward(self, sid, [token], pb.TOKEN)
                        live.tokens.append(token)
                    stats.hops.append([(h.node_id, h.compute_ms, h.total_ms, h.bytes_in) for h in reply.hops])
                    stats.decode_s = time.perf_counter() - t1
            except grpc.RpcError as e:
                raise _node_error(first, e) from None
        finally:
            self.live.pop(sid, None)
            failover.closed(self, sid)
            for c in [st.client for st in live.route] if live else created:
                try:
                    c.drop(sid, timeout=5.0)
                except grpc.RpcError:
                    pass  # the node is gone or already dropped it; nothing left to free

    def resume(self, session_id, max_tokens=256, stop_at_eos=True):
        """Yield the tokens after a restored (or adopted) session's pending one; drops the session at the end."""
        live = migration.live_session(self, session_id)
        if live.pending is None:
            raise ClusterError(f"session {session_id!r} has no pending token to continue from (restore it from a snapshot)")
        eos = set(self.tokenizer.eos_token_ids) if stop_at_eos else set()
        try:
            for _ in range(max_tokens):
                with live.lock:
                    first = live.route[0].client
                    try:
                        reply = first.forward(session_id, tokens=[live.pending], want=pb.TOKEN)
                    except grpc.RpcError as e:
                        raise _node_error(first, e) from None
                    live.tokens.append(live.pending)
                    live.pending = reply.token
                yield reply.token
                if reply.token in eos:
                    break
        finally:
            self.live.pop(session_id, None)
            for st in live.route:
                try:
                    st.client.drop(session_id)
                except grpc.RpcError:
                    pass  # the node is gone or already dropped it

    # -- moving sessions (migration.py does the work; see docs/migration.md) --

    def migrate(self, session_id, layers, to_node, relay=False):
        """Move ``layers`` (whole stages) of a live session to node ``to_node`` (host:port), between tokens."""
        return migration.migrate(self, session_id, layers, to_node, relay)

    def handoff(self, session_id, nodes, relay=False):
        """Move a (prefilled) session to the route over ``nodes`` (host:port, in order) for decoding."""
        return migration.handoff(self, session_id, nodes, relay)

    def snapshot(self, path, session_id=None):
        """Write a session (all its layers, token ids, pending token) to ``path``; returns bytes written."""
        return migration.snapshot(self, path, session_id)

    def restore(self, path, session_id=None):
        """Load a snapshot onto this cluster's layers; returns the session id (continue with ``resume``)."""
        return migration.restore(self, path, session_id)

    def sessions(self):
        """Live sessions on the connected nodes: size, and which node holds which layers."""
        return migration.sessions(self)

    def replan(self, nodes, context=None, cache=None):
        """Re-plan over ``nodes`` (a node joined or is drained), moving every live session's KV with its layers."""
        return migration.replan(self, nodes, context, cache)

    def generate(self, prompt, max_tokens=256, temperature=0.0, top_p=0.0, seed=None, stop=(), cache=None, chat=True):
        """Yield text pieces as they are generated; stops at EOS, ``max_tokens`` or a ``stop`` string."""
        ids = self.encode(prompt, chat) if isinstance(prompt, str) else list(prompt)
        detok = self.tokenizer.detokenizer
        detok.reset()
        stop = [s for s in stop if s]
        hold = max((len(s) for s in stop), default=1) - 1
        pending = ""
        eos = set(self.tokenizer.eos_token_ids)
        tokens = self.generate_tokens(ids, max_tokens, temperature, top_p, seed, cache)
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

    def close(self):
        for c in self.clients:
            c.close()
        for c in self.peers.values():
            if c not in self.clients:
                c.close()
        self.peers = {}
        stop_local_nodes(self.local_nodes)
        self.local_nodes = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
