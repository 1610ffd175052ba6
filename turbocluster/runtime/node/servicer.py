"""A node's RPC surface: its shard, its sessions, the steps it runs and forwards down the pipeline.

The servicer validates every request before it touches the model, runs all
MLX work on one model thread (MLX is not run concurrently from gRPC threads),
keeps per-sequence caches in ``sessions.SessionStore`` and, when a session has
a next node, forwards each step's hidden state there itself, so a decode step
is one call from the coordinator that walks the pipeline node to node and
comes back with the sampled token.

Run it with ``turbo-node serve`` or ``python -m turbocluster.runtime.cli.node serve``.
"""

import math
import os
import re
import secrets
import socket
import sys
import threading
import time
import uuid
from concurrent import futures

import grpc
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.sample_utils import apply_top_p

from ...kernels.turboquant import FORMAT_VERSION
from ...proto import turbo_pb2 as pb
from ...proto import turbo_pb2_grpc as pb_grpc
from . import migration_rpc, model_access
from ..cache.factory import make_caches
from ..cache.config import CacheConfig, CacheConfigError, kv_bytes
from ..model import loader
from ..model.loader import weights_bytes
from ..model import shard as stage
from ..transport import auth, errors, wire
from ..transport.client import MD_COMPAT, MD_PROTOCOL, MD_TOKEN, NodeClient
from ..sessions.store import Session, SessionStore
from .gate import Refused, rpc as _rpc, rpc_stream as _rpc_stream

SERVICE = "turbocluster.v1.Node"
MAX_STEP_TOKENS = 8192  # positions in one Forward
MAX_CONTEXT = 1 << 20
MAX_TOKENS = 1024  # live handshake tokens; the oldest is forgotten first
MAX_SESSION_ID = 256  # characters of a session id
DEFAULT_SESSION_TTL = 1800.0  # seconds a session may sit idle before the node frees it
_OUTPUTS = (pb.OUTPUT_UNSPECIFIED, pb.NONE, pb.HIDDEN, pb.LOGITS, pb.TOKEN)


def backend():
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def default_memory_budget():
    """What this machine can give to weights + KV: Metal's recommended working set, else 75% of RAM."""
    if backend() == "metal":
        return int(mx.metal.device_info()["max_recommended_working_set_size"])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 3 // 4)


class NodeServicer(pb_grpc.NodeServicer):
    """State of one node: its shard, its sessions, the tokens it issued."""

    def __init__(self, name=None, memory_budget=None, secret=None, session_ttl=DEFAULT_SESSION_TTL, tls=None):
        self.secret = secret  # cluster secret (auth.py); also used to call the next node
        self.models_dir = None  # LoadLayers opens only models under it when set (model_access.py)
        self.tls = tls  # {"cert", "key", "ca"} PEM paths when serving TLS; also used to call the next node
        self.node_id = uuid.uuid4().hex[:12]
        self.name = name or socket.gethostname().split(".")[0]
        self.memory_budget = int(memory_budget or default_memory_budget())
        self.model = None
        self.desc = None  # loader.describe() of the loaded model
        self.compat = None
        self.weights_bytes = 0
        self.load_state, self.load_fraction, self.load_message = pb.EMPTY, 0.0, "no layers loaded"
        self.sessions = SessionStore(self.memory_budget)
        self.tokens = {}  # handshake token -> compat hash it is bound to
        self._lock = threading.Lock()  # guards the fields above against gRPC threads
        self._mx = futures.ThreadPoolExecutor(1, thread_name_prefix="mlx")  # the model thread
        self._next = {}  # (next-node address, model identity) -> NodeClient
        self._next_lock = threading.Lock()
        self.sessions.ttl = session_ttl or 0.0  # 0 = sessions never expire
        self._stop = threading.Event()
        if self.sessions.ttl:
            threading.Thread(target=self._reap, name="session-reaper", daemon=True).start()

    def _reap(self):
        """Free sessions idle for longer than the TTL; their ids answer NOT_FOUND saying so."""
        while not self._stop.wait(min(1.0, max(0.05, self.sessions.ttl / 4))):
            for s in self.sessions.expire():
                print(f"session {s.session_id} expired after {self.sessions.ttl:g} s idle", file=sys.stderr, flush=True)

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

    def run_on_model_thread(self, fn, *args):
        return self._mx.submit(fn, *args).result()

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
        with self._lock:
            d, model = self.desc, self.model
            start, end, total = stage.layer_range(model) if model is not None else (0, 0, 0)
            free_kv = self.sessions.budget_bytes - self.sessions.reserved()
            per_pos = self._kv_bytes(1 << 8, {}) >> 8 if model is not None else 0
            return pb.NodeInfo(
                node_id=self.node_id,
                name=self.name,
                backend=backend(),
                memory_budget_bytes=self.memory_budget,
                memory_used_bytes=self.weights_bytes + self.sessions.reserved(),
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
                load_state=self.load_state,
                load_fraction=self.load_fraction,
                load_message=self.load_message,
                weights_bytes=self.weights_bytes,
                max_context=max(free_kv, 0) // per_pos if per_pos else 0,
            )

    def _progress(self, state, fraction, message):
        with self._lock:
            self.load_state, self.load_fraction, self.load_message = state, fraction, message

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
        need = weights_bytes(desc, start, end)
        if need > self.memory_budget:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"layers {start}:{end} of {desc['name']} need {need} bytes of weights, "
                f"over node {self.name}'s {self.memory_budget}-byte budget",
            )
        if len(self.sessions):
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"{len(self.sessions)} live sessions; drop them before reloading")
        self._progress(pb.LOADING, 0.1, f"loading layers {start}:{end} of {desc['name']}")
        yield pb.LoadProgress(fraction=0.1, stage="load", message=self.load_message)
        job = self._mx.submit(self._load, loader, model_arg, start, end)
        t0 = time.monotonic()
        while True:
            try:
                model = job.result(timeout=0.5)
                break
            except futures.TimeoutError:
                # No finer progress from the loader; report that it is alive.
                f = min(0.9, 0.1 + 0.8 * (1 - math.exp(-(time.monotonic() - t0) / 10)))
                yield pb.LoadProgress(fraction=f, stage="load", message=f"loading ({time.monotonic() - t0:.1f} s)")
            except (ValueError, OSError, KeyError) as e:  # a bad model path or file: the caller's problem
                self._progress(pb.FAILED, 0.0, f"load failed: {e}")
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"could not load {request.model or 'default model'}: {e}")
        weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        with self._lock:
            self.model, self.desc, self.weights_bytes = model, desc, weights
            self.compat = wire.compat_hash(desc["identity"])
            self.sessions.budget_bytes = self.memory_budget - weights
            # tokens bound to another model can no longer be used
            self.tokens = {t: c for t, c in self.tokens.items() if c == self.compat}
        self._progress(pb.READY, 1.0, f"layers {start}:{end} of {desc['name']} ready")
        yield pb.LoadProgress(fraction=1.0, stage="ready", message=self.load_message, done=True, info=self.info())

    def _load(self, loader, model_arg, start, end):
        model, _ = loader.load(model_arg, layers=(start, end))
        mx.eval(model.parameters())
        return model

    def _kv_bytes(self, max_context, cache):
        """KV bytes this node's layers need for ``max_context`` positions (sliding layers capped at their window)."""
        d = self.desc
        start, _, layers = stage.layer_range(self.model)
        itemsize = 4 if loader.use_float32() else 2  # the activations' dtype is what float caches store
        total = 0
        for i, w in enumerate(stage.sliding_windows(self.model), start):
            positions = min(max_context, w) if w else max_context
            layer_cache = {} if w else cache  # sliding-window layers stay float RotatingKVCaches under TurboQuant too
            total += kv_bytes(1, d["num_kv_heads"], d["head_dim"], positions, layer_cache, itemsize, (i, i + 1), layers)
        return total

    def _need_model(self):
        model = self.model
        if model is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"node {self.name} has no layers loaded; call LoadLayers")
        return model

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
        s = request.sampling
        if not (math.isfinite(s.temperature) and s.temperature >= 0 and 0 <= s.top_p <= 1):
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"sampling needs temperature >= 0 and 0 <= top_p <= 1, got {s.temperature}, {s.top_p}",
            )
        if request.next_address and stage.is_last(model):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "the last node of the model cannot have a next node")
        try:
            caches = self.run_on_model_thread(make_caches, model, cache)
        except ValueError as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"cache config {cache}: {e}")
        session = Session(
            session_id=request.session_id,
            max_context=request.max_context,
            caches=caches,
            cache_config=cache,
            kv_bytes_reserved=self._kv_bytes(request.max_context, cache),
            next_address=request.next_address,
            sampling={"temperature": s.temperature, "top_p": s.top_p},
            rng_state=self.run_on_model_thread(mx.random.key, s.seed if s.HasField("seed") else secrets.randbits(63)),
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
        )

    def _input(self, model, request, data=None):
        """Validate the step's input against this shard: ``(build, positions, bytes_in)``.

        ``build()`` makes the mx.array; it runs on the model thread because MLX
        streams belong to the thread that made them.
        """
        kind = request.WhichOneof("input")
        first = stage.is_first(model)
        if kind == "tokens":
            if not first:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "token ids go to the first node; this node takes hidden states")
            ids = list(request.tokens.ids)
            if not 0 < len(ids) <= MAX_STEP_TOKENS:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"a step takes 1..{MAX_STEP_TOKENS} tokens, got {len(ids)}")
            vocab = self.desc["vocab_size"]
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"token ids {bad[:5]} out of vocabulary [0, {vocab})")
            return (lambda: mx.array([ids], dtype=mx.int32)), len(ids), 4 * len(ids)
        if kind == "hidden":
            if first:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "the first node takes token ids, not hidden states")
            t = request.hidden
            shape = list(t.shape)
            hidden = self.desc["hidden_size"]
            if len(shape) != 3 or shape[0] != 1 or shape[2] != hidden or not 0 < shape[1] <= MAX_STEP_TOKENS:
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"hidden state must have shape [1, L, {hidden}] with 1 <= L <= {MAX_STEP_TOKENS}, got {shape}",
                )
            if t.dtype not in (pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16):
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"hidden state must be float32/float16/bfloat16, got dtype {t.dtype}")
            raw = t.data if data is None else data
            wire.check_tensor(int(t.dtype), shape, raw)  # WireError -> INVALID_ARGUMENT, before the model thread
            return (lambda: wire.from_proto(t, raw)), shape[1], len(raw)
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "a Forward needs tokens or a hidden tensor")

    @_rpc
    def Forward(self, request, context):
        return self._forward(request, None, context)

    @_rpc
    def ForwardStream(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "ForwardStream must start with a header message")
        total = first.payload_bytes
        if total > wire.MAX_TENSOR_BYTES:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"payload of {total} bytes is over the {wire.MAX_TENSOR_BYTES}-byte cap")

        def chunks():
            if first.HasField("chunk"):
                yield first.chunk
            for m in request_iterator:
                if not m.HasField("chunk"):
                    raise wire.WireError("every ForwardStream message after the header must carry a chunk")
                yield m.chunk

        data = wire.join_proto_chunks(chunks(), total_bytes=total)
        return self._forward(first.header, data, context)

    def _forward(self, request, data, context):
        t0 = time.perf_counter()
        model = self._need_model()
        session = self.sessions.get(request.session_id)
        build, positions, nbytes = self._input(model, request, data)
        if request.want not in _OUTPUTS:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"want must be one of {list(_OUTPUTS)}, got {request.want}")
        want = request.want or pb.TOKEN
        last = stage.is_last(model)
        onward = want != pb.HIDDEN and bool(session.next_address)
        if not onward and not last and want in (pb.LOGITS, pb.TOKEN):
            start, end, total = stage.layer_range(model)
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node holds layers {start}:{end} of {total} and the session has no next node; "
                "only the last node returns logits or tokens",
            )
        with session.lock:
            if session.offset + positions > session.max_context:
                raise Refused(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"session {session.session_id} holds {session.offset} positions; {positions} more "
                    f"would pass its max_context {session.max_context}",
                )
            out = self.run_on_model_thread(self._step, model, session, build, want, onward)
            t1 = time.perf_counter()
            if onward:
                t, raw = out
                remaining = context.time_remaining() if context is not None else None
                reply = self._forward_next(session, t, raw, want, None if remaining is None else max(0.05, remaining - 0.05))
            else:
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
        hop = pb.Hop(
            node_id=self.node_id,
            compute_ms=(t1 - t0) * 1e3,
            total_ms=(time.perf_counter() - t0) * 1e3,
            bytes_in=nbytes,
        )
        reply.hops.insert(0, hop)
        return reply

    def _step(self, model, session, build, want, onward):
        """Model thread: run the shard on the input and produce what the step asks for.

        Tensors come back as ``(proto header, raw bytes)``, serialised here on the model thread.
        """
        caches = session.caches
        x = build()
        h = stage.embed(model, x) if stage.is_first(model) else x
        h = stage.run_layers(model, h, caches, overlap=True)
        if onward or want == pb.HIDDEN:
            mx.eval(h, [c.state for c in caches])
            return wire.to_proto(h, with_data=False)
        if want == pb.NONE:
            mx.eval([c.state for c in caches])
            return None
        logits = stage.head(model, h)[:, -1, :]
        if want == pb.LOGITS:
            return wire.to_proto(logits[0], with_data=False)
        # What mlx_lm.generate_step does with the last position's logits.
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        s = session.sampling
        if s["temperature"] == 0:
            token = mx.argmax(logprobs, axis=-1)
        else:
            if 0 < s["top_p"] < 1:
                logprobs = apply_top_p(logprobs, s["top_p"])
            session.rng_state, key = mx.random.split(session.rng_state)
            token = mx.random.categorical(logprobs * (1 / s["temperature"]), key=key)
        return int(token.item())

    def _forward_next(self, session, t, raw, want, timeout=None):
        """Send the step on to the session's next node within the caller's deadline; re-handshake once if it was reloaded."""
        for attempt in (0, 1):
            client = self._next_client(session.next_address, fresh=attempt == 1)
            try:
                return client.forward_tensor(session.session_id, t, raw, want, timeout=timeout)
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
            if request.count > session.offset:
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"cannot trim {request.count} positions from a session holding {session.offset}",
                )
            if not all(c.is_trimmable() for c in session.caches):
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "this session's caches cannot be trimmed (a sliding window wrapped)")
            self.run_on_model_thread(lambda: [c.trim(request.count) for c in session.caches])
            return self._session_info(session)

    @_rpc
    def DropSession(self, request, context):
        s = self.sessions.drop(request.session_id)
        return pb.DropSessionReply(bytes_freed=s.kv_bytes_reserved)

    @_rpc
    def ListSessions(self, request, context):
        return pb.ListSessionsReply(sessions=[self._session_info(s) for s in self.sessions.list()])

    # -- session migration: the work is in migration_rpc.py ----------------------

    @_rpc_stream
    def ExportSession(self, request, context):
        yield from migration_rpc.serve_export(self, request)

    @_rpc
    def ImportSession(self, request_iterator, context):
        return migration_rpc.serve_import(self, request_iterator)

    @_rpc
    def PushSession(self, request, context):
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
        self._mx.shutdown(wait=False)
