"""A session's lifecycle from the real CLIs: `generate --keep`, `resume` from another process, `drop`.

Each command is a separate `turbo-cluster` process against node processes on
loopback, so nothing is shared but what the nodes hold: the packed KV and the
last node's pending token.
"""

import os
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from turbocluster.runtime.cache.turbo_cache import make_turbo_cache
from turbocluster.runtime.cluster.cluster import Cluster, start_local_nodes, stop_local_nodes
from turbocluster.runtime.model import loader

PROMPT = "Write a long story about a dragon who learns to cook."
STEP = 6  # tokens per command


@pytest.fixture(scope="module")
def nodes():
    started = start_local_nodes(2)
    try:
        yield started
    finally:
        stop_local_nodes(started)


def cli(*argv):
    script = os.path.join(os.path.dirname(sys.executable), "turbo-cluster")
    p = subprocess.run([script, *argv], capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, p.stdout.rstrip("\n"), p.stderr


def test_a_kept_session_resumes_from_other_processes_with_the_same_greedy_tokens(nodes):
    model, tok = loader.load()
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    cache = make_turbo_cache(model, k_bits=5, v_bits=3)  # the same cache as the nodes': the same greedy tokens
    ref = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=3 * STEP, prompt_cache=cache)]
    assert not set(ref) & set(tok.eos_token_ids)
    where = ",".join(n.address for n in nodes)
    cache = ["--k-bits", "5", "--v-bits", "3"]

    rc, first, err = cli("generate", "--nodes", where, "--prompt", PROMPT, "--max-tokens", str(STEP), "--keep",
                         "--session-id", "kept", "--max-context", "256", *cache)
    assert rc == 0, err
    assert "session kept" in err and f"turbo-cluster resume kept --nodes {where}" in err
    rc, second, err = cli("resume", "kept", "--nodes", where, "--max-tokens", str(STEP), "--keep")
    assert rc == 0 and "kept session kept" in err, err
    with Cluster.connect(nodes=[n.address for n in nodes]) as c:
        [row] = c.sessions()
        assert row["session_id"] == "kept" and row["offset"] == len(ids) + 2 * STEP - 1  # the last token is pending
    rc, third, err = cli("resume", "kept", "--nodes", where, "--max-tokens", str(STEP))
    assert rc == 0, err
    assert first + second + third == tok.decode(ref[: 3 * STEP])
    with Cluster.connect(nodes=[n.address for n in nodes]) as c:
        assert c.sessions() == []  # not kept the last time: dropped on every node
    rc, _, err = cli("resume", "kept", "--nodes", where)
    assert rc == 1 and "kept" in err and len(err.strip().splitlines()) == 1, err
