"""A node's Prometheus metrics: what it served, how fast, and what it holds.

Each node has its own registry (several nodes can live in one process, as in
the tests). Counters are bumped by the RPC wrappers (``gate.rpc``) and the step
executor; gauges are read from the node when the metrics are rendered, so they
never go stale. They are served by the ``GetMetrics`` RPC (authenticated like
every call) and, with ``turbo-node serve --metrics-port``, over HTTP on
loopback only, for a local Prometheus agent.
"""

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class NodeMetrics:
    """The counters and gauges of one node; every sample carries ``node=<name>``."""

    def __init__(self, name: str):
        r = self.registry = CollectorRegistry()
        self.name = name
        n = ["node"]
        self.rpcs = Counter("turbo_node_rpcs", "RPCs answered, by method and status", n + ["method", "code"], registry=r)
        self.rpc_seconds = Histogram("turbo_node_rpc_seconds", "time to answer an RPC", n + ["method"], buckets=_SECONDS, registry=r)
        self.positions = Counter("turbo_node_positions", "positions (tokens) run through this node's layers", n, registry=r)
        self.steps = Counter("turbo_node_steps", "Forward steps applied here", n, registry=r)
        self.compute_seconds = Histogram("turbo_node_step_compute_seconds", "a step's time on this node, before forwarding",
                                         n, buckets=_SECONDS, registry=r)
        self.batch_sizes = Histogram("turbo_node_step_batch_size", "decode steps (of distinct sessions) run in one forward",
                                     n, buckets=(1, 2, 4, 8, 16), registry=r)
        self.sessions = Gauge("turbo_node_sessions", "live sessions", n, registry=r)
        self.kv_reserved = Gauge("turbo_node_kv_bytes_reserved", "KV bytes reserved by live sessions", n, registry=r)
        self.kv_used = Gauge("turbo_node_kv_bytes_used", "KV bytes held by live sessions", n, registry=r)
        self.memory_used = Gauge("turbo_node_memory_used_bytes", "weights + KV reserved", n, registry=r)
        self.memory_budget = Gauge("turbo_node_memory_budget_bytes", "the node's memory budget", n, registry=r)
        self.tokens_per_s = Gauge("turbo_node_positions_per_second", "positions per second over the last minute", n, registry=r)
        self._recent = []  # (monotonic time, positions) of the last minute's steps

    def rpc(self, method: str, code: str, seconds: float) -> None:
        short = method.rsplit("/", 1)[-1]
        self.rpcs.labels(self.name, short, code).inc()
        self.rpc_seconds.labels(self.name, short).observe(seconds)

    def step(self, positions: int, seconds: float) -> None:
        self.steps.labels(self.name).inc()
        self.positions.labels(self.name).inc(positions)
        self.compute_seconds.labels(self.name).observe(seconds)
        now = time.monotonic()
        self._recent.append((now, positions))
        while self._recent and now - self._recent[0][0] > 60:
            self._recent.pop(0)

    def batch(self, size: int) -> None:
        self.batch_sizes.labels(self.name).observe(size)

    def recent_positions_per_s(self) -> float:
        now = time.monotonic()
        recent = [(t, p) for t, p in list(self._recent) if now - t <= 60]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1.0)
        return sum(p for _, p in recent) / span

    def render(self, node) -> str:
        """The Prometheus text, gauges refreshed from ``node`` (the servicer)."""
        sessions, reserved = node.sessions.list(), node.sessions.reserved()
        self.sessions.labels(self.name).set(len(sessions))
        self.kv_reserved.labels(self.name).set(reserved)
        self.kv_used.labels(self.name).set(sum(s.kv_bytes_used() for s in sessions))
        self.memory_budget.labels(self.name).set(node.memory_budget)
        self.memory_used.labels(self.name).set(node.weights_bytes + reserved)  # as GetInfo's memory_used_bytes
        self.tokens_per_s.labels(self.name).set(self.recent_positions_per_s())
        return generate_latest(self.registry).decode()


def serve_http(metrics: NodeMetrics, node, port: int) -> object:
    """Serve ``/metrics`` on 127.0.0.1:``port`` (loopback only: the numbers name sessions' sizes); the server."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (http.server's name)
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            body = metrics.render(node).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            log.debug("metrics: " + fmt, *args)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
