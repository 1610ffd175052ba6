"""Running a node: the gRPC server with its interceptors, health and reflection, zeroconf, signals."""

import logging
import signal
import sys
import threading
from concurrent import futures

import grpc
import mlx.core as mx
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ...kernels.format import FORMAT_VERSION
from ...proto import turbo_pb2 as pb
from ...proto import turbo_pb2_grpc as pb_grpc
from ..transport import auth, discovery, wire
from ..transport.client import CHANNEL_OPTIONS
from .gate import Gate, Refused
from .servicer import DEFAULT_SESSION_TTL, SERVICE, NodeServicer, backend

logger = logging.getLogger(__name__)


def make_server(servicer, host="127.0.0.1", port=0, max_workers=16, faults=None):
    """A started gRPC server with the node, health and reflection services; returns (server, port).

    With ``servicer.secret`` set, every call but health checks must carry an
    ``auth.py`` credential (UNAUTHENTICATED otherwise), checked before the handshake gate.
    """
    gates = ([auth.AuthInterceptor(servicer.secret, identity=servicer.node_id)] if servicer.secret else []) + [Gate(servicer)]
    if faults:  # outermost, so a corrupted body meets the checksum as a bad link's would
        from ..transport.faults import FaultInterceptor

        gates.insert(0, FaultInterceptor(faults, log=lambda m: print(m, file=sys.stderr, flush=True)))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=gates,
        options=CHANNEL_OPTIONS,
    )
    pb_grpc.add_NodeServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    names = (pb.DESCRIPTOR.services_by_name["Node"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    tls = servicer.tls
    if tls:
        bound = server.add_secure_port(f"{host}:{port}", auth.server_credentials(tls["cert"], tls["key"], tls.get("ca")))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    server.start()
    server.health = health_servicer
    return server, bound


CACHE_FRACTION = 16  # MLX may keep 1/16 of the memory budget in freed buffers for reuse


def cap_buffer_cache(memory_budget: int) -> int:
    """Cap MLX's cache of freed buffers (process-wide) at a fraction of the budget; returns the cap.

    The budget counts weights, KV and inbound containers; the buffers MLX keeps after a step
    or an import for reuse are counted nowhere, and by default it may keep up to its memory limit.
    """
    cap = memory_budget // CACHE_FRACTION
    previous = mx.set_cache_limit(cap)
    if previous < cap:
        mx.set_cache_limit(previous)
        cap = previous
    logger.info("MLX buffer cache capped at %d bytes", cap)
    return cap


def serve(
    host="127.0.0.1", port=0, model=None, layers=None, memory_budget=None, name=None, advertise=True, secret=None,
    session_ttl=DEFAULT_SESSION_TTL, tls=None, faults=None, models_dir=None, metrics_port=None,
):
    """Run a node until SIGINT/SIGTERM: load ``layers`` of ``model`` if given, serve, advertise, withdraw.

    ``tls`` is ``{"cert", "key", "ca"}`` (PEM paths; with ``ca``, clients need a certificate it
    signed); ``faults`` (faults.parse) injects failures for tests and must be asked for explicitly.
    A non-loopback ``host`` needs a ``secret`` (SystemExit with how to make one otherwise);
    ``models_dir`` confines LoadLayers to models under it (model_access.py).
    """
    refusal = auth.exposure_error(host, secret)
    if refusal:
        raise SystemExit(f"turbo-node: {refusal}")
    if faults:
        print(f"warning: fault injection is on: {faults}", file=sys.stderr, flush=True)
    servicer = NodeServicer(name=name, memory_budget=memory_budget, secret=secret, session_ttl=session_ttl, tls=tls)
    servicer.models_dir = models_dir
    cap_buffer_cache(servicer.memory_budget)
    if models_dir is not None and layers is not None:
        from .model_access import resolve

        try:
            model = resolve(model, models_dir)
        except Exception as e:
            raise SystemExit(f"turbo-node: {e}") from None
    if layers is not None:
        try:
            servicer.host.load(model, *layers)
        except Refused as e:  # e.g. the layers' weights pass --memory-budget
            raise SystemExit(f"turbo-node: {e}") from None
    server, bound = make_server(servicer, host, port, faults=faults)
    mode = ("authenticated" if secret else "no auth") + (", TLS" if tls else "")
    print(f"turbo-node {servicer.name} ({servicer.node_id}) serving on {host}:{bound} ({mode})", flush=True)
    metrics_http = None
    if metrics_port is not None:
        from .metrics import serve_http

        metrics_http = serve_http(servicer.metrics, servicer, metrics_port)
        print(f"metrics on http://127.0.0.1:{metrics_http.server_address[1]}/metrics", flush=True)
    handle = None
    if advertise:
        props = {
            "node_id": servicer.node_id,
            "protocol": wire.PROTOCOL_VERSION,
            "format": FORMAT_VERSION,
            "backend": backend(),
            "memory": servicer.memory_budget,
            "port": bound,
        }
        handle = discovery.advertise(servicer.name, host, bound, props)
        print(f"advertised as {handle[1].name}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.health.enter_graceful_shutdown()
    discovery.withdraw(handle)
    server.stop(grace=1.0).wait()
    if metrics_http is not None:
        metrics_http.shutdown()
    servicer.close()
    print(f"turbo-node {servicer.name} stopped", flush=True)
