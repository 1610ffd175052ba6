"""Cluster secret and RPC authentication.

Every node of a cluster shares one secret. Each call carries the metadata
``turbo-auth: v2:<unix ms>:<nonce>:<target>:<body>:<mac>`` where ``mac`` is
HMAC-SHA256(secret, "turbo-cluster-auth/v2\\n<method>\\n<target>\\n<body>\\n<unix ms>\\n<nonce>"),
``target`` the node id of the node called (empty only for Handshake, before the
caller knows it) and ``body`` the sha256 of the serialised request, or for a
streamed request ``stream_digest`` of all its messages (checked as the stream
ends, before the handler sees its end; handlers read streams to the end before
they act, as wire.join_chunks does). So a captured
credential works for neither another body nor another node, and each node
refuses a nonce it already accepted: a replay is refused cluster-wide. Refusals
are UNAUTHENTICATED with a ``turbo-reason`` (``REASON_*``). The health-check
service stays open so orchestration can probe. The node proves it holds the
secret too: its HandshakeReply carries ``node_proof`` of the caller's random
challenge. On networks you do not trust, add TLS for confidentiality.
"""

import collections
import hmac
import inspect
import ipaddress
import logging
import os
import re
import secrets
import threading
import time
from hashlib import sha256
from pathlib import Path

import grpc

from . import errors, handlers
from .streams import digest_then_messages, hasher as _stream_hasher, stream_digest, update as _stream_update  # noqa: F401  (stream_digest: callers' name)

log = logging.getLogger(__name__)

HEADER = "turbo-auth"
SCHEME = "v2"
ENV_SECRET = "TURBO_CLUSTER_SECRET"
ENV_SECRET_FILE = "TURBO_SECRET_FILE"
STREAM_BODY = "-"  # no body digest: refused for every call but those the verifier alone checks (tests)
MAX_NONCES = 1 << 17  # nonces remembered at once; past it (after expiry) new calls are refused, never forgotten early
REASON_MISSING, REASON_MALFORMED, REASON_MAC = "auth-missing", "auth-malformed", "auth-mac"
REASON_SKEW, REASON_REPLAY, REASON_TARGET = "auth-skew", "auth-replay", "auth-target"
REASON_BODY, REASON_BUSY = "auth-body", "auth-busy"
MAX_SKEW_S = 30.0
MIN_SECRET_CHARS = 16
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
_CREDENTIAL = re.compile(r"v2:([0-9]{1,16}):([0-9a-f]{32}):([0-9a-zA-Z_-]{0,64}):([0-9a-f]{64}|-):([0-9a-f]{64})")


# -- the secret ---------------------------------------------------------------


def default_secret_path():
    """``$XDG_CONFIG_HOME/turbo-cluster/secret``, or under ``~/.config``."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "turbo-cluster" / "secret"


def _checked(secret, source):
    secret = secret.strip()
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(f"secret from {source} must be at least {MIN_SECRET_CHARS} characters, found {len(secret)}")
    return secret


def load_or_create_secret(path=None, value=None):
    """The cluster secret: ``value``, else $TURBO_CLUSTER_SECRET, else the file.

    The file (default ``default_secret_path()``) is created on first use with
    32 random bytes in hex, mode 0600 in a 0700 directory, and refused if other
    users can read it, as ssh refuses a readable key.
    """
    if value is not None:
        return _checked(value, "the explicit value")
    if os.environ.get(ENV_SECRET):
        return _checked(os.environ[ENV_SECRET], f"${ENV_SECRET}")
    path = Path(path) if path is not None else default_secret_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic and never overwrites a secret another process just made
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"secret file {path} has mode {mode:04o}, expected 0600 (run: chmod 600 {path})")
    return _checked(path.read_text(), str(path))


def find_secret(path=None):
    """The secret to use, or None: ``path``, $TURBO_CLUSTER_SECRET, $TURBO_SECRET_FILE, else the
    default file when it exists. Unlike ``load_or_create_secret``, never creates one."""
    if path is not None or os.environ.get(ENV_SECRET):
        return load_or_create_secret(path)
    if os.environ.get(ENV_SECRET_FILE):
        path = Path(os.environ[ENV_SECRET_FILE])
        if not path.exists():
            raise FileNotFoundError(f"${ENV_SECRET_FILE} names {path}, which does not exist (run: turbo-node secret)")
        return load_or_create_secret(path)
    if default_secret_path().exists():
        return load_or_create_secret(default_secret_path())
    return None


def _key(secret):
    if isinstance(secret, str):
        secret = secret.encode()
    if not secret:
        raise ValueError("an auth interceptor needs a non-empty secret")
    return secret


# -- credentials ----------------------------------------------------------------


def _mac(key, method, target, body, ts_ms, nonce):
    text = f"turbo-cluster-auth/{SCHEME}\n{method}\n{target}\n{body}\n{ts_ms}\n{nonce}"
    return hmac.new(key, text.encode(), sha256).hexdigest()


def body_digest(request) -> str:
    """sha256 hex of a request's serialised bytes (``request`` is bytes or a protobuf message)."""
    raw = request if isinstance(request, (bytes, bytearray)) else request.SerializeToString()
    return sha256(raw).hexdigest()


def make_credential(secret, method: str, now=None, target: str = "", body: str = STREAM_BODY) -> str:
    """The ``turbo-auth`` metadata value for one call of ``method`` to node ``target`` with body digest ``body``."""
    ts_ms = int((time.time() if now is None else now) * 1000)
    nonce = secrets.token_hex(16)
    return f"{SCHEME}:{ts_ms}:{nonce}:{target}:{body}:{_mac(_key(secret), method, target, body, ts_ms, nonce)}"


def node_proof(secret, challenge: str, node_id: str) -> str:
    """What a node answers to a Handshake's challenge: proof that it holds the secret, bound to its id."""
    text = f"turbo-cluster-node/{SCHEME}\n{challenge}\n{node_id}"
    return hmac.new(_key(secret), text.encode(), sha256).hexdigest()


def check_node_proof(secret, challenge: str, node_id: str, proof: str) -> bool:
    """True when ``proof`` is ``node_proof`` of ``challenge`` for ``node_id`` (constant time)."""
    return bool(challenge) and hmac.compare_digest(proof or "", node_proof(secret, challenge, node_id))


class _Nonces:
    """Nonces accepted while their credential could still be valid, to refuse replays."""

    def __init__(self, limit=MAX_NONCES):
        self._expiry, self._lock, self._prune_at, self._limit = {}, threading.Lock(), 1024, limit

    def add(self, nonce, expiry, now):
        """True if new; False for a replay; None when full of live nonces (refuse, never forget one early)."""
        with self._lock:
            if len(self._expiry) >= self._prune_at:
                self._expiry = {n: t for n, t in self._expiry.items() if t >= now}
                self._prune_at = min(self._limit, max(1024, 2 * len(self._expiry)))
            if nonce in self._expiry:
                return False
            if len(self._expiry) >= self._limit:
                return None
            self._expiry[nonce] = expiry
            return True

    def __len__(self):
        return len(self._expiry)


class Verifier:
    """Checks ``turbo-auth`` credentials; shared by the sync and asyncio interceptors."""

    def __init__(self, secret, max_skew=MAX_SKEW_S, exempt=EXEMPT_PREFIXES, clock=time.time, identity="", max_nonces=MAX_NONCES):
        self._key, self._skew, self._exempt, self._clock = _key(secret), max_skew, tuple(exempt), clock
        self.identity = identity  # this node's id: credentials must name it (or nothing, for Handshake only)
        self._nonces = _Nonces(max_nonces)

    def check(self, method, metadata):
        """``(None, body digest or None)`` when the call may proceed, else ``((why, reason), None)``."""
        if method.startswith(self._exempt):
            return None, None
        values = [v for k, v in metadata or () if k == HEADER]
        if len(values) != 1:
            return (f"expected one '{HEADER}' metadata credential, found {len(values)}; is the cluster secret set?", REASON_MISSING), None
        match = _CREDENTIAL.fullmatch(values[0]) if isinstance(values[0], str) else None
        if match is None:
            return (f"'{HEADER}' must look like {SCHEME}:<unix ms>:<32 hex nonce>:<target>:<body sha256>:<64 hex mac>", REASON_MALFORMED), None
        ts_ms, nonce, target, body, mac = int(match[1]), match[2], match[3], match[4], match[5]
        if not hmac.compare_digest(mac, _mac(self._key, method, target, body, ts_ms, nonce)):
            return ("credential does not match this cluster's secret, method and body", REASON_MAC), None
        if target != self.identity and not (target == "" and method.endswith("/Handshake")):
            return (f"credential names node {target!r}, not this node {self.identity!r}", REASON_TARGET), None
        now = self._clock()
        if abs(now - ts_ms / 1000) > self._skew:
            return (f"credential timestamp is {now - ts_ms / 1000:+.1f} s old, over the {self._skew:.0f} s allowed; check the clocks", REASON_SKEW), None
        added = self._nonces.add(nonce, ts_ms / 1000 + self._skew, now)
        if added is None:
            return (f"over {len(self._nonces)} live credentials; retry in {self._skew:.0f} s", REASON_BUSY), None
        if not added:
            return ("credential was already used (replay)", REASON_REPLAY), None
        return None, body

    def refusal(self, method, metadata):
        """Why a call must be refused, or None when it may proceed (the body is checked by the interceptor)."""
        refused, _ = self.check(method, metadata)
        return None if refused is None else refused[0]


# -- server side ----------------------------------------------------------------


def _refusing(handler, why, reason, aio=False):
    """A handler of the same kind as ``handler`` that fails with UNAUTHENTICATED and ``reason``."""
    if aio:
        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why, trailing_metadata=((errors.REASON_KEY, reason),))
    elif handler.response_streaming:
        def refuse(request, context):
            errors.abort(context, grpc.StatusCode.UNAUTHENTICATED, why, reason)
            yield  # pragma: no cover
    else:
        def refuse(request, context):
            errors.abort(context, grpc.StatusCode.UNAUTHENTICATED, why, reason)

    return handlers.like(handler, refuse)


class Rejected:
    """Base of the stand-ins an interceptor's deserializer returns for a request it refuses."""


class _BadBody(Rejected):
    """Stands in for a request whose bytes are not the ones the credential was made for."""

    def __init__(self, found):
        self.why = f"request body has sha256 {found[:16]}..., not the one its credential was made for"


def _body_bound(handler, digest, aio=False):
    """``handler`` refusing, before its body is parsed, a body whose sha256 is not ``digest``."""
    if handler.request_streaming:
        if aio:  # grpc.aio streams are not bound to their messages (the node serves with sync gRPC)
            return handler if digest == STREAM_BODY else _refusing(handler, "an aio stream's credential carries body '-'", REASON_BODY, aio)
        if digest == STREAM_BODY:
            return _refusing(handler, "a streamed call's credential must carry the stream_digest of its messages", REASON_BODY)
        return _stream_bound(handler, digest)
    parse = handler.request_deserializer

    def deserialize(raw):
        found = sha256(raw).hexdigest()
        request = parse(raw) if parse else raw
        if hmac.compare_digest(found, digest):
            return request
        # damaged on the way (an inner check, e.g. the node's crc32, says so: DATA_LOSS, retryable), else forged
        return request if isinstance(request, Rejected) else _BadBody(found)

    inner = handlers.behavior(handler)
    if aio:
        if handler.response_streaming:
            async def run(request, context):
                if isinstance(request, _BadBody):
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, request.why, trailing_metadata=((errors.REASON_KEY, REASON_BODY),))
                replies = inner(request, context)
                if hasattr(replies, "__aiter__"):
                    async for reply in replies:
                        yield reply
                else:
                    for reply in replies:
                        yield reply
        else:
            async def run(request, context):
                if isinstance(request, _BadBody):
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, request.why, trailing_metadata=((errors.REASON_KEY, REASON_BODY),))
                reply = inner(request, context)
                return await reply if inspect.isawaitable(reply) else reply
    elif handler.response_streaming:
        def run(request, context):
            if isinstance(request, _BadBody):
                errors.abort(context, grpc.StatusCode.UNAUTHENTICATED, request.why, REASON_BODY)
            yield from inner(request, context)
    else:
        def run(request, context):
            if isinstance(request, _BadBody):
                errors.abort(context, grpc.StatusCode.UNAUTHENTICATED, request.why, REASON_BODY)
            return inner(request, context)

    return handlers.like(handler, run, deserialize, handler.response_serializer)


def _stream_bound(handler, digest):
    """``handler`` whose request stream ends in UNAUTHENTICATED, before the handler sees the end,
    when its messages are not the ones the credential's ``stream_digest`` names."""
    parse, h, state = handler.request_deserializer, _stream_hasher(), {"verified": False}

    def deserialize(raw):
        _stream_update(h, raw)
        return parse(raw) if parse else raw

    def verify(context):
        if not hmac.compare_digest(h.hexdigest(), digest):
            errors.abort(context, grpc.StatusCode.UNAUTHENTICATED, "the streamed messages are not the ones its credential was made for", REASON_BODY)
        state["verified"] = True

    def checked(requests, context):
        yield from requests
        verify(context)

    def unverified(context):  # a handler that acted without reading to the end: its reply is not sent
        if not state["verified"]:
            log.error("%s returned before reading its stream to the end; the body was not verified", handler)
            errors.abort(context, grpc.StatusCode.UNAUTHENTICATED, "stream not read to its end; its body was not verified", REASON_BODY)

    inner = handlers.behavior(handler)
    if handler.response_streaming:
        def run(requests, context):  # replies may interleave with requests: the check is at the end
            yield from inner(checked(requests, context), context)
            unverified(context)
    else:
        def run(requests, context):
            reply = inner(checked(requests, context), context)
            unverified(context)
            return reply

    return handlers.like(handler, run, deserialize, handler.response_serializer)


def _guarded(verifier, details, handler, aio=False):
    refused, digest = verifier.check(details.method, details.invocation_metadata)
    if handler is None or (refused is None and digest is None):
        return handler
    if refused is not None:
        log.warning("refused %s: %s", details.method, refused[0])
        return _refusing(handler, *refused, aio=aio)
    return _body_bound(handler, digest, aio)


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without a valid ``turbo-auth`` credential for this node and body (health checks exempt)."""

    def __init__(self, secret, **kwargs):
        self.verifier = Verifier(secret, **kwargs)

    def intercept_service(self, continuation, details):
        return _guarded(self.verifier, details, continuation(details))


class AioAuthInterceptor(grpc.aio.ServerInterceptor):
    """``AuthInterceptor`` for ``grpc.aio`` servers."""

    def __init__(self, secret, **kwargs):
        self.verifier = Verifier(secret, **kwargs)

    async def intercept_service(self, continuation, details):
        return _guarded(self.verifier, details, await continuation(details), aio=True)


# -- client side ----------------------------------------------------------------


class _Details(
    collections.namedtuple("_Details", "method timeout metadata credentials wait_for_ready compression"),
    grpc.ClientCallDetails,
):
    pass


def _metadata(secret, details, target="", request=None, body=None):
    """The call's metadata plus a fresh credential for its method, target node and body."""
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    body = body or (STREAM_BODY if request is None else body_digest(request))
    return list(details.metadata or ()) + [(HEADER, make_credential(secret, method, target=target, body=body))]


class AuthClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds a fresh ``turbo-auth`` credential to every call; works on insecure channels.

    ``target`` is the called node's id, set once its handshake proved it (NodeClient does).
    """

    def __init__(self, secret, target=""):
        self._secret, self.target = _key(secret), target

    def _details(self, d, request=None, body=None):
        md = _metadata(self._secret, d, self.target, request, body)
        return _Details(d.method, d.timeout, md, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details, request), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details, request), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        body, messages = digest_then_messages(request_iterator)  # the credential covers every message
        return continuation(self._details(details, body=body), messages)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        body, messages = digest_then_messages(request_iterator)
        return continuation(self._details(details, body=body), messages)


def authenticated_channel(channel, secret, interceptor=None):
    """``channel`` with every call carrying a credential for ``secret`` (or from ``interceptor``)."""
    return grpc.intercept_channel(channel, interceptor or AuthClientInterceptor(secret))


class _AioClient:
    def __init__(self, secret, target=""):
        self._secret, self.target = _key(secret), target

    def _details(self, d, request=None):
        md = _metadata(self._secret, d, self.target, request)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, md, d.credentials, d.wait_for_ready)


class _AioUnaryUnary(_AioClient, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details, request), request)


class _AioUnaryStream(_AioClient, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details, request), request)


class _AioStreamUnary(_AioClient, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _AioStreamStream(_AioClient, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def aio_client_interceptors(secret, target=""):
    """Interceptors for ``grpc.aio.insecure_channel(..., interceptors=...)``.

    grpc.aio accepts one interceptor per call kind, so this is a list of four.
    """
    return [cls(secret, target) for cls in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]


# -- exposure and TLS ----------------------------------------------------------------


def is_loopback(host):
    """True for localhost and loopback addresses; any other name or address is exposed."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_error(host, secret):
    """Why a node must not listen on ``host`` without a secret, or None (loopback stays zero-config)."""
    if secret or is_loopback(host):
        return None
    return (
        f"refusing to listen on {host} without a cluster secret: run `turbo-node secret` to make one "
        f"({default_secret_path()}), copy it to the other machines, or bind --host 127.0.0.1"
    )


def warn_if_exposed(host, secret):
    """A warning (also logged) when ``host`` is reachable from other machines without a secret."""
    if secret or is_loopback(host):
        return None
    message = (
        f"listening on {host} without a cluster secret: anyone who can reach this port can run "
        f"the model and read sessions; set ${ENV_SECRET} or use the secret file {default_secret_path()}"
    )
    log.warning(message)
    return message


def _read(path, what):
    if path is None:
        raise ValueError(f"TLS needs the {what} file, got None")
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"TLS {what} file {path} not found (expected a PEM file)") from None


def server_credentials(cert, key, ca=None):
    """TLS for a server; with ``ca``, clients must present a certificate it signed (mTLS)."""
    pair = [(_read(key, "private key"), _read(cert, "certificate"))]
    if ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=_read(ca, "CA certificate"), require_client_auth=True)


def channel_credentials(ca, cert=None, key=None):
    """TLS for a client trusting ``ca``; ``cert`` and ``key`` together add a client certificate."""
    if (cert is None) != (key is None):
        raise ValueError(f"a client certificate needs both cert and key, got cert={cert!r} key={key!r}")
    root = _read(ca, "CA certificate")
    if cert is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    return grpc.ssl_channel_credentials(root, _read(key, "private key"), _read(cert, "certificate"))
