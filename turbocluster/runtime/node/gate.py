"""What a node checks before a handler runs, and how handler errors become gRPC statuses.

``Gate`` refuses, before the body is parsed, calls with a wrong protocol or no
valid handshake token, and checks the body's crc32; ``rpc``/``rpc_stream`` map
the node's refusals (``Refused``, ``SessionError``, wire errors, a next node's
status) to gRPC statuses with their reason attached.
"""

import re
import time
import zlib

import grpc
from google.protobuf.message import DecodeError

from ..sessions.store import SessionError
from ..transport import auth, errors, handlers, wire
from ..transport.client import MD_CRC

_CRC = re.compile(r"[0-9]{1,10}")
_OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # no handshake needed


class Refused(Exception):
    """A request the node will not serve; ``code`` is the grpc.StatusCode to answer with."""

    def __init__(self, code, message, reason=None):
        super().__init__(message)
        self.code = code
        self.reason = reason  # transport.errors.REASON_*, sent as turbo-reason beside the status


class Gate(grpc.ServerInterceptor):
    """Refuses, before the body is parsed, calls with a wrong protocol or no valid handshake token."""

    def __init__(self, node):
        self.node = node

    def intercept_service(self, continuation, details):
        method = details.method
        if method.startswith(_OPEN):
            return continuation(details)
        md = dict(details.invocation_metadata or ())
        refused = self.node.check_call(method, md)
        handler = continuation(details)
        if handler is None or refused is not None:
            return handler if handler is None else _refusal(handler, *refused)
        return _checked(handler, md.get(MD_CRC))


class _Bad(auth.Rejected):
    """Stands in for a request body that did not match its checksum or did not parse."""

    def __init__(self, code, why):
        self.code, self.why = code, why


def _checked(handler, crc):
    """``handler`` that answers, before anything runs, DATA_LOSS for a body whose crc32 is not the
    caller's ``turbo-crc32`` (when sent) and INVALID_ARGUMENT for one that does not parse."""
    parse = handler.request_deserializer

    def deserialize(raw):
        if crc is not None:
            found = zlib.crc32(raw)
            if not (isinstance(crc, str) and _CRC.fullmatch(crc) and int(crc) == found):
                return _Bad(grpc.StatusCode.DATA_LOSS, f"request body has crc32 {found}, caller sent {MD_CRC} {crc!r}: damaged on the way")
        try:
            return parse(raw) if parse else raw
        except DecodeError as e:
            return _Bad(grpc.StatusCode.INVALID_ARGUMENT, f"request body of {len(raw)} bytes is not a valid message: {e}")

    behavior = handlers.behavior(handler)

    def good(request, context):
        if isinstance(request, _Bad):
            context.abort(request.code, request.why)
        return request

    if handler.request_streaming:  # every message of a stream: the checksum is the unary calls' only (chunks carry crc32)
        deserialize = _parse_only(parse)

        def run(requests, context):
            return behavior((good(r, context) for r in requests), context)
    else:

        def run(request, context):
            return behavior(good(request, context), context)

    return handlers.like(handler, run, deserialize, handler.response_serializer)


def _parse_only(parse):
    def deserialize(raw):
        try:
            return parse(raw) if parse else raw
        except DecodeError as e:
            return _Bad(grpc.StatusCode.INVALID_ARGUMENT, f"stream message of {len(raw)} bytes is not a valid message: {e}")

    return deserialize


def _refusal(handler, message, reason=None):
    """A handler of the same shape as ``handler`` that aborts without deserialising the request."""

    def abort(request_or_iterator, context):
        errors.abort(context, grpc.StatusCode.FAILED_PRECONDITION, message, reason)

    def abort_stream(request_or_iterator, context):
        errors.abort(context, grpc.StatusCode.FAILED_PRECONDITION, message, reason)
        yield  # pragma: no cover

    return handlers.like(handler, abort_stream if handler.response_streaming else abort)


def _status(e):
    """The gRPC status and message for an error a handler may raise, or None for a bug."""
    if isinstance(e, Refused):
        return e.code, str(e)
    if isinstance(e, SessionError):
        return getattr(grpc.StatusCode, e.code), str(e)
    if isinstance(e, wire.WireError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, grpc.RpcError):  # the next node refused or is gone: pass its status on
        return e.code(), f"next node: {e.details()}"
    return None


def _count(node, fn, code, t0):
    metrics = getattr(node, "metrics", None)
    if metrics is not None:
        metrics.rpc(fn.__name__, code, time.perf_counter() - t0)


def rpc(fn):
    """Map the node's refusals to gRPC statuses; anything else is a bug and surfaces as UNKNOWN. Counted."""

    def wrapper(self, request, context):
        t0, code = time.perf_counter(), "UNKNOWN"
        try:
            out = fn(self, request, context)
            code = "OK"
            return out
        except (Refused, SessionError, wire.WireError, grpc.RpcError) as e:
            status = _status(e)
            code = status[0].name
            errors.abort(context, *status, getattr(e, "reason", None), getattr(e, "extra", ()))
        finally:
            _count(self, fn, code, t0)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def rpc_stream(fn):
    """``rpc`` for handlers that stream their replies."""

    def wrapper(self, request, context):
        t0, code = time.perf_counter(), "UNKNOWN"
        try:
            yield from fn(self, request, context)
            code = "OK"
        except (Refused, SessionError, wire.WireError, grpc.RpcError) as e:
            status = _status(e)
            code = status[0].name
            errors.abort(context, *status, getattr(e, "reason", None), getattr(e, "extra", ()))
        finally:
            _count(self, fn, code, t0)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper
