"""Caches, model loading, nodes and the coordinator."""

from .model.loader import load
from .cache.turbo_cache import TurboQuantKVCache, make_turbo_cache


def __getattr__(name):
    """``turbocluster.runtime.Cluster``, imported on first use (grpc and the cluster layer are not light)."""
    if name == "Cluster":
        from .cluster.cluster import Cluster

        return Cluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
