"""The client side of a node's gRPC contract: one handshaken connection per node.

Every call carries the protocol version, the handshake token and the compat
hash in metadata, and unary calls the crc32 of their body, so the node can
refuse a stale or damaged call before it parses it.
"""

import secrets
import zlib

import grpc

from ...kernels.turboquant import FORMAT_VERSION
from ...proto import turbo_pb2 as pb
from ...proto import turbo_pb2_grpc as pb_grpc
from ..cache.config import CacheConfig
from . import auth, errors, wire
from .streams import Replayable

MD_PROTOCOL, MD_TOKEN, MD_COMPAT = "turbo-protocol", "turbo-token", "turbo-compat"
MAX_MESSAGE_BYTES = 4 << 20  # gRPC's default cap; payloads above CHUNK_BYTES go by ForwardStream
MD_CRC = "turbo-crc32"  # zlib.crc32 of the serialised request body, decimal; checked before it is parsed
FORWARD_TIMEOUT = 120.0  # default deadline of a Forward walking the pipeline (the coordinator sets its own)
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_http_proxy", 0),
    # a node that restarts on its port must be reachable again within a second (failover.py):
    # no connection shared with other channels, and no long reconnect backoff after a failure
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class NodeNotAuthenticated(errors.ClusterError):
    """A node answered the handshake without proof that it holds the cluster secret."""


class NodeClient:
    """One handshaken connection to a node. Failed calls raise grpc.RpcError with the node's status.

    Every call has a deadline (``timeout`` seconds unless the method says otherwise), so a
    node that stops answering fails the call with DEADLINE_EXCEEDED instead of hanging it;
    unary requests carry the crc32 of their body (``turbo-crc32``), checked by the node.
    ``tls`` = ``{"ca", "cert", "key"}`` (PEM paths) dials with TLS, presenting a client
    certificate when cert and key are given (mTLS).
    """

    def __init__(
        self, address, model_identity, client_name="coordinator", timeout=10.0, will_load=False, secret=None, tls=None,
        load_timeout=600.0,
    ):
        self.address = address
        self.timeout, self.load_timeout = timeout, load_timeout
        if tls:
            creds = auth.channel_credentials(tls.get("ca"), tls.get("cert"), tls.get("key"))
            self.channel = grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._auth = auth.AuthClientInterceptor(secret) if secret else None
        calls = auth.authenticated_channel(self.channel, secret, self._auth) if secret else self.channel
        self.stub = pb_grpc.NodeStub(calls)
        self.compat = wire.compat_hash(model_identity)
        challenge = secrets.token_hex(16)
        try:
            reply = self.stub.Handshake(
                pb.HandshakeRequest(
                    protocol_version=wire.PROTOCOL_VERSION,
                    format_version=FORMAT_VERSION,
                    model_identity=model_identity,
                    compat_hash=self.compat,
                    client_name=client_name,
                    will_load=will_load,
                    challenge=challenge,
                ),
                metadata=((MD_PROTOCOL, str(wire.PROTOCOL_VERSION)),),
                timeout=timeout,
                wait_for_ready=True,
            )
        except grpc.RpcError:
            self.channel.close()
            raise
        if secret and not auth.check_node_proof(secret, challenge, reply.node_id, reply.node_proof):
            self.channel.close()
            raise NodeNotAuthenticated(
                f"node {address} did not prove it holds the cluster secret (a rogue node, or one with "
                "another secret): refusing it", grpc.StatusCode.UNAUTHENTICATED,
            )
        if self._auth is not None:
            self._auth.target = reply.node_id  # every later credential names this node only
        self.node_id = reply.node_id
        self.token = reply.token
        self.handshake = reply
        self.metadata = (
            (MD_PROTOCOL, str(wire.PROTOCOL_VERSION)),
            (MD_TOKEN, reply.token),
            (MD_COMPAT, self.compat),
        )

    def _md(self, request):
        """Metadata for a unary call: the handshake's, plus the crc32 of ``request``'s body."""
        return self.metadata + ((MD_CRC, str(zlib.crc32(request.SerializeToString()))),)

    def _unary(self, rpc, request, timeout=None):
        return rpc(request, metadata=self._md(request), timeout=timeout or self.timeout)

    def info(self, timeout=None):
        return self._unary(self.stub.GetInfo, pb.InfoRequest(), timeout)

    def load(self, model, start, end, progress=None):
        """LoadLayers; ``progress(LoadProgress)`` sees every message. Returns the final NodeInfo."""
        last = None
        request = pb.LoadRequest(model=model or "", layer_start=start, layer_end=end)
        for p in self.stub.LoadLayers(request, metadata=self._md(request), timeout=self.load_timeout):
            last = p
            if progress:
                progress(p)
        if last is None or not last.done:
            raise RuntimeError(f"node {self.address} ended LoadLayers without a done message")
        return last.info

    def create_session(
        self, session_id, max_context, cache=None, next_address="", temperature=0.0, top_p=0.0, seed=None, **sampling
    ):
        """CreateSession; ``sampling`` takes the other ``pb.Sampling`` fields (top_k, min_p, repetition_penalty, ...)."""
        sampling = pb.Sampling(temperature=temperature, top_p=top_p, **sampling)
        if seed is not None:
            sampling.seed = seed
        request = pb.CreateSessionRequest(
            session_id=session_id,
            max_context=max_context,
            cache=CacheConfig.from_dict(cache, check=False).to_proto(pb),  # the node checks it
            next_address=next_address,
            sampling=sampling,
        )
        return self._unary(self.stub.CreateSession, request)

    def forward(
        self, session_id, tokens=None, hidden=None, want=pb.TOKEN, timeout=None, expected_position=None, step_id="",
        holder="",
    ):
        """One step with token ids or an mx.array hidden state (made on the calling thread).

        ``expected_position``: the offset every stage must hold before the step (else
        FAILED_PRECONDITION, reason ``position-mismatch``, nothing applied); ``step_id``: an
        idempotency key (a retry of an applied step returns its recorded reply); ``holder``:
        the session lock's holder, when the caller holds it.
        """
        if tokens is not None:
            request = _step_request(session_id, want, expected_position, step_id, holder)
            request.tokens.ids.extend(tokens)
            return self._unary(self.stub.Forward, request, timeout or FORWARD_TIMEOUT)
        t, raw = wire.to_proto(hidden, with_data=False)
        return self.forward_tensor(
            session_id, t, raw, want, timeout=timeout, expected_position=expected_position, step_id=step_id, holder=holder
        )

    def forward_tensor(
        self, session_id, t, raw, want=pb.TOKEN, timeout=None, expected_position=None, step_id="", holder="", context_ids=None,
    ):
        """One step with a serialised hidden state; payloads above CHUNK_BYTES go by ForwardStream."""
        request = _step_request(session_id, want, expected_position, step_id, holder)
        if context_ids:
            request.context_ids.ids.extend(context_ids)
        if len(raw) <= wire.CHUNK_BYTES:
            t.data = raw
            request.hidden.CopyFrom(t)
            return self._unary(self.stub.Forward, request, timeout or FORWARD_TIMEOUT)
        request.hidden.CopyFrom(t)

        def messages():
            yield pb.ForwardChunk(header=request, payload_bytes=len(raw))
            for c in wire.proto_chunks(raw):
                yield pb.ForwardChunk(chunk=c)

        # made as sent (twice with a secret: the credential's digest first), never all held beside ``raw``
        return self.stub.ForwardStream(Replayable(messages), metadata=self.metadata, timeout=timeout or FORWARD_TIMEOUT)

    def trim(self, session_id, count, timeout=None, holder=""):
        return self._unary(self.stub.Trim, pb.TrimRequest(session_id=session_id, count=count, holder=holder), timeout)

    def lock_session(self, session_id, holder, ttl_s, timeout=None):
        """Lock the session for ``holder`` for ``ttl_s`` seconds (renews if held); waits for a step in flight.

        Others' Forward/Trim/Export/Push are then refused ABORTED (reason ``session-locked``).
        Returns LockSessionReply; ABORTED ``session-locked`` if another holder has it.
        """
        request = pb.LockSessionRequest(session_id=session_id, holder=holder, ttl_s=ttl_s)
        return self._unary(self.stub.LockSession, request, timeout)

    def unlock_session(self, session_id, holder, timeout=None):
        """Release ``holder``'s lock on the session (a no-op if it is not locked)."""
        request = pb.LockSessionRequest(session_id=session_id, holder=holder, unlock=True)
        return self._unary(self.stub.LockSession, request, timeout)

    def drop(self, session_id, timeout=None, holder="", moved_to=""):
        """DropSession (its staged copy too); ``holder``: the lock's holder; ``moved_to``: where a migration put it."""
        request = pb.DropSessionRequest(session_id=session_id, holder=holder, moved_to=moved_to)
        return self._unary(self.stub.DropSession, request, timeout)

    def sessions(self, timeout=None):
        return list(self._unary(self.stub.ListSessions, pb.ListSessionsRequest(), timeout).sessions)

    def metrics(self, timeout=None) -> str:
        """The node's Prometheus text (GetMetrics)."""
        return self._unary(self.stub.GetMetrics, pb.MetricsRequest(), timeout).text

    def close(self):
        self.channel.close()



def _step_request(session_id, want, expected_position, step_id, holder):
    request = pb.ForwardRequest(session_id=session_id, want=want, step_id=step_id or "", holder=holder or "")
    if expected_position is not None:
        request.expected_position = expected_position
    return request
