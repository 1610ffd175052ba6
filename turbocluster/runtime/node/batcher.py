"""The node's one MLX thread: calls run in the order they come; decode steps queued together run as one batch.

MLX streams belong to the thread that made them, so everything a node does
with MLX runs here. When the thread picks a decode step (one position) and
other sessions' decode steps with the same batch key are already waiting, it
runs them all in one forward (``steps.run_batch``): the weights are read once
for B rows instead of B times, which is what decoding is bound by. Nothing
waits to fill a batch; a step that finds the queue empty runs alone, as
before. Each session appears at most once per batch, and at most
``max_batch`` steps share one.
"""

import collections
import logging
import os
import threading
from concurrent import futures
from typing import Callable, Hashable, Optional

logger = logging.getLogger(__name__)

MAX_BATCH = 16
ENV_MAX_BATCH = "TURBOCLUSTER_MAX_BATCH"  # 1 turns batching off (scripts/bench_serving.py compares both)


def configured_max_batch() -> int:
    """Most steps per batch: ``TURBOCLUSTER_MAX_BATCH`` (1..256) or ``MAX_BATCH``."""
    text = os.environ.get(ENV_MAX_BATCH, "")
    if not text:
        return MAX_BATCH
    if text.isdigit() and 1 <= int(text) <= 256:
        return int(text)
    logger.warning("%s=%r is not an integer 1..256; using %d", ENV_MAX_BATCH, text, MAX_BATCH)
    return MAX_BATCH


class _Item:
    __slots__ = ("future", "fn", "args", "key", "step", "session")

    def __init__(self, fn=None, args=(), key=None, step=None, session=None):
        self.future = futures.Future()
        self.fn, self.args, self.key, self.step, self.session = fn, args, key, step, session


class ModelThread:
    """One worker thread; ``run_batch(steps) -> results`` runs a batch of queued steps."""

    def __init__(self, run_batch: Callable[[list], list], max_batch: Optional[int] = None,
                 on_batch: Optional[Callable[[int], None]] = None):
        self._run_batch, self._on_batch = run_batch, on_batch
        self.max_batch = configured_max_batch() if max_batch is None else max_batch
        self._queue = collections.deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="mlx", daemon=True)
        self._thread.start()

    def submit(self, fn, *args) -> futures.Future:
        """Run ``fn(*args)`` on the thread, alone; its future."""
        return self._put(_Item(fn=fn, args=args))

    def submit_step(self, key: Hashable, step, session: object) -> futures.Future:
        """Queue a decode step; steps of distinct sessions with equal ``key`` may run in one batch."""
        return self._put(_Item(key=key, step=step, session=session))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking work; queued work fails; the call in progress finishes (waited for up to ``timeout`` s)."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _put(self, item: _Item) -> futures.Future:
        with self._ready:
            if self._closed:
                raise RuntimeError("the node's model thread is shut down")
            self._queue.append(item)
            self._ready.notify()
        return item.future

    def _take(self) -> Optional[list]:
        """The next item, or a batch: the first step and every waiting step it can share a forward with."""
        with self._ready:
            while not self._queue and not self._closed:
                self._ready.wait()
            if self._closed:
                for item in self._queue:
                    item.future.set_exception(RuntimeError("the node's model thread shut down"))
                self._queue.clear()
                return None
            first = self._queue.popleft()
            if first.step is None:
                return [first]
            batch, sessions = [first], {id(first.session)}
            for item in list(self._queue):
                if len(batch) >= self.max_batch:
                    break
                if item.step is not None and item.key == first.key and id(item.session) not in sessions:
                    self._queue.remove(item)
                    batch.append(item)
                    sessions.add(id(item.session))
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            if batch[0].step is None:
                item = batch[0]
                try:
                    item.future.set_result(item.fn(*item.args))
                except BaseException as e:  # noqa: BLE001  (handed to the caller, who raises it)
                    item.future.set_exception(e)
                continue
            try:
                results = self._run_batch([item.step for item in batch])
            except BaseException as e:  # noqa: BLE001  (every step of the batch fails with it)
                for item in batch:
                    item.future.set_exception(e)
                continue
            if self._on_batch is not None:
                self._on_batch(len(batch))
            for item, result in zip(batch, results):
                item.future.set_result(result)
