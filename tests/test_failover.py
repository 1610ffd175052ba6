"""Failover: a node killed (kill -9) or partitioned (SIGSTOP) mid-generation costs a warning, not the session.

Node processes are started once for the module; a test that kills one starts
its replacement, so the next test again has enough live nodes.
"""

import os
import signal
import time

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from turbocluster.runtime.cluster import failover
from turbocluster.runtime.model import loader
from turbocluster.runtime.cluster.cluster import Cluster, ClusterError, start_local_nodes, stop_local_nodes

PROMPT = "Name three colours."
MAX_TOKENS = 10
BEFORE = 3  # tokens generated before the failure


@pytest.fixture(scope="module")
def bundled():
    """The chat-templated prompt and the greedy tokens of a fault-free mlx-lm run (no EOS stop)."""
    model, tok = loader.load()
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    ref = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=MAX_TOKENS)]
    del model
    return ids, ref


class Pool:
    """Live node processes; ``take(k)`` returns k of them, starting replacements for the dead."""

    def __init__(self):
        self.nodes = []

    def take(self, k, **kw):
        self.nodes = [n for n in self.nodes if n.proc.poll() is None]
        if len(self.nodes) < k:
            self.nodes += start_local_nodes(k - len(self.nodes), **kw)
        return self.nodes[:k]

    def close(self):
        for n in self.nodes:
            if n.proc.poll() is None:
                os.kill(n.proc.pid, signal.SIGCONT)
        stop_local_nodes(self.nodes)


@pytest.fixture(scope="module")
def pool():
    p = Pool()
    p.take(3)
    yield p
    p.close()


def connect(nodes, context=128):
    cluster = Cluster.connect(nodes=[n.address for n in nodes])
    cluster.load(cluster.plan(context=context))
    failover.configure(cluster, step_timeout_s=8.0, probe_timeout_s=1.5, backoff_s=0.05)
    return cluster


def generate_through(cluster, ids, fail):
    """Greedy tokens, calling ``fail()`` after BEFORE of them; returns (tokens, recovery events)."""
    gen = cluster.generate_tokens(ids, max_tokens=MAX_TOKENS, stop_at_eos=False)
    out = [next(gen) for _ in range(BEFORE)]
    fail()
    with pytest.warns(failover.FailoverWarning):
        out += list(gen)
    return out, failover.state(cluster).events


def kill(node):
    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait()


@pytest.mark.parametrize("k,victim", [(2, 1), (3, 1)])
def test_kill_9_mid_generation_finishes_with_identical_greedy_output(pool, bundled, k, victim):
    ids, ref = bundled
    nodes = pool.take(k)
    with connect(nodes) as cluster:
        out, events = generate_through(cluster, ids, lambda: kill(nodes[victim]))
        assert out == ref, f"{k} -> {k - 1} nodes"
        [event] = events
        assert list(event["lost"]) == [nodes[victim].address]
        assert len(cluster.plan_.assignments) == k - 1 and nodes[victim].address not in event["nodes"]
        assert cluster.sessions() == []  # dropped on the new plan when generation ended


def test_rebuild_from_a_packed_kv_checkpoint_replays_only_the_tail(pool, bundled):
    ids, ref = bundled
    nodes = pool.take(3)
    with connect(nodes) as cluster:
        failover.configure(cluster, checkpoint_every=4)
        out, events = generate_through(cluster, ids, lambda: kill(nodes[2]))
        assert out == ref
        [rebuild] = failover.state(cluster).rebuilds
        assert rebuild["mode"] == "checkpoint" and rebuild["steps_replayed"] < 4


def test_health_watch_replans_while_idle(pool, bundled):
    ids, ref = bundled
    nodes = pool.take(2)
    with connect(nodes) as cluster:
        stop = failover.watch(cluster, interval_s=0.5)
        try:
            with pytest.warns(failover.FailoverWarning):
                kill(nodes[1])
                deadline = time.monotonic() + 60
                while not failover.state(cluster).events and time.monotonic() < deadline:
                    time.sleep(0.2)
            assert list(failover.state(cluster).events[0]["lost"]) == [nodes[1].address]
            assert list(cluster.generate_tokens(ids, max_tokens=MAX_TOKENS, stop_at_eos=False)) == ref
        finally:
            stop.set()


def test_partitioned_node_is_handled_like_a_dead_one(pool, bundled):
    ids, ref = bundled
    nodes = pool.take(2)
    try:
        with connect(nodes) as cluster:
            # warm up first: a fresh node's first prompt compiles MLX kernels for seconds, past the short deadline
            list(cluster.generate_tokens(ids, max_tokens=2, stop_at_eos=False))
            failover.configure(cluster, step_timeout_s=8.0, probe_timeout_s=1.0)  # 3 s timed out on a loaded 2-core box
            t0 = time.monotonic()
            out, events = generate_through(cluster, ids, lambda: os.kill(nodes[0].proc.pid, signal.SIGSTOP))
            assert out == ref
            assert list(events[0]["lost"]) == [nodes[0].address] and "DEADLINE_EXCEEDED" in events[0]["lost"][nodes[0].address]
            assert time.monotonic() - t0 < 60  # detection is bounded by the step deadline and the probes
    finally:
        kill(nodes[0])  # SIGKILL ends a stopped process too


def test_failover_that_cannot_fit_the_survivors_says_why(bundled):
    ids, _ = bundled
    # each holds half of the model's ~115 MB of weights, neither the whole
    nodes = start_local_nodes(2, memory_budget=95 << 20)
    try:
        with connect(nodes, context=64) as cluster:
            gen = cluster.generate_tokens(ids, max_tokens=MAX_TOKENS, stop_at_eos=False)
            next(gen)
            kill(nodes[1])
            with pytest.warns(failover.FailoverWarning), pytest.raises(ClusterError, match="failover impossible.*cannot hold the model"):
                list(gen)
            kill(nodes[0])
            gen = cluster.generate_tokens(ids, max_tokens=MAX_TOKENS, stop_at_eos=False)
            with pytest.warns(failover.FailoverWarning), pytest.raises(ClusterError, match="failover impossible: no node answered"):
                list(gen)
    finally:
        stop_local_nodes(nodes)


def test_a_session_restored_from_a_snapshot_survives_a_failover(pool, bundled, tmp_path):
    """A restored session has no replay journal: its snapshot's KV is what the re-plan rebuilds it from."""
    ids, ref = bundled
    nodes = pool.take(3)
    path = tmp_path / "s.tcs"
    with connect(nodes) as cluster:
        gen = cluster.generate_tokens(ids, max_tokens=MAX_TOKENS, stop_at_eos=False, session_id="restored")
        first = [next(gen) for _ in range(BEFORE)]
        cluster.snapshot(path, "restored")
        gen.close()
    with connect(nodes) as cluster:
        sid = cluster.restore(path)
        rest = cluster.resume(sid, MAX_TOKENS - BEFORE, stop_at_eos=False)
        out = first + [next(rest)]
        kill(nodes[1])
        with pytest.warns(failover.FailoverWarning):
            out += list(rest)
        assert out == ref
        [rebuild] = failover.state(cluster).rebuilds
        assert rebuild["mode"] == "checkpoint" and rebuild["session"] == "restored"
        assert cluster.sessions() == []
