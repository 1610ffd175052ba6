"""A node's RPC surface: each RPC checked and mapped to the model host (host.py) or the step executor (steps.py).

Requests are validated before they touch the model; sessions live in ``sessions.SessionStore``; a step
is one call from the coordinator that walks the pipeline node to node and comes back with the token.

Run it with ``turbo-node serve`` or ``python -m turbocluster.runtime.cli.node serve``.
"""

import logging
import re
import secrets
import socket
import threading
import time
import uuid
from concurrent import futures

import grpc
import mlx.core as mx

from ...kernels.turboquant import FORMAT_VERSION
from ...proto import turbo_pb2 as pb
from ...proto import turbo_pb2_grpc as pb_grpc
from . import migration_rpc, model_access, steps
from ..cache.factory import make_caches
from ..cache.config import CacheConfig, CacheConfigError
from ..model import sampling
from ..model import shard as stage
from ..transport import auth, errors, wire
from ..transport.client import MD_COMPAT, MD_PROTOCOL, MD_TOKEN, NodeClient
from ..sessions.store import Session, SessionStore, counted
from .gate import Refused, rpc as _rpc, rpc_stream as _rpc_stream
from .metrics import NodeMetrics
from .host import ModelHost, backend, default_memory_budget  # noqa: F401  (backend: server.py imports it here)

logger = logging.getLogger(__name__)

SERVICE = "turbocluster.v1.Node"
MAX_CONTEXT = 1 << 20
MAX_TOKENS = 1024  # live handshake tokens; the oldest is forgotten first
MAX_SESSION_ID = 256  # characters of a session id
DEFAULT_SESSION_TTL = 1800.0  # seconds a session may sit idle before the node frees it


class NodeServicer(pb_grpc.NodeServicer):
    """State of one node: its model host, its sessions, the tokens it issued."""

    def __init__(self, name=None, memory_budget=None, secret=None, session_ttl=DEFAULT_SESSION_TTL, tls=None):
        self.secret = secret  # cluster secret (auth.py); also used to call the next node
        self.models_dir = None  # LoadLayers opens only models under it when set (model_access.py)
        self.tls = tls  # {"cert", "key", "ca"} PEM paths when serving TLS; also used to call the next node
        self.node_id = uuid.uuid4().hex[:12]
        self.name = name or socket.gethostname().split(".")[0]
        budget = int(memory_budget or default_memory_budget())
        self.sessions = SessionStore(budget)
        self.metrics = NodeMetrics(self.name)
        self.host = ModelHost(self.name, budget, self.sessions, on_batch=self.metrics.batch)
        self.tokens = {}  # handshake token -> compat hash it is bound to
        self._lock = self.host.lock  # guards the tokens and the host's fields against gRPC threads
        self._next = {}  # (next-node address, model identity) -> NodeClient
        self._next_lock = threading.Lock()
        self.sessions.ttl = session_ttl or 0.0  # 0 = sessions never expire
        self._stop = threading.Event()
        if self.sessions.ttl:
            threading.Thread(target=self._reap, name="session-reaper", daemon=True).start()

    # what migration_rpc.py and the tests read: the host's state
    model = property(lambda self: self.host.model)
    desc = property(lambda self: self.host.desc)
    compat = property(lambda self: self.host.compat)
    memory_budget = property(lambda self: self.host.memory_budget)
    weights_bytes = property(lambda self: self.host.weights_bytes)

    run_on_model_thread = property(lambda self: self.host.run)
    _need_model = property(lambda self: self.host.need_model)
    _kv_bytes = property(lambda self: self.host.kv_bytes)

    def _reap(self):
        """Free sessions idle for longer than the TTL; their ids answer NOT_FOUND saying so."""
        while not self._stop.wait(min(1.0, max(0.05, self.sessions.ttl / 4))):
            for s in self.sessions.expire():
                logger.warning("session %s expired after %g s idle", s.session_id, self.sessions.ttl)

    # -- gate ---------------------------------------------------------------

    def check_call(self, method, md):
        """None if the call may proceed, else ``(why, reason)`` (answered with FAILED_PRECONDITION)."""
        version = md.get(MD_PROTOCOL)
        if version != str(wire.PROTOCOL_VERSION):
            return (
                f"protocol version mismatch: node speaks turbo-cluster protocol {wire.PROTOCOL_VERSION}, "
                f"caller sent {version!r} in '{MD_PROTOCOL}' metadata",
                None,
            )
        if method.endswith("/Handshake"):
            return None
        token, compat = md.get(MD_TOKEN), md.get(MD_COMPAT)
        with self._lock:
            bound = self.tokens.get(token)
            current = self.compat
        if bound is None:
            return f"no valid handshake token in '{MD_TOKEN}' metadata; call Handshake first", errors.REASON_HANDSHAKE
        if compat != bound:
            return f"'{MD_COMPAT}' metadata {compat!r} does not match the handshake's {bound!r}", errors.REASON_HANDSHAKE
        if bound != current and not method.endswith(("/LoadLayers", "/GetInfo")):
            if current is None:
                return "this node has no layers loaded; call LoadLayers", None
            return "the node holds another model than this handshake named; call LoadLayers or handshake again", errors.REASON_HANDSHAKE
        return None

    # -- RPCs ---------------------------------------------------------------

    @_rpc
    def Handshake(self, request, context):
        if request.protocol_version != wire.PROTOCOL_VERSION:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version mismatch: node {wire.PROTOCOL_VERSION}, caller {request.protocol_version}",
            )
        if request.format_version != FORMAT_VERSION:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"TurboQuant format version mismatch: node {FORMAT_VERSION}, caller {request.format_version}",
            )
        expected = wire.compat_hash(request.model_identity)
        if not request.model_identity or request.compat_hash != expected:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"compat_hash {request.compat_hash!r} is not wire.compat_hash of model identity "
                f"{request.model_identity!r} (expected {expected!r})",
            )
        with self._lock:
            if self.compat is not None and expected != self.compat and not (request.will_load and not len(self.sessions)):
                raise Refused(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"model mismatch: node {self.name} holds {self.desc['name']} (identity "
                    f"{self.desc['identity'][:16]}...), caller asked for identity {request.model_identity[:16]}...",
                )
            token = secrets.token_hex(16)
            self.tokens[token] = expected
            while len(self.tokens) > MAX_TOKENS:  # oldest first: dicts keep insertion order
                del self.tokens[next(iter(self.tokens))]
        return pb.HandshakeReply(
            node_id=self.node_id,
            node_proof=auth.node_proof(self.secret, request.challenge, self.node_id) if self.secret else "",
            token=token,
            protocol_version=wire.PROTOCOL_VERSION,
            format_version=FORMAT_VERSION,
            compat_hash=expected,
            info=self.info(),
        )

    @_rpc
    def GetInfo(self, request, context):
        return self.info()

    def info(self):
        h = self.host
        with self._lock:
            d, model = h.desc, h.model
            start, end, total = stage.layer_range(model) if model is not None else (0, 0, 0)
            free_kv = self.sessions.budget_bytes - self.sessions.reserved()
            per_pos = h.kv_bytes(1 << 8, {}) >> 8 if model is not None else 0
            return pb.NodeInfo(
                node_id=self.node_id,
                name=self.name,
                backend=backend(),
                memory_budget_bytes=h.memory_budget,
                memory_used_bytes=h.weights_bytes + self.sessions.reserved(),
                model_name=d["name"] if d else "",
                model_identity=d["identity"] if d else "",
                layer_start=start,
                layer_end=end,
                num_layers_total=total,
                is_first=model is not None and start == 0,
                is_last=model is not None and end == total,
                hidden_size=d["hidden_size"] if d else 0,
                vocab_size=d["vocab_size"] if d else 0,
                sessions=len(self.sessions),
                protocol_version=wire.PROTOCOL_VERSION,
                format_version=FORMAT_VERSION,
                load_state=h.load_state,
                load_fraction=h.load_fraction,
                load_message=h.load_message,
                weights_bytes=h.weights_bytes,
                max_context=max(free_kv, 0) // per_pos if per_pos else 0,
            )

    @_rpc_stream
    def LoadLayers(self, request, context):
        from ..model import loader

        md = dict(context.invocation_metadata())
        with self._lock:
            bound = self.tokens.get(md.get(MD_TOKEN))
        yield pb.LoadProgress(fraction=0.0, stage="describe", message=f"describing {request.model or 'default model'}")
        model_arg, desc = model_access.describe(loader, request.model, self.models_dir)
        n = desc["num_layers"]
        start, end = request.layer_start, request.layer_end
        if not 0 <= start < end <= n:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"layer range {start}:{end} must satisfy 0 <= start < end <= {n}")
        if wire.compat_hash(desc["identity"]) != bound:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"LoadLayers asked for {desc['name']} (identity {desc['identity'][:16]}...), "
                "which is not the model this connection's handshake named",
            )
        # before a weight is read: the layers' weights beside the KV live and staged sessions hold
        self.host.check_fits(desc, start, end, self.sessions.reserved() + migration_rpc._staged_bytes(self))
        if len(self.sessions):
            held = ", ".join(sorted(x.session_id for x in self.sessions.list())[:3])
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"{len(self.sessions)} live sessions ({held}) hold this node's "
                          "layers; free them with `turbo-cluster drop SESSION` before reloading")
        job = self.host.start_load(model_arg, desc, start, end)
        yield pb.LoadProgress(fraction=0.1, stage="load", message=self.host.load_message)
        t0 = time.monotonic()
        while True:
            try:
                job.result(timeout=0.5)
                break
            except futures.TimeoutError:  # the bytes of weights read so far (the loader reports them per tensor)
                with self._lock:
                    f, message = self.host.load_fraction, self.host.load_message
                yield pb.LoadProgress(fraction=f, stage="load", message=f"{message} ({time.monotonic() - t0:.1f} s)")
            except (ValueError, OSError, KeyError) as e:  # a bad model path or file: the caller's problem
                self.host.progress(pb.FAILED, 0.0, f"load failed: {e}")
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"could not load {request.model or 'default model'}: {e}")
        with self._lock:  # tokens bound to another model can no longer be used
            self.tokens = {t: c for t, c in self.tokens.items() if c == self.host.compat}
        yield pb.LoadProgress(fraction=1.0, stage="ready", message=self.host.load_message, done=True, info=self.info())

    @_rpc
    def CreateSession(self, request, context):
        model = self._need_model()
        if len(request.session_id) > MAX_SESSION_ID:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"session id must be at most {MAX_SESSION_ID} characters, got {len(request.session_id)}")
        if request.next_address and not re.fullmatch(r"[\w.\-\[\]:]{1,255}:[0-9]{1,5}", request.next_address):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"next_address must be host:port, got {request.next_address[:80]!r}")
        if not 0 < request.max_context <= MAX_CONTEXT:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"max_context must be in 1..{MAX_CONTEXT}, got {request.max_context}")
        try:  # the proto message becomes the session's setting here, in CacheConfig only
            cache = CacheConfig.from_proto(request.cache).to_dict()
        except CacheConfigError as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            params = sampling.from_proto(request.sampling)
        except sampling.SamplingError as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        seed = request.sampling.seed if request.sampling.HasField("seed") else secrets.randbits(63)
        if request.next_address and stage.is_last(model):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "the last node of the model cannot have a next node")
        try:
            caches = self.host.run(make_caches, model, cache)
        except ValueError as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"cache config {cache}: {e}")
        session = Session(
            session_id=request.session_id,
            max_context=request.max_context,
            caches=caches,
            cache_config=cache,
            kv_bytes_reserved=self.host.kv_bytes(request.max_context, cache),
            next_address=request.next_address,
            sampling=params,
            rng_state=self.host.run(mx.random.key, seed),
        )
        self.sessions.add(session)
        return self._session_info(session)

    def _session_info(self, s):
        c = s.cache_config
        return pb.SessionInfo(
            session_id=s.session_id,
            offset=s.offset,
            max_context=s.max_context,
            cache=CacheConfig.from_dict(c).to_proto(pb),
            kv_bytes_reserved=s.kv_bytes_reserved,
            kv_bytes_used=s.kv_bytes_used(),
            next_address=s.next_address,
            created_unix=s.created,
            pending_token=s.pending_token,
        )

    @_rpc
    def Forward(self, request, context):
        return steps.execute(self, request, None, context)

    @_rpc
    def ForwardStream(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "ForwardStream must start with a header message")
        total = first.payload_bytes  # hook (h/cache): a missing session or an oversize declaration is refused here, unbuffered
        self.sessions.admit_stream(first.header.session_id, total, wire.MAX_TENSOR_BYTES)

        def chunks():
            if first.HasField("chunk"):
                yield first.chunk
            for m in counted(request_iterator, total - len(first.chunk.data)):  # hook (h/cache): count while reading
                if not m.HasField("chunk"):
                    raise wire.WireError("every ForwardStream message after the header must carry a chunk")
                yield m.chunk

        data = wire.join_proto_chunks(chunks(), total_bytes=total)
        return steps.execute(self, first.header, data, context)

    def forward_next(self, session, t, raw, want, timeout=None, **step):
        """Send the step on to the session's next node within the caller's deadline; re-handshake once if it was reloaded."""
        for attempt in (0, 1):
            client = self._next_client(session.next_address, fresh=attempt == 1)
            try:
                return client.forward_tensor(session.session_id, t, raw, want, timeout=timeout, **step)
            except grpc.RpcError as e:
                # refused at the gate (so nothing ran there): our token predates its last load
                if attempt or errors.reason_of(e) != errors.REASON_HANDSHAKE:
                    raise

    def _next_client(self, address, fresh=False):
        key = (address, self.desc["identity"])
        with self._next_lock:
            client = None if fresh else self._next.get(key)
            if client is None:
                try:
                    client = NodeClient(
                        address, self.desc["identity"], client_name=f"{self.name} (next hop)", secret=self.secret, tls=self.tls
                    )
                except grpc.RpcError as e:
                    raise Refused(grpc.StatusCode.UNAVAILABLE, f"next node {address}: {e.code().name}: {e.details()}")
                old = self._next.pop(key, None)
                if old is not None:
                    old.close()
                self._next[key] = client
            return client

    @_rpc
    def Trim(self, request, context):
        self._need_model()
        session = self.sessions.get(request.session_id)
        with session.lock:
            steps.check_lock(session, request.holder)
            if request.count > session.offset:
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"cannot trim {request.count} positions from a session holding {session.offset}",
                )
            if not all(c.is_trimmable() for c in session.caches):
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "this session's caches cannot be trimmed (a sliding window wrapped)")
            self.host.run(lambda: [c.trim(request.count) for c in session.caches])
            session.last_step = None  # a trimmed step is no longer applied: its retry runs again
            if request.count:
                session.pending_token = None
            if request.count:
                session.history = session.history[: max(0, len(session.history) - request.count)]
            return self._session_info(session)

    @_rpc
    def LockSession(self, request, context):
        session = self.sessions.get(request.session_id)
        with session.lock:  # after the step in flight; the next one sees the lock
            reply = steps.lock(session, request)
            reply.session.CopyFrom(self._session_info(session))
        return reply

    @_rpc
    def DropSession(self, request, context):
        return migration_rpc.serve_drop(self, request)

    @_rpc
    def GetMetrics(self, request, context):
        return pb.MetricsReply(text=self.metrics.render(self))

    @_rpc
    def ListSessions(self, request, context):
        return pb.ListSessionsReply(sessions=[self._session_info(s) for s in self.sessions.list()])

    # -- session migration: the work is in migration_rpc.py ----------------------

    @_rpc_stream
    def ExportSession(self, request, context):
        steps.check_lock(self.sessions.get(request.session_id), request.holder)
        yield from migration_rpc.serve_export(self, request)

    @_rpc
    def ImportSession(self, request_iterator, context):
        return migration_rpc.serve_import(self, request_iterator)

    @_rpc
    def PushSession(self, request, context):
        steps.check_lock(self.sessions.get(request.session_id), request.holder)
        return migration_rpc.serve_push(self, request)

    @_rpc
    def RerouteSession(self, request, context):
        return migration_rpc.serve_reroute(self, request)

    def close(self):
        with self._next_lock:
            for c in self._next.values():
                c.close()
            self._next.clear()
        self._stop.set()
        self.host.close()
