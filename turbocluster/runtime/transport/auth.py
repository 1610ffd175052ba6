"""Cluster secret and RPC authentication, bound to the whole call.

Every node of a cluster shares one secret. Each call carries the metadata
``turbo-auth: v2:<unix ms>:<nonce>:<target>:<body sha256>:<mac>`` where ``mac`` is
HMAC-SHA256(secret, "turbo-cluster-auth/v2\\n<method>\\n<target>\\n<body sha256>\\n<unix ms>\\n<nonce>").
``target`` is the node id the callee announced in its handshake (empty only for
Handshake itself, before the caller knows it), and the digest covers the
serialised request body (a stream's first message). So a captured credential
is refused with another body, on another node, after ``MAX_SKEW_S``, and a
second time on the same node (a bounded nonce cache). Refusals are
UNAUTHENTICATED with a ``REASON_*`` code in trailing metadata (errors.REASON_KEY).

Mutual authentication: the caller sends a random challenge in HandshakeRequest
and the node answers with ``node_proof(secret, challenge, node_id)``; a caller
with a secret uses nothing from a node that cannot prove it (transport/client.py).

The health-check service stays open so orchestration can probe. This proves who
is calling and what they sent, not secrecy: on networks you do not trust, add
TLS (``server_credentials`` / ``channel_credentials``).
"""

import collections
import hmac
import ipaddress
import itertools
import logging
import os
import re
import secrets
import threading
import time
import zlib
from hashlib import sha256
from pathlib import Path

import grpc

from . import errors, handlers

log = logging.getLogger(__name__)

HEADER = "turbo-auth"
SCHEME = "v2"
ENV_SECRET = "TURBO_CLUSTER_SECRET"
ENV_SECRET_FILE = "TURBO_SECRET_FILE"
CRC_HEADER = "turbo-crc32"  # client.MD_CRC: a body damaged on the way is DATA_LOSS, not an attack
MAX_SKEW_S = 30.0
MIN_SECRET_CHARS = 16
MAX_NONCES = 1 << 16  # live nonces per node; past that, calls are refused until some expire
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
_CREDENTIAL = re.compile(r"v2:([0-9]{1,16}):([0-9a-f]{32}):([0-9A-Za-z._-]{0,64}):([0-9a-f]{64}):([0-9a-f]{64})")

# why a credential was refused (trailing metadata errors.REASON_KEY; never parse the message)
REASON_MISSING = "auth-missing"  # no credential: the caller has no secret
REASON_MALFORMED = "auth-malformed"
REASON_MAC = "auth-secret"  # the MAC does not verify: another secret, or a forged field
REASON_TARGET = "auth-target"  # made for another node (cross-node replay)
REASON_BODY = "auth-body"  # made for another request body (tampering)
REASON_CLOCK = "auth-clock"
REASON_REPLAY = "auth-replay"
REASON_BUSY = "auth-busy"  # the nonce cache is full
REASON_NODE_PROOF = "auth-node-proof"  # the node did not prove it holds the secret (client side)


class NodeAuthError(grpc.RpcError):
    """A node that could not prove it holds the cluster secret; behaves as an UNAUTHENTICATED refusal."""

    def __init__(self, address, why):
        super().__init__(f"node {address} {why}")
        self._details = f"node {address} {why}; it is not part of this cluster (rogue or misconfigured), not used"

    def code(self):
        return grpc.StatusCode.UNAUTHENTICATED

    def details(self):
        return self._details

    def trailing_metadata(self):
        return ((errors.REASON_KEY, REASON_NODE_PROOF),)

    def __str__(self):
        return self._details


# -- the secret ---------------------------------------------------------------


def default_secret_path():
    """``$TURBO_SECRET_FILE``, else ``$XDG_CONFIG_HOME/turbo-cluster/secret`` (or under ``~/.config``)."""
    if os.environ.get(ENV_SECRET_FILE):
        return Path(os.environ[ENV_SECRET_FILE]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "turbo-cluster" / "secret"


def _checked(secret, source):
    secret = secret.strip()
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(
            f"secret from {source} must be at least {MIN_SECRET_CHARS} characters, found {len(secret)}; "
            "make a good one with `turbo-node secret`"
        )
    return secret


def read_secret_file(path):
    """The secret in ``path``, refused (PermissionError) if other users can read it, as ssh refuses a readable key."""
    path = Path(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"secret file {path} has mode {mode:04o}, expected 0600 (run: chmod 600 {path})")
    return _checked(path.read_text(), str(path))


def write_secret_file(path, secret):
    """Write ``secret`` to ``path`` (0600, in a 0700 directory) atomically, never overwriting one that exists."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic and never overwrites a secret another process just made
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def load_or_create_secret(path=None, value=None):
    """The cluster secret: ``value``, else $TURBO_CLUSTER_SECRET, else the file.

    The file (default ``default_secret_path()``) is created on first use with
    32 random bytes in hex, mode 0600 in a 0700 directory, and refused if other
    users can read it.
    """
    if value is not None:
        return _checked(value, "the explicit value")
    if os.environ.get(ENV_SECRET):
        return _checked(os.environ[ENV_SECRET], f"${ENV_SECRET}")
    path = Path(path) if path is not None else default_secret_path()
    if not path.exists():
        write_secret_file(path, secrets.token_hex(32))
    return read_secret_file(path)


def find_secret(path=None):
    """The secret a CLI runs with: $TURBO_CLUSTER_SECRET, else ``path`` (created if missing),
    else the default file when present, else None (no auth: loopback only)."""
    if os.environ.get(ENV_SECRET) or path is not None:
        return load_or_create_secret(path)
    default = default_secret_path()
    return read_secret_file(default) if default.exists() else None


def _key(secret):
    if isinstance(secret, str):
        secret = secret.encode()
    if not secret:
        raise ValueError("an auth interceptor needs a non-empty secret")
    return secret


# -- credentials ----------------------------------------------------------------


def body_digest(raw: bytes) -> str:
    """sha256 hex of a serialised request body, as a credential names it."""
    return sha256(raw).hexdigest()


_EMPTY = body_digest(b"")


def _mac(key, method, target, digest, ts_ms, nonce):
    text = f"turbo-cluster-auth/{SCHEME}\n{method}\n{target}\n{digest}\n{ts_ms}\n{nonce}"
    return hmac.new(key, text.encode(), sha256).hexdigest()


def make_credential(secret, method, body=_EMPTY, target="", now=None):
    """The ``turbo-auth`` value for one call of ``method`` to node ``target`` with a body of sha256 ``body``."""
    ts_ms = int((time.time() if now is None else now) * 1000)
    nonce = secrets.token_hex(16)
    return f"{SCHEME}:{ts_ms}:{nonce}:{target}:{body}:{_mac(_key(secret), method, target, body, ts_ms, nonce)}"


def node_proof(secret, challenge: str, node_id: str) -> str:
    """What a node answers a handshake challenge with: proof it holds ``secret``, bound to its id."""
    text = f"turbo-cluster-node/{SCHEME}\n{challenge}\n{node_id}"
    return hmac.new(_key(secret), text.encode(), sha256).hexdigest()


def check_node_proof(secret, challenge, node_id, proof) -> bool:
    return isinstance(proof, str) and hmac.compare_digest(proof, node_proof(secret, challenge, node_id))


class _Nonces:
    """Nonces accepted while their credential could still be valid, to refuse replays; at most ``limit``."""

    def __init__(self, limit=MAX_NONCES):
        self._expiry, self._lock, self._limit = {}, threading.Lock(), limit

    def __len__(self):
        return len(self._expiry)

    def add(self, nonce, expiry, now):
        """True if new, False if seen, None if the cache is full of live nonces."""
        with self._lock:
            if nonce in self._expiry and self._expiry[nonce] >= now:
                return False
            if len(self._expiry) >= self._limit:
                self._expiry = {n: t for n, t in self._expiry.items() if t >= now}
                if len(self._expiry) >= self._limit:
                    return None
            self._expiry[nonce] = expiry
            return True


Credential = collections.namedtuple("Credential", "ts_ms nonce target digest")


class Verifier:
    """Checks ``turbo-auth`` credentials for node ``node_id``; shared by the sync and asyncio interceptors.

    ``parse`` checks what metadata alone can (form, MAC, target, clock); ``accept``
    the body digest and the nonce. Refusals are ``(message, REASON_*)``.
    """

    def __init__(self, secret, node_id="", max_skew=MAX_SKEW_S, exempt=EXEMPT_PREFIXES, clock=time.time, max_nonces=MAX_NONCES):
        self._key, self._skew, self._exempt, self._clock = _key(secret), max_skew, tuple(exempt), clock
        self.node_id = node_id
        self._nonces = _Nonces(max_nonces)

    def exempt(self, method):
        return method.startswith(self._exempt)

    def parse(self, method, metadata):
        """``(None, Credential)`` if the metadata holds a credential for this node and method, else ``(refusal, None)``."""
        values = [v for k, v in metadata or () if k == HEADER]
        if len(values) != 1:
            why = f"expected one '{HEADER}' metadata credential, found {len(values)}; is the cluster secret set?"
            return (why, REASON_MISSING), None
        match = _CREDENTIAL.fullmatch(values[0]) if isinstance(values[0], str) else None
        if match is None:
            why = f"'{HEADER}' must look like {SCHEME}:<unix ms>:<32 hex nonce>:<target>:<64 hex sha256>:<64 hex mac>"
            return (why, REASON_MALFORMED), None
        cred = Credential(int(match[1]), match[2], match[3], match[4])
        if not hmac.compare_digest(match[5], _mac(self._key, method, cred.target, cred.digest, cred.ts_ms, cred.nonce)):
            return ("credential does not match this cluster's secret", REASON_MAC), None
        if cred.target != self.node_id and not (cred.target == "" and method.endswith("/Handshake")):
            why = f"credential was made for node {cred.target or '(none)'!r}, this is node {self.node_id!r} (replayed from another node?)"
            return (why, REASON_TARGET), None
        age = self._clock() - cred.ts_ms / 1000
        if abs(age) > self._skew:
            return (f"credential timestamp is {age:+.1f} s old, over the {self._skew:.0f} s allowed; check the clocks", REASON_CLOCK), None
        return None, cred

    def accept(self, cred, raw):
        """None if ``raw`` is the body the credential names and its nonce is new, else a refusal."""
        if not hmac.compare_digest(cred.digest, body_digest(raw)):
            return ("credential was made for another request body (tampered or replayed)", REASON_BODY)
        added = self._nonces.add(cred.nonce, cred.ts_ms / 1000 + self._skew, self._clock())
        if added is None:
            return (f"over {self._nonces._limit} calls within {self._skew:.0f} s; try again shortly", REASON_BUSY)
        if not added:
            return ("credential was already used (replay)", REASON_REPLAY)
        return None

    def check(self, method, metadata, raw=b""):
        """``(refusal or None, Credential or None)`` for a whole call with body ``raw``."""
        refusal, cred = self.parse(method, metadata)
        if refusal is None:
            refusal = self.accept(cred, raw)
        return refusal, cred

    def refusal(self, method, metadata, raw=b""):
        """Why a call must be refused (a message), or None when it may proceed."""
        if self.exempt(method):
            return None
        refusal, _ = self.check(method, metadata, raw)
        return refusal and refusal[0]


# -- server side ----------------------------------------------------------------


class _Bad:
    """Stands in for a request body that its credential does not cover."""

    def __init__(self, code, why, reason=None):
        self.code, self.why, self.reason = code, why, reason


def _damaged(raw, crc):
    """True when the caller's crc32 of the body does not match: a bad link, answered DATA_LOSS as the gate would."""
    return crc is not None and not (isinstance(crc, str) and crc.isdigit() and int(crc) == zlib.crc32(raw))


def _body_check(handler, verifier, cred, crc):
    """``handler``'s deserializer, checking first that the (first) message is the body ``cred`` names."""
    parse, pending = handler.request_deserializer, [True]

    def deserialize(raw):
        if pending[0]:
            pending[0] = False
            refusal = verifier.accept(cred, raw)
            if refusal is not None:
                if _damaged(raw, crc):
                    why = f"request body has crc32 {zlib.crc32(raw)}, caller sent {CRC_HEADER} {crc!r}: damaged on the way"
                    return _Bad(grpc.StatusCode.DATA_LOSS, why)
                return _Bad(grpc.StatusCode.UNAUTHENTICATED, *refusal)
        return parse(raw) if parse else raw

    return deserialize


_NO_MESSAGE = _Bad(grpc.StatusCode.UNAUTHENTICATED, "a stream with no message has no body for its credential", REASON_BODY)


def _verifying(handler, verifier, cred, crc):
    """``handler`` refusing, before it runs, a body its credential does not cover."""
    behavior = handlers.behavior(handler)
    request_streaming, response_streaming = handlers.shape(handler)

    def checked(request_or_iterator, context):
        if request_streaming:
            it = iter(request_or_iterator)
            first = next(it, _NO_MESSAGE)
            if isinstance(first, _Bad):
                errors.abort(context, first.code, first.why, first.reason)
            return itertools.chain([first], it)
        if isinstance(request_or_iterator, _Bad):
            errors.abort(context, request_or_iterator.code, request_or_iterator.why, request_or_iterator.reason)
        return request_or_iterator

    if response_streaming:

        def run(request_or_iterator, context):
            yield from behavior(checked(request_or_iterator, context), context)
    else:

        def run(request_or_iterator, context):
            return behavior(checked(request_or_iterator, context), context)

    return handlers.like(handler, run, _body_check(handler, verifier, cred, crc), handler.response_serializer)


def _refusing(handler, refusal, aio=False):
    """A handler of the same kind as ``handler`` that fails with UNAUTHENTICATED, reason attached."""
    why, reason = refusal
    if aio:
        async def refuse(request, context):
            context.set_trailing_metadata(((errors.REASON_KEY, reason),))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
    elif handler.response_streaming:
        def refuse(request, context):
            errors.abort(context, grpc.StatusCode.UNAUTHENTICATED, why, reason)
            yield  # pragma: no cover
    else:
        def refuse(request, context):
            errors.abort(context, grpc.StatusCode.UNAUTHENTICATED, why, reason)

    return handlers.like(handler, refuse)


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without a valid ``turbo-auth`` credential for node ``node_id`` (health checks exempt).

    Metadata is checked before the handler is looked at; the body digest and the
    nonce before the body is parsed.
    """

    def __init__(self, secret, node_id="", **kwargs):
        self.verifier = Verifier(secret, node_id=node_id, **kwargs)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or self.verifier.exempt(details.method):
            return handler
        refusal, cred = self.verifier.parse(details.method, details.invocation_metadata)
        if refusal is not None:
            log.warning("refused %s: %s", details.method, refusal[0])
            return _refusing(handler, refusal)
        crc = dict(details.invocation_metadata or ()).get(CRC_HEADER)
        return _verifying(handler, self.verifier, cred, crc)


async def _maybe_await(result):
    return await result if hasattr(result, "__await__") else result


class AioAuthInterceptor(grpc.aio.ServerInterceptor):
    """``AuthInterceptor`` for ``grpc.aio`` servers.

    Unary requests are checked as on the sync server; for a streamed request the
    first message's digest is checked when it is parsed, and a mismatch ends the call.
    """

    def __init__(self, secret, node_id="", **kwargs):
        self.verifier = Verifier(secret, node_id=node_id, **kwargs)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or self.verifier.exempt(details.method):
            return handler
        refusal, cred = self.verifier.parse(details.method, details.invocation_metadata)
        if refusal is not None:
            log.warning("refused %s: %s", details.method, refusal[0])
            return _refusing(handler, refusal, aio=True)
        crc = dict(details.invocation_metadata or ()).get(CRC_HEADER)
        deserialize = _body_check(handler, self.verifier, cred, crc)
        if handler.request_streaming:

            def strict(raw):
                out = deserialize(raw)
                if isinstance(out, _Bad):
                    raise ValueError(out.why)
                return out

            return handlers.like(handler, handlers.behavior(handler), strict, handler.response_serializer)
        behavior = handlers.behavior(handler)

        async def refuse_bad(request, context):
            if isinstance(request, _Bad):
                if request.reason:
                    context.set_trailing_metadata(((errors.REASON_KEY, request.reason),))
                await context.abort(request.code, request.why)

        if handler.response_streaming:

            async def run(request, context):
                await refuse_bad(request, context)
                out = behavior(request, context)
                if hasattr(out, "__aiter__"):
                    async for r in out:
                        yield r
                else:
                    for r in out:
                        yield r
        else:

            async def run(request, context):
                await refuse_bad(request, context)
                return await _maybe_await(behavior(request, context))

        return handlers.like(handler, run, deserialize, handler.response_serializer)


# -- client side ----------------------------------------------------------------


class _Details(
    collections.namedtuple("_Details", "method timeout metadata credentials wait_for_ready compression"),
    grpc.ClientCallDetails,
):
    pass


def _serialized(message):
    return message if isinstance(message, (bytes, bytearray)) else message.SerializeToString()


def _peek(request_iterator):
    """``(first message's bytes, the same messages)``: a stream's credential covers its first message."""
    it = iter(request_iterator)
    first = next(it, None)
    if first is None:
        return b"", iter(())
    return _serialized(first), itertools.chain([first], it)


class _Signer:
    """Makes each call's credential; ``target`` is the callee's node id, set once its handshake proved it."""

    def __init__(self, secret, target=""):
        self._secret, self.target = _key(secret), target

    def metadata(self, details, raw):
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        cred = make_credential(self._secret, method, body_digest(raw), self.target)
        return list(details.metadata or ()) + [(HEADER, cred)]


class AuthClientInterceptor(
    _Signer,
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds a fresh ``turbo-auth`` credential, bound to the body and ``target``, to every call."""

    def _details(self, d, raw):
        return _Details(d.method, d.timeout, self.metadata(d, raw), d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details, _serialized(request)), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details, _serialized(request)), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        raw, messages = _peek(request_iterator)
        return continuation(self._details(details, raw), messages)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        raw, messages = _peek(request_iterator)
        return continuation(self._details(details, raw), messages)


def authenticated_channel(channel, secret, target=""):
    """``channel`` with every call carrying a credential for ``secret`` and node ``target``.

    The interceptor is ``channel.signer``: set its ``target`` once the node's id is known.
    """
    signer = AuthClientInterceptor(secret, target)
    out = grpc.intercept_channel(channel, signer)
    out.signer = signer
    return out


class _AioClient(_Signer):
    def _details(self, d, raw):
        return grpc.aio.ClientCallDetails(d.method, d.timeout, self.metadata(d, raw), d.credentials, d.wait_for_ready)


class _AioUnaryUnary(_AioClient, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details, _serialized(request)), request)


class _AioUnaryStream(_AioClient, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details, _serialized(request)), request)


class _AioStreamUnary(_AioClient, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        raw, messages = _peek(request_iterator)
        return await continuation(self._details(details, raw), messages)


class _AioStreamStream(_AioClient, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        raw, messages = _peek(request_iterator)
        return await continuation(self._details(details, raw), messages)


def aio_client_interceptors(secret, target=""):
    """Interceptors for ``grpc.aio.insecure_channel(..., interceptors=...)`` (sync request iterators).

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


class ExposedWithoutSecret(ValueError):
    """A node asked to listen beyond loopback with no cluster secret."""


def refuse_if_exposed(host, secret):
    """Raise ExposedWithoutSecret when ``host`` is reachable from other machines and there is no secret."""
    if secret or is_loopback(host):
        return
    raise ExposedWithoutSecret(
        f"refusing to listen on {host} without a cluster secret (anyone on the network could read and change "
        f"sessions): run `turbo-node secret` to make {default_secret_path()}, or serve on --host 127.0.0.1"
    )


def warn_if_exposed(host, secret):
    """The message ``refuse_if_exposed`` would raise, or None (kept for callers that only warn)."""
    try:
        refuse_if_exposed(host, secret)
    except ExposedWithoutSecret as e:
        return str(e)
    return None


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
