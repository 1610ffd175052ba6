"""The model host: the layers a node holds, its memory budget and the one thread all MLX work runs on.

MLX is not run concurrently from gRPC threads, so every load, step, export and
import is submitted here. Loading is written once (``start_load``): LoadLayers
and ``turbo-node serve --layers`` both come through it.
"""

import logging
import os
import threading
from concurrent import futures

import grpc
import mlx.core as mx
from mlx.utils import tree_flatten

from ...proto import turbo_pb2 as pb
from ..cache.config import kv_bytes
from ..model import shard
from ..transport import wire
from ..transport.errors import REASON_TOO_LARGE
from . import steps
from .batcher import ModelThread
from .gate import Refused

logger = logging.getLogger(__name__)


def backend() -> str:
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def default_memory_budget() -> int:
    """What this machine can give to weights + KV: Metal's recommended working set, else 75% of RAM."""
    if backend() == "metal":
        return int(mx.metal.device_info()["max_recommended_working_set_size"])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 3 // 4)


class ModelHost:
    """A node's layers (model, description, compat hash), its budget and its model thread.

    ``sessions`` is the node's SessionStore: its KV budget is what the weights leave.
    """

    def __init__(self, name: str, memory_budget: int, sessions, on_batch=None):
        self.name = name
        self.memory_budget = int(memory_budget)
        self.sessions = sessions
        self.model = None
        self.desc = None  # loader.describe() of the loaded model
        self.compat = None
        self.weights_bytes = 0
        self.load_state, self.load_fraction, self.load_message = pb.EMPTY, 0.0, "no layers loaded"
        self.lock = threading.Lock()
        self.batchable = False  # the loaded layers are all full attention: decode steps may be batched
        self._mx = ModelThread(steps.run_batch, on_batch=on_batch)  # on_batch(size): the node's metrics

    def run(self, fn, *args):
        """``fn(*args)`` on the model thread; returns its result."""
        return self._mx.submit(fn, *args).result()

    def run_step(self, job: "steps.StepJob"):
        """A step on the model thread, batched with other sessions' decode steps waiting there when it can be."""
        key = steps.batch_key(job)
        if key is None:
            return self.run(steps.run_batch, [job])[0]
        return self._mx.submit_step(key, job, job.session).result()

    def progress(self, state, fraction: float, message: str) -> None:
        with self.lock:
            self.load_state, self.load_fraction, self.load_message = state, fraction, message

    def need_model(self):
        model = self.model
        if model is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"node {self.name} has no layers loaded; call LoadLayers")
        return model

    def check_fits(self, desc: dict, start: int, end: int, reserved: int = 0) -> int:
        """The weight bytes of layers ``start:end``; refused (RESOURCE_EXHAUSTED, too-large) before a
        weight is read when they and the ``reserved`` KV bytes would pass the memory budget."""
        from ..model.loader import weights_bytes

        need = weights_bytes(desc, start, end)
        if need + reserved > self.memory_budget:
            kv = f" + {reserved} bytes of KV already reserved" if reserved else ""
            free = "free its sessions, " if reserved else ""
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"layers {start}:{end} of {desc['name']} need {need} bytes of weights{kv}, over node {self.name}'s "
                f"{self.memory_budget}-byte memory budget: {free}give this node fewer layers or a larger --memory-budget",
                REASON_TOO_LARGE,
            )
        return need

    def start_load(self, model_arg, desc: dict, start: int, end: int) -> futures.Future:
        """Load layers ``start:end`` of ``model_arg`` on the model thread; the future's result is the model, installed."""
        from ..model import loader

        self.progress(pb.LOADING, 0.1, f"loading layers {start}:{end} of {desc['name']}")

        def read(done, total):
            mib = 1 << 20
            self.progress(pb.LOADING, 0.1 + 0.85 * done / max(total, 1), f"{done / mib:.0f} / {total / mib:.0f} MiB of weights")

        def load():
            model, _ = loader.load(model_arg, layers=(start, end), tokenizer=False, progress=read)
            mx.eval(model.parameters())
            weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
            batchable = all(w is None for w in shard.sliding_windows(model))
            with self.lock:
                self.model, self.desc, self.weights_bytes, self.batchable = model, desc, weights, batchable
                self.compat = wire.compat_hash(desc["identity"])
                self.sessions.budget_bytes = self.memory_budget - weights
            self.progress(pb.READY, 1.0, f"layers {start}:{end} of {desc['name']} ready")
            logger.info("loaded layers %d:%d of %s (%d bytes of weights)", start, end, desc["name"], weights)
            return model

        return self._mx.submit(load)

    def load(self, model_arg, start: int, end: int):
        """Describe and load ``start:end`` of ``model_arg`` now (``turbo-node serve --layers``)."""
        from ..model import loader

        desc = loader.describe(model_arg)
        self.check_fits(desc, start, end)
        return self.start_load(model_arg, desc, start, end).result()

    def kv_bytes(self, max_context: int, cache: dict) -> int:
        """KV bytes this node's layers need for ``max_context`` positions (sliding layers capped at their window)."""
        from ..model import loader

        d = self.desc
        start, _, layers = shard.layer_range(self.model)
        itemsize = 4 if loader.use_float32() else 2  # the activations' dtype is what float caches store
        total = 0
        for i, w in enumerate(shard.sliding_windows(self.model), start):
            positions = min(max_context, w) if w else max_context
            layer_cache = {} if w else cache  # sliding-window layers stay float RotatingKVCaches under TurboQuant too
            total += kv_bytes(1, d["num_kv_heads"], d["head_dim"], positions, layer_cache, itemsize, (i, i + 1), layers)
        return total

    def close(self) -> None:
        self._mx.shutdown()
