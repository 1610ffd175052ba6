"""Per-sequence state on a node: the KV caches of its layers, keyed by session id.

A plain store guarded by one lock. The node's gRPC handlers look sessions up
here; only the model thread touches a session's caches. Export and import of
packed KV (next issue) belong here too: they read and replace ``Session.caches``.
"""

import contextlib
import threading
import time
import uuid
from dataclasses import dataclass, field

from ..transport.errors import MOVED_TO_KEY, REASON_MOVED, REASON_TOO_LARGE

MAX_EXPIRED = 4096  # expired (and moved) ids remembered for the NOT_FOUND message
# Peak bytes while one inbound container is parsed, per container byte: the
# received bytes, msgpack's copies of its arrays, and the rebuilt mx.arrays.
INBOUND_FACTOR = 3


class SessionError(Exception):
    """A session request that cannot be honoured; ``code`` names the gRPC status."""

    def __init__(self, code, message, reason=None, extra=()):
        super().__init__(message)
        self.code = code
        self.reason = reason  # transport.errors.REASON_*, for the caller's control flow
        self.extra = extra  # more trailing metadata pairs beside the reason


@dataclass
class Session:
    session_id: str
    max_context: int
    caches: list
    cache_config: dict = field(default_factory=dict)  # {"k_bits", "v_bits", ...}; empty = fp16
    kv_bytes_reserved: int = 0
    next_address: str = ""
    sampling: dict = field(default_factory=dict)  # {"temperature", "top_p", "seed"}
    rng_state: object = None  # this session's mx.random key (last node, when sampling)
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)  # for the idle-session reaper
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    holder: str = ""  # who holds the session's LockSession lock; empty = unlocked
    holder_expires: float = 0.0  # time.monotonic() when that lock lapses
    last_step: object = None  # node/steps.py's record of the last step applied (idempotency)
    history: list = field(default_factory=list, repr=False)  # recent input token ids (last node's logits processors)
    pending_token: object = None  # last node: the token its last TOKEN step sampled (a kept session resumes from it)

    @property
    def offset(self):
        # SSM caches (ArraysCache) have no offset: the first cache that has one says it
        return next((c.offset for c in self.caches if isinstance(getattr(c, "offset", None), int)), 0)

    @property
    def counts_positions(self) -> bool:
        """Whether a cache here counts positions: a shard of only SSM layers (ArraysCache) cannot check one."""
        return any(isinstance(getattr(c, "offset", None), int) for c in self.caches)

    def kv_bytes_used(self):
        return sum(c.nbytes for c in self.caches)


def counted(messages, budget, size=lambda m: len(m.chunk.data)):
    """``messages`` as they arrive, refusing (RESOURCE_EXHAUSTED, REASON_TOO_LARGE) the one whose
    bytes pass ``budget``, before it is kept: a body that lies about its size stops there."""
    seen = 0
    for m in messages:
        seen += size(m)
        if seen > budget:
            raise SessionError("RESOURCE_EXHAUSTED", f"the stream passes its declared size by {seen - budget} bytes", REASON_TOO_LARGE)
        yield m


class SessionStore:
    """Sessions by id, with the KV memory they reserve counted against a budget."""

    def __init__(self, budget_bytes):
        self.budget_bytes = budget_bytes  # bytes available for KV (memory budget minus weights)
        self.ttl = 0.0  # seconds idle before ``expire`` frees a session; 0 = never
        self._sessions = {}
        self._inbound = 0  # bytes held by containers being received and parsed right now
        self._expired = {}  # ids freed by ``expire`` (the most recent MAX_EXPIRED), so lookups can say so
        self._moved = {}  # ids a migration moved away -> the address now holding them (most recent MAX_EXPIRED)
        self._lock = threading.Lock()

    def reserved(self):
        with self._lock:
            return sum(s.kv_bytes_reserved for s in self._sessions.values())

    def inbound_free(self, held=0):
        """KV budget bytes not reserved by sessions, in-flight imports or ``held`` (e.g. staged copies)."""
        with self._lock:
            return self.budget_bytes - sum(s.kv_bytes_reserved for s in self._sessions.values()) - self._inbound - held

    @contextlib.contextmanager
    def inbound(self, container_bytes, held=0, what="session container"):
        """Count an inbound container of ``container_bytes`` against the budget while it is parsed.

        Refused with RESOURCE_EXHAUSTED (reason REASON_TOO_LARGE) before a byte
        of it is buffered when its peak (``INBOUND_FACTOR`` x its size) does not fit.
        """
        need = INBOUND_FACTOR * container_bytes
        with self._lock:
            used = sum(s.kv_bytes_reserved for s in self._sessions.values()) + self._inbound + held
            free = self.budget_bytes - used
            if need > free:
                raise SessionError(
                    "RESOURCE_EXHAUSTED",
                    f"a {container_bytes}-byte {what} needs {need} bytes to parse but only {max(free, 0)} "
                    f"of the {self.budget_bytes}-byte KV budget are free",
                    REASON_TOO_LARGE,
                )
            self._inbound += need
        try:
            yield
        finally:
            with self._lock:
                self._inbound -= need

    def admit_stream(self, session_id, declared, cap):
        """Refuse a tensor stream at its first message: NOT_FOUND for a session this store does not
        hold, RESOURCE_EXHAUSTED (REASON_TOO_LARGE) when its declared size passes ``cap`` or the free budget."""
        self.get(session_id)
        free = self.inbound_free()
        if not 0 <= declared <= min(cap, free):
            raise SessionError(
                "RESOURCE_EXHAUSTED",
                f"a stream declaring {declared} bytes is over the {cap}-byte cap for one step or the "
                f"{max(free, 0)} free bytes of the KV budget",
                REASON_TOO_LARGE,
            )

    def add(self, session):
        """Insert ``session`` if its id is free and its reservation fits the budget."""
        with self._lock:
            if not session.session_id:
                session.session_id = uuid.uuid4().hex
            if session.session_id in self._sessions:
                raise SessionError("ALREADY_EXISTS", f"session {session.session_id!r} already exists")
            used = sum(s.kv_bytes_reserved for s in self._sessions.values())
            free = self.budget_bytes - used
            if session.kv_bytes_reserved > free:
                raise SessionError(
                    "RESOURCE_EXHAUSTED",
                    f"session needs {session.kv_bytes_reserved} bytes of KV for {session.max_context} positions, "
                    f"but only {max(free, 0)} of the {self.budget_bytes}-byte KV budget are free "
                    f"({len(self._sessions)} live sessions hold {used})",
                )
            self._sessions[session.session_id] = session
            self._expired.pop(session.session_id, None)
            self._moved.pop(session.session_id, None)
            return session

    def get(self, session_id):
        with self._lock:
            s = self._sessions.get(session_id)
            expired = self._expired.get(session_id)
            moved = self._moved.get(session_id)
        if s is None:
            if moved:
                raise SessionError(
                    "NOT_FOUND", f"session {session_id!r} was moved to {moved} by a migration", REASON_MOVED,
                    ((MOVED_TO_KEY, moved),),
                )
            if expired is not None:
                raise SessionError("NOT_FOUND", f"session {session_id!r} expired: idle for more than {expired:g} s (the node's --session-ttl)")
            raise SessionError("NOT_FOUND", f"no session {session_id!r} on this node")
        s.last_used = time.monotonic()
        return s

    def expire(self, now=None):
        """Drop sessions idle for longer than ``ttl`` (not one a step is using); returns them."""
        if not self.ttl:
            return []
        now = time.monotonic() if now is None else now
        with self._lock:
            old = [s for s in self._sessions.values() if now - s.last_used > self.ttl and not s.lock.locked()]
            for s in old:
                del self._sessions[s.session_id]
                self._expired[s.session_id] = self.ttl
            while len(self._expired) > MAX_EXPIRED:
                del self._expired[next(iter(self._expired))]
        return old

    def drop(self, session_id, moved_to: str = ""):
        """Remove the session; ``moved_to`` (a migration's drop) is remembered for later NOT_FOUNDs."""
        with self._lock:
            s = self._sessions.pop(session_id, None)
            if s is not None and moved_to:
                self._moved[session_id] = moved_to
                while len(self._moved) > MAX_EXPIRED:
                    del self._moved[next(iter(self._moved))]
        if s is None:
            raise SessionError("NOT_FOUND", f"no session {session_id!r} on this node")
        return s

    def drop_all(self):
        with self._lock:
            dropped = list(self._sessions.values())
            self._sessions.clear()
        return dropped

    def list(self):
        with self._lock:
            return list(self._sessions.values())

    def __len__(self):
        with self._lock:
            return len(self._sessions)
