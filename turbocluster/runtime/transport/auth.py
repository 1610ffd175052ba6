"""Cluster secret and RPC authentication.

Every node of a cluster shares one secret. Each call carries the metadata
``turbo-auth: v1:<unix ms>:<nonce>:<mac>`` where ``mac`` is
HMAC-SHA256(secret, "turbo-cluster-auth/v1\\n<method>\\n<unix ms>\\n<nonce>").
The server refuses a missing or wrong credential, a timestamp more than
``MAX_SKEW_S`` away from its clock, and a nonce it has already accepted, with
UNAUTHENTICATED. The health-check service stays open so orchestration can
probe. This proves who is calling, not what they sent: on networks you do not
trust, add TLS (``server_credentials`` / ``channel_credentials``).
"""

import collections
import hmac
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

from . import handlers

log = logging.getLogger(__name__)

HEADER = "turbo-auth"
SCHEME = "v1"
ENV_SECRET = "TURBO_CLUSTER_SECRET"
MAX_SKEW_S = 30.0
MIN_SECRET_CHARS = 16
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
_CREDENTIAL = re.compile(r"v1:([0-9]{1,16}):([0-9a-f]{32}):([0-9a-f]{64})")


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


def _key(secret):
    if isinstance(secret, str):
        secret = secret.encode()
    if not secret:
        raise ValueError("an auth interceptor needs a non-empty secret")
    return secret


# -- credentials ----------------------------------------------------------------


def _mac(key, method, ts_ms, nonce):
    text = f"turbo-cluster-auth/{SCHEME}\n{method}\n{ts_ms}\n{nonce}"
    return hmac.new(key, text.encode(), sha256).hexdigest()


def make_credential(secret, method, now=None):
    """The ``turbo-auth`` metadata value for one call of ``method``."""
    ts_ms = int((time.time() if now is None else now) * 1000)
    nonce = secrets.token_hex(16)
    return f"{SCHEME}:{ts_ms}:{nonce}:{_mac(_key(secret), method, ts_ms, nonce)}"


class _Nonces:
    """Nonces accepted while their credential could still be valid, to refuse replays."""

    def __init__(self):
        self._expiry, self._lock, self._prune_at = {}, threading.Lock(), 1024

    def add(self, nonce, expiry, now):
        with self._lock:
            if len(self._expiry) >= self._prune_at:
                self._expiry = {n: t for n, t in self._expiry.items() if t >= now}
                self._prune_at = max(1024, 2 * len(self._expiry))
            if nonce in self._expiry:
                return False
            self._expiry[nonce] = expiry
            return True


class Verifier:
    """Checks ``turbo-auth`` credentials; shared by the sync and asyncio interceptors."""

    def __init__(self, secret, max_skew=MAX_SKEW_S, exempt=EXEMPT_PREFIXES, clock=time.time):
        self._key, self._skew, self._exempt, self._clock = _key(secret), max_skew, tuple(exempt), clock
        self._nonces = _Nonces()

    def refusal(self, method, metadata):
        """Why a call must be refused, or None when it may proceed."""
        if method.startswith(self._exempt):
            return None
        values = [v for k, v in metadata or () if k == HEADER]
        if len(values) != 1:
            return f"expected one '{HEADER}' metadata credential, found {len(values)}; is the cluster secret set?"
        match = _CREDENTIAL.fullmatch(values[0]) if isinstance(values[0], str) else None
        if match is None:
            return f"'{HEADER}' must look like {SCHEME}:<unix ms>:<32 hex nonce>:<64 hex mac>"
        ts_ms, nonce, mac = int(match[1]), match[2], match[3]
        if not hmac.compare_digest(mac, _mac(self._key, method, ts_ms, nonce)):
            return "credential does not match this cluster's secret"
        now = self._clock()
        if abs(now - ts_ms / 1000) > self._skew:
            return f"credential timestamp is {now - ts_ms / 1000:+.1f} s old, over the {self._skew:.0f} s allowed; check the clocks"
        if not self._nonces.add(nonce, ts_ms / 1000 + self._skew, now):
            return "credential was already used (replay)"
        return None


# -- server side ----------------------------------------------------------------


def _refusing(handler, reason, aio=False):
    """A handler of the same kind as ``handler`` that fails with UNAUTHENTICATED."""
    if aio:
        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
    else:
        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    return handlers.like(handler, refuse)


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without a valid ``turbo-auth`` credential (health checks exempt)."""

    def __init__(self, secret, **kwargs):
        self.verifier = Verifier(secret, **kwargs)

    def intercept_service(self, continuation, details):
        reason = self.verifier.refusal(details.method, details.invocation_metadata)
        handler = continuation(details)
        if reason is None or handler is None:
            return handler
        log.warning("refused %s: %s", details.method, reason)
        return _refusing(handler, reason)


class AioAuthInterceptor(grpc.aio.ServerInterceptor):
    """``AuthInterceptor`` for ``grpc.aio`` servers."""

    def __init__(self, secret, **kwargs):
        self.verifier = Verifier(secret, **kwargs)

    async def intercept_service(self, continuation, details):
        reason = self.verifier.refusal(details.method, details.invocation_metadata)
        handler = await continuation(details)
        if reason is None or handler is None:
            return handler
        log.warning("refused %s: %s", details.method, reason)
        return _refusing(handler, reason, aio=True)


# -- client side ----------------------------------------------------------------


class _Details(
    collections.namedtuple("_Details", "method timeout metadata credentials wait_for_ready compression"),
    grpc.ClientCallDetails,
):
    pass


def _metadata(secret, details):
    """The call's metadata plus a fresh credential for its method."""
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    return list(details.metadata or ()) + [(HEADER, make_credential(secret, method))]


class AuthClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds a fresh ``turbo-auth`` credential to every call; works on insecure channels."""

    def __init__(self, secret):
        self._secret = _key(secret)

    def _details(self, d):
        md = _metadata(self._secret, d)
        return _Details(d.method, d.timeout, md, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def authenticated_channel(channel, secret):
    """``channel`` with every call carrying a credential for ``secret``."""
    return grpc.intercept_channel(channel, AuthClientInterceptor(secret))


class _AioClient:
    def __init__(self, secret):
        self._secret = _key(secret)

    def _details(self, d):
        md = _metadata(self._secret, d)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, md, d.credentials, d.wait_for_ready)


class _AioUnaryUnary(_AioClient, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioUnaryStream(_AioClient, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioStreamUnary(_AioClient, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _AioStreamStream(_AioClient, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def aio_client_interceptors(secret):
    """Interceptors for ``grpc.aio.insecure_channel(..., interceptors=...)``.

    grpc.aio accepts one interceptor per call kind, so this is a list of four.
    """
    return [cls(secret) for cls in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]


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
