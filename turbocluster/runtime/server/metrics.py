"""The server's Prometheus metrics, in a registry of its own (so several servers can live in one process)."""

import logging

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("turbo_server_requests", "finished requests by finish reason", ["finish"], registry=r)
        self.errors = Counter("turbo_server_errors", "failed requests by status", ["status"], registry=r)
        self.prompt_tokens = Counter("turbo_server_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.cached_tokens = Counter("turbo_server_cached_prompt_tokens", "prompt tokens reused from a kept session's KV", registry=r)
        self.generated_tokens = Counter("turbo_server_generated_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge("turbo_server_queue_depth", "requests waiting for a worker", registry=r)
        self.running = Gauge("turbo_server_running", "requests being generated", registry=r)
        self.kept = Gauge("turbo_server_kept_sessions", "sessions kept on the nodes", registry=r)
        self.tokens_per_s = Gauge("turbo_server_tokens_per_second", "generated tokens per second over the last minute", registry=r)
        self.failovers = Gauge("turbo_server_failovers", "failover recoveries so far", registry=r)
        self.queue_wait = Histogram("turbo_server_queue_wait_seconds", "time queued before a worker took it", buckets=_LATENCY, registry=r)
        self.ttft = Histogram("turbo_server_time_to_first_token_seconds", "prefill time of a request", buckets=_LATENCY, registry=r)
        self.request_seconds = Histogram("turbo_server_request_seconds", "time to generate a request", buckets=_LATENCY, registry=r)
        self.hop_ms = Histogram("turbo_server_hop_milliseconds", "per-hop step latency (total ms at each node)", ["node"],
                                buckets=(0.5, 1, 2, 5, 10, 20, 50, 100, 250, 1000), registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def add_nodes(self, clients) -> None:
        """Include every node's own metrics (GetMetrics; ``clients()`` lists them) in ``render``."""
        self.registry.register(NodesCollector(clients))


class NodesCollector:
    """The nodes' metric families merged into one set (each sample keeps its ``node`` label)."""

    def __init__(self, clients, timeout: float = 2.0):
        self.clients, self.timeout = clients, timeout

    def describe(self):
        return []  # names known only when the nodes answer: nothing to check at registration

    def collect(self):
        merged = {}
        for c in self.clients():
            try:
                text = c.metrics(timeout=self.timeout)
            except grpc.RpcError as e:  # a node down or without the RPC: the others still report
                log.info("metrics of %s: %s", c.address, e.code().name)
                continue
            for family in text_string_to_metric_families(text):
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                into.samples.extend(family.samples)
        yield from merged.values()
