"""Fault injection: a server interceptor that drops, delays or corrupts every k-th call.

For tests and chaos runs only. It is switched on by an explicit spec, from
``$TURBO_FAULTS`` or ``turbo-node serve --faults``, and a node started
without one never builds it:

    TURBO_FAULTS="drop:7,delay:5:0.2,corrupt:11"

``drop:K``        every K-th call runs, then its reply is lost: UNAVAILABLE (so the
                  caches may have advanced; the caller must trim before retrying)
``delay:K:S``     every K-th call waits S seconds first (past the caller's deadline, it
                  is a DEADLINE_EXCEEDED on the caller's side)
``corrupt:K``     every K-th unary call has one byte of its request flipped before the
                  node reads it, as a bad link would; the request checksum
                  (``turbo-crc32`` metadata, node.py) turns it into DATA_LOSS

Calls are counted per node process over the Node service's RPCs except
Handshake and LoadLayers (set up once, not on the paths that must recover);
health checks and reflection are never touched. When two faults fall on the
same call, the first in the spec wins.
"""

import os
import threading
import time
from dataclasses import dataclass

import grpc

from . import handlers

ENV = "TURBO_FAULTS"
KINDS = ("drop", "delay", "corrupt")
SERVICE_PREFIX = "/turbocluster.v1.Node/"
SPARED = ("Handshake", "LoadLayers")


@dataclass(frozen=True)
class Fault:
    kind: str  # "drop", "delay" or "corrupt"
    every: int  # applies to calls every, 2*every, ...
    seconds: float = 0.0  # delay only


def parse(spec):
    """``"drop:7,delay:5:0.2,corrupt:11"`` -> [Fault, ...]; an empty spec is no faults."""
    out = []
    for part in (p.strip() for p in (spec or "").split(",")):
        if not part:
            continue
        fields = part.split(":")
        kind = fields[0]
        want = 3 if kind == "delay" else 2
        if kind not in KINDS or len(fields) != want:
            raise ValueError(f"fault {part!r} must be drop:K, corrupt:K or delay:K:SECONDS")
        try:
            every = int(fields[1])
            seconds = float(fields[2]) if kind == "delay" else 0.0
        except ValueError:
            raise ValueError(f"fault {part!r}: K must be an integer and SECONDS a number") from None
        if every < 1 or not 0 <= seconds <= 600:
            raise ValueError(f"fault {part!r}: expected K >= 1 and 0 <= SECONDS <= 600")
        out.append(Fault(kind, every, seconds))
    return out


def from_env():
    """The faults ``$TURBO_FAULTS`` asks for (empty when unset)."""
    return parse(os.environ.get(ENV, ""))


def flip(raw):
    """``raw`` with its middle byte inverted (empty bodies have nothing to flip)."""
    if not raw:
        return raw
    b = bytearray(raw)
    b[len(b) // 2] ^= 0xFF
    return bytes(b)


class FaultInterceptor(grpc.ServerInterceptor):
    """Applies ``faults`` to the node's calls; ``injected`` counts what it did, by kind."""

    def __init__(self, faults, log=None):
        self.faults = list(faults)
        self.log = log or (lambda msg: None)
        self.calls = 0
        self.injected = {k: 0 for k in KINDS}
        self._lock = threading.Lock()

    def _pick(self, method):
        if not method.startswith(SERVICE_PREFIX) or method[len(SERVICE_PREFIX):] in SPARED:
            return None
        with self._lock:
            self.calls += 1
            n = self.calls
            for f in self.faults:
                if n % f.every == 0:
                    self.injected[f.kind] += 1
                    return f
        return None

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        fault = self._pick(details.method)
        if fault is None:
            return handler
        if fault.kind == "corrupt" and handler.request_streaming:
            return handler  # stream chunks carry their own crc32; only unary bodies are flipped
        self.log(f"fault injected: {fault.kind} on {details.method}")
        return _wrap(handler, fault)


def _wrap(handler, fault):
    """``handler`` with ``fault`` applied, keeping its call shape and (de)serialisers."""
    behavior = handlers.behavior(handler)
    deserialize = handler.request_deserializer

    if fault.kind == "corrupt":
        deserialize = (lambda raw: handler.request_deserializer(flip(raw))) if handler.request_deserializer else flip

    if handler.response_streaming:

        def run(request, context):
            if fault.kind == "delay":
                time.sleep(fault.seconds)
            replies = list(behavior(request, context))
            if fault.kind == "drop":
                context.abort(grpc.StatusCode.UNAVAILABLE, "fault injected: reply dropped")
            yield from replies

    else:

        def run(request, context):
            if fault.kind == "delay":
                time.sleep(fault.seconds)
            reply = behavior(request, context)
            if fault.kind == "drop":
                context.abort(grpc.StatusCode.UNAVAILABLE, "fault injected: reply dropped")
            return reply

    return handlers.like(handler, run, deserialize, handler.response_serializer)
