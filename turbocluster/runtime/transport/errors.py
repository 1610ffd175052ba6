"""The one error type the cluster raises, and the one map from it to gRPC statuses.

Callers branch on ``code`` (a ``grpc.StatusCode``, or None when no node
answered) and on ``impossible``, never on the message, which is for people.
"""

from typing import Optional

import grpc


class ClusterError(RuntimeError):
    """A step, move, plan or connection that did not happen; the message names the node and why.

    ``code``: the status a node answered with (or the one this error maps to);
    ``impossible``: retrying over the same nodes cannot help (failover found no plan).
    """

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None, impossible: bool = False):
        super().__init__(message)
        self.code = code
        self.impossible = impossible


class MigrationError(ClusterError):
    """A move, handoff, snapshot or restore that did not happen; the session is where it was."""


def from_rpc(what: str, address: str, e: grpc.RpcError) -> ClusterError:
    """A node's refusal as a ClusterError keeping its status."""
    return ClusterError(f"{what}node {address}: {e.code().name}: {e.details()}", e.code())


def status_name(e: BaseException) -> str:
    """The gRPC status name a CLI or server reports for ``e``."""
    code = getattr(e, "code", None)
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN"


# Why a node refused, for the caller's control flow: sent as trailing metadata beside the status.
REASON_KEY = "turbo-reason"
REASON_HANDSHAKE = "handshake"  # no valid handshake for this node's current model: handshake again
REASON_MOVE_WHOLE = "move-whole"  # these caches cannot be pre-copied: move them whole, inside the pause
REASON_POSITION = "position-mismatch"  # a stage's offset is not the step's expected_position: nothing applied
REASON_LOCKED = "session-locked"  # another holder has the session locked (LockSession): retry after it
REASON_NON_FINITE = "non-finite"  # a hidden state held NaN or Inf: refused, nothing applied
REASON_TOO_LARGE = "too-large"  # an inbound container, stream or staged copy would pass the node's memory budget
REASON_MOVED = "session-moved"  # a migration moved the session away: follow MOVED_TO_KEY
MOVED_TO_KEY = "turbo-moved-to"  # trailing metadata beside REASON_MOVED: host:port now holding those layers


def abort(context, code: grpc.StatusCode, message: str, reason: Optional[str] = None, extra: tuple = ()):
    """``context.abort`` with ``reason`` (and ``extra`` metadata pairs) attached for the caller's code."""
    if reason:
        context.set_trailing_metadata(((REASON_KEY, reason), *extra))
    context.abort(code, message)


def _trailer(e: grpc.RpcError, name: str) -> Optional[str]:
    try:
        trailers = e.trailing_metadata() or ()
    except Exception:  # an RpcError that is not a call (e.g. raised before one started) has none
        return None
    for key, value in trailers:
        if key == name:
            return value
    return None


def reason_of(e: grpc.RpcError) -> Optional[str]:
    """The reason a node attached to its refusal, or None."""
    return _trailer(e, REASON_KEY)


def moved_to(e: grpc.RpcError) -> Optional[str]:
    """Where a migration moved the session a NOT_FOUND names (reason REASON_MOVED), or None."""
    return _trailer(e, MOVED_TO_KEY) if reason_of(e) == REASON_MOVED else None
