"""A bounded queue of requests and a fixed set of worker threads that drive them through the pipeline.

Each worker drives one session at a time, so ``workers`` sessions are in flight
at once: while one session's step runs on node 1, node 0 runs another's. A
request that finds the queue full is refused (the API answers 503 with
Retry-After) instead of piling up threads. The workers run no MLX (the nodes
do), are not daemons, and ``close`` joins them, so the process exits cleanly.
"""

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..transport.errors import ClusterError, status_name
from .engine import Engine, Sampling

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds ``limit`` requests already; try again later."""


@dataclass(eq=False)  # hashed by identity: the scheduler keeps a set of running jobs
class Job:
    """One request: its prompt ids, its limits, and where its pieces go (``emit(kind, value)``)."""

    ids: list
    max_tokens: int
    sampling: Sampling
    emit: Callable  # emit("text", str) per piece, then emit("done", dict); emit("error", ClusterError)
    stop: tuple = ()
    keep: bool = True
    resume: Optional[str] = None  # continue this kept session from its pending token
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)


class Scheduler:
    def __init__(self, engine: Engine, workers: int = 8, queue_limit: int = 32, metrics=None):
        self.engine = engine
        self.metrics = metrics
        self.queue: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=queue_limit)
        self.running = 0
        self._lock = threading.Lock()
        self._closed = False
        self._active = set()
        self.recent = []  # (time, tokens) of finished decode work, for tokens/s over the last minute
        self._threads = [threading.Thread(target=self._work, name=f"serve-{i}") for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, job: Job) -> None:
        if self._closed:
            raise QueueFull("the server is shutting down")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.queue.maxsize} requests are queued already") from None
        if self.metrics:
            self.metrics.queue_depth.set(self.queue.qsize())

    def depth(self) -> int:
        return self.queue.qsize()

    def tokens_per_s(self, window: float = 60.0) -> float:
        now = time.monotonic()
        with self._lock:
            self.recent = [(t, n) for t, n in self.recent if now - t < window]
            if not self.recent:
                return 0.0
            span = max(now - self.recent[0][0], 1.0)
            return sum(n for _, n in self.recent) / span

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what runs, refuse what is queued, stop the workers and join them."""
        self._closed = True
        with self._lock:
            for job in self._active:
                job.cancelled.set()
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", ClusterError("the server is shutting down"))
        for _ in self._threads:
            self.queue.put(None)
        for t in self._threads:
            t.join(timeout)

    def _work(self):
        while True:
            job = self.queue.get()
            if job is None:
                return
            with self._lock:
                self._active.add(job)
                self.running += 1
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 - reported to the request, never kills the worker
                if not isinstance(e, ClusterError):
                    log.exception("request failed")
                    e = ClusterError(f"internal error: {type(e).__name__}: {e}")
                if self.metrics:
                    self.metrics.errors.labels(status_name(e)).inc()
                job.emit("error", e)
            finally:
                with self._lock:
                    self._active.discard(job)
                    self.running -= 1

    def _run(self, job: Job):
        eng, m = self.engine, self.metrics
        if m:
            m.queue_depth.set(self.queue.qsize())
            m.queue_wait.observe(time.perf_counter() - job.queued_at)
        if job.resume:
            k, ids = eng.resume(job.resume, job.max_tokens)
            reused = len(ids) - 1
        else:
            ids = job.ids
            k, reused = eng.acquire(ids, job.sampling, job.max_tokens)
        ok, generated, finish = False, [], "length"
        text = _Text(eng.cluster.tokenizer, job.stop)
        t0 = time.perf_counter()
        first_at = None
        try:
            tokens = eng.run(k, ids, reused, job.max_tokens)
            try:
                for token in tokens:
                    if first_at is None:
                        first_at = time.perf_counter()
                        if m:
                            m.ttft.observe(first_at - t0)
                    if token in eng.eos:
                        finish = "stop"
                        break
                    generated.append(token)
                    piece, hit = text.add(token)
                    if piece:
                        job.emit("text", piece)
                    if hit:
                        finish = "stop"
                        break
                    if job.cancelled.is_set():
                        finish = "cancelled"
                        break
            finally:
                tokens.close()
            if not text.hit:
                piece = text.flush()
                if piece:
                    job.emit("text", piece)
            ok = True
        finally:
            eng.release(k, keep=ok and job.keep)
        dt = time.perf_counter() - t0
        n = len(generated)
        with self._lock:
            self.recent.append((time.monotonic(), n))
        if m:
            m.prompt_tokens.inc(len(ids) - reused)
            m.cached_tokens.inc(reused)
            m.generated_tokens.inc(n)
            m.requests.labels(finish).inc()
            m.request_seconds.observe(dt)
        job.emit("done", {
            "finish_reason": "stop" if finish == "cancelled" else finish,
            "prompt_tokens": len(ids), "cached_tokens": reused, "completion_tokens": len(generated),
            "session_id": k.session_id, "seconds": dt,
            "ttft_s": (first_at - t0) if first_at else None,
        })


class _Text:
    """Incremental detokenising with stop strings: holds back what could still start a stop string."""

    def __init__(self, tokenizer, stop=()):
        self.tok = tokenizer
        self.ids = []
        self.sent = 0  # characters of the decoded text already emitted
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.hit = False

    def add(self, token):
        self.ids.append(token)
        full = self.tok.decode(self.ids)
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return "", False
        for s in self.stop:
            at = full.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                cut = min(full.find(x) for x in self.stop if x in full)
                piece = full[self.sent:cut] if cut > self.sent else ""
                self.sent, self.hit = len(full), True
                return piece, True
        end = len(full) - self.hold
        if end <= self.sent:
            return "", False
        piece = full[self.sent:end]
        self.sent = end
        return piece, False

    def flush(self):
        full = self.tok.decode(self.ids) if self.ids else ""
        piece = full[self.sent:]
        self.sent = len(full)
        return piece
