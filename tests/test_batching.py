"""A node runs the decode steps of different sessions that wait for it together as one forward.

Real loopback nodes (tiny random-weight models), sessions with different cache
kinds and lengths stepped from threads at once: every step's logits equal
those of the same session stepped alone, the nodes' metrics show batches of
more than one session, and a model with sliding-window layers is never batched.
"""

import re
import threading

import numpy as np
import pytest

from turbocluster.proto import turbo_pb2 as pb
from turbocluster.runtime.model import loader
from turbocluster.runtime.node.server import make_server
from turbocluster.runtime.node.servicer import NodeServicer
from turbocluster.runtime.transport import wire
from turbocluster.runtime.transport.client import NodeClient

CACHES = [None, {"k_bits": 4, "v_bits": 4}, {"k_bits": 5, "v_bits": 3, "key_mean": True},
          {"k_bits": 4, "v_bits": 3, "key_mean": True, "sinks": 2, "window": 4}, None, {"k_bits": 3, "v_bits": 3}]
STEPS = 10


def start_pipeline(path, split, total):
    identity = loader.describe(path)["identity"]
    nodes = []
    for name, (start, end) in (("a", (0, split)), ("b", (split, total))):
        servicer = NodeServicer(name=name, session_ttl=0)
        server, port = make_server(servicer)
        client = NodeClient(f"127.0.0.1:{port}", identity, will_load=True)
        client.load(path, start, end)
        nodes.append((servicer, server, client))
    return nodes


def stop_pipeline(nodes):
    for servicer, server, client in nodes:
        client.close()
        server.stop(0)
        servicer.close()


def run_session(a, b, sid, cache, prompt, tokens, barrier=None):
    """Prefill ``prompt``, then one step per token of ``tokens`` (teacher-forced): the logits of each step."""
    b.create_session(sid, 128, cache=cache)
    a.create_session(sid, 128, cache=cache, next_address=b.address)
    a.forward(sid, prompt, want=pb.NONE)
    if barrier is not None:
        barrier.wait(60)
    out = []
    for t in tokens:
        r = a.forward(sid, [t], want=pb.LOGITS)
        out.append(np.array(wire.from_proto(r.logits)))
    for c in (a, b):
        c.drop(sid)
    return out


def batch_histogram(client, name):
    """``(count of batches, count of one-session batches)`` from a node's metrics."""
    text = client.metrics()

    def value(pattern):
        m = re.search(pattern, text, re.M)
        return float(m.group(1)) if m else 0.0

    total = value(rf'^turbo_node_step_batch_size_count\{{node="{name}"\}} (\S+)')
    alone = value(rf'^turbo_node_step_batch_size_bucket\{{le="1.0",node="{name}"\}} (\S+)')
    return total, alone


def run_all(a, b, concurrently):
    rng = np.random.default_rng(7)
    work = [(f"s{i}", cache, [int(t) for t in rng.integers(5, 1000, size=3 + 2 * i)], [int(t) for t in rng.integers(5, 1000, size=STEPS)])
            for i, cache in enumerate(CACHES)]
    if not concurrently:
        return [run_session(a, b, *w) for w in work]
    out = [None] * len(work)
    errors = []
    barrier = threading.Barrier(len(work))

    def one(i):
        try:
            out[i] = run_session(a, b, *work[i], barrier=barrier)
        except Exception as e:  # noqa: BLE001  (reported by the assert below)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return out


@pytest.fixture(scope="module")
def qwen3(tiny_model_dirs):
    nodes = start_pipeline(tiny_model_dirs["qwen3"], 2, 5)
    yield nodes
    stop_pipeline(nodes)


def test_concurrent_decode_steps_are_batched_and_match_each_session_alone(qwen3):
    (_, _, a), (_, _, b) = qwen3
    alone = run_all(a, b, concurrently=False)
    before = [batch_histogram(c, n) for c, n in ((a, "a"), (b, "b"))]
    assert all(total == ones for total, ones in before)  # stepped one at a time: nothing to batch with
    together = run_all(a, b, concurrently=True)
    for i, (x, y) in enumerate(zip(alone, together)):
        for step, (lx, ly) in enumerate(zip(x, y)):
            np.testing.assert_allclose(ly, lx, rtol=1e-4, atol=1e-4, err_msg=f"session {i} ({CACHES[i]}), step {step}")
    for (c, n), (total0, ones0) in zip(((a, "a"), (b, "b")), before):
        total, ones = batch_histogram(c, n)
        assert total - total0 > 0
        assert (total - total0) - (ones - ones0) > 0, f"node {n}: no batch of two or more sessions in {total - total0}"


def test_a_model_with_sliding_window_layers_runs_every_step_alone(tiny_model_dirs):
    nodes = start_pipeline(tiny_model_dirs["gemma3_text"], 3, 7)
    try:
        (_, _, a), (_, _, b) = nodes
        assert not nodes[0][0].host.batchable
        out = run_all(a, b, concurrently=True)
        assert all(len(x) == STEPS and np.isfinite(x[-1]).all() for x in out)
        assert batch_histogram(a, "a")[0] == 0  # never queued for batching
    finally:
        stop_pipeline(nodes)
