"""A streamed request's body digest, computed without holding the stream's messages.

A credential names the digest of every message of a stream (auth.py), so it is
made before the first message leaves. The digest is sha256 over
``b"turbo-cluster-stream/v2\\n"`` and then, for each serialised message, its
length as 8 big-endian bytes followed by its bytes; the node computes the same
over what it receives.

A ``Replayable`` stream can be made twice from its source: once for the
digest and once to send, each message built, serialised and dropped in turn,
so a sender holds its source (e.g. a session container) and about one message,
not every message besides the source. Any other iterator is read into a list
first, which holds all of it once more.
"""

from hashlib import sha256
from typing import Callable, Iterable, Iterator, Tuple


class Replayable:
    """The messages ``make()`` yields, made anew on each ``iter()``.

    ``iter(stream)`` (the credential's digest pass, then its send pass) calls ``make``
    again each time; ``next(stream)``, which is how gRPC reads a request iterator when no
    interceptor replaced it, reads one pass of its own. ``make`` must yield the same
    messages every time (it reads immutable source bytes).
    """

    def __init__(self, make: Callable[[], Iterable]):
        self._make, self._pass = make, None

    def __iter__(self) -> Iterator:
        return iter(self._make())

    def __next__(self):
        if self._pass is None:
            self._pass = iter(self._make())
        return next(self._pass)


def hasher():
    return sha256(b"turbo-cluster-stream/v2\n")


def update(h, raw: bytes) -> None:
    h.update(len(raw).to_bytes(8, "big"))
    h.update(raw)


def stream_digest(messages: Iterable) -> str:
    """sha256 over a streamed request's messages, each length-prefixed (bytes or protobuf messages)."""
    h = hasher()
    for m in messages:
        update(h, m if isinstance(m, (bytes, bytearray)) else m.SerializeToString())
    return h.hexdigest()


def digest_then_messages(request_iterator) -> Tuple[str, Iterator]:
    """``(stream_digest, the messages to send)``: a Replayable is digested in one pass and made
    again to send; anything else is held whole in a list, digested, then sent from the list."""
    if isinstance(request_iterator, Replayable):
        return stream_digest(iter(request_iterator)), iter(request_iterator)
    messages = list(request_iterator)
    return stream_digest(messages), iter(messages)
